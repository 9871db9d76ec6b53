"""Stage tune: a pruned sweep on real images, resume after SIGKILL, parallel workers on the
journal file and on a real PostgreSQL server, and the final model trained from the best trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tasks import curate, ingest, train, tune
from tasks.io import read_json
from tasks.params import ParamsError, dump_resolved
from tasks.tune_study import study_name
from tests.conftest import ROOT, tiny_params
from tests.postgres import postgres_url  # noqa: F401 (fixture)

SWEEP = ["curate.fiftyone=false", "ingest.limit_per_split=200", "train.num_threads=1", "tune.enabled=true",
         "tune.trials=4", "tune.epochs=3", "tune.startup_trials=1", "tune.heartbeat_s=1", "tune.stale_after_s=60"]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A tiny real curated version (200 train + 200 test Fashion-MNIST images)."""
    tmp = tmp_path_factory.mktemp("tune-data")
    params = tiny_params(tmp, SWEEP)
    ingest.run(params)
    curate.run(params)
    return tmp


def _params(curated, tmp_path, extra=()):
    """Sweep params sharing the curated data; study, cache and reports of this test's own."""
    p = tiny_params(curated, SWEEP + list(extra))
    paths = p.paths.model_copy(update={"cache": tmp_path / "cache", "reports": tmp_path / "reports"})
    return p.model_copy(update={"paths": paths})


def _study(p):
    return tune.load_study(p, tune.study_for(p))


def _check_finished(study, n):
    """n counted trials, numbered without gaps, none left running or waiting, no repeats."""
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if not t.user_attrs.get("stale")]
    assert len(counted) == n
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    return counted


def test_pruned_sweep_then_resume_then_final_model(curated, tmp_path):
    p = _params(curated, tmp_path)
    r = tune.run(p)
    assert r.enabled and r.n_complete + r.n_pruned == 4 and r.n_failed == 0
    study = _study(p)
    trials = _check_finished(study, 4)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) < 3 for t in pruned)  # pruned trials stopped early
    best = read_json(p.paths.data / "tune" / "best.json")
    assert best["value"] == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert set(best["params"]) <= set(p.tune.space) and best["epochs"] == 3
    summary = read_json(p.paths.reports / "tune" / "summary.json")
    assert summary["pruning"]["epochs_run"] == sum(len(t.intermediate_values) for t in trials)
    assert summary["pruning"]["ratio"] < 1
    for name in ("index.html", "history.png", "intermediate.png", "trials.csv"):
        assert (p.paths.reports / "tune" / name).stat().st_size > 0
    assert not list((p.paths.cache / "tune" / tune.study_for(p)).glob("values-*"))  # trial scratch removed

    # unchanged: the same study, nothing new; one more trial requested: exactly one more
    again = tune.run(p)
    assert again.n_complete + again.n_pruned == 4
    p5 = _params(curated, tmp_path, ["tune.trials=5"])
    assert tune.study_for(p5) == tune.study_for(p)
    tune.run(p5)
    _check_finished(_study(p5), 5)

    # the train stage trains the best values on train+val and records where they came from
    train.run(p5)
    meta = read_json(p5.paths.data / "train" / "model.json")
    assert meta["tuned_from"]["trial"] == read_json(p5.paths.data / "tune" / "best.json")["trial"]
    assert meta["n_val"] == 0 and len(meta["history"]) == 3
    resolved = train.final_params(p5)[0]
    for key, value in meta["tuned_from"]["params"].items():
        node = resolved
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value


def test_study_identity(curated, tmp_path):
    p = _params(curated, tmp_path)
    same = [_params(curated, tmp_path, [f"tune.{k}"]) for k in ("trials=9", "workers=2", "timeout_s=5")]
    same.append(_params(curated, tmp_path, ["train.num_threads=2"]))
    assert {tune.study_for(q) for q in same} == {tune.study_for(p)}
    changed = [_params(curated, tmp_path, [x]) for x in ("tune.epochs=2", "train.image_size=28", "seed=1",
                                                          "tune.pruner=hyperband")]
    names = {tune.study_for(q) for q in changed}
    assert len(names) == 4 and tune.study_for(p) not in names
    assert study_name(p, "otherversion") != tune.study_for(p)  # another dataset version: a new study


@pytest.mark.parametrize("override, message", [
    ("tune.space={lrr: {type: float, low: 0.1, high: 1}}", "space key 'lrr': lrr is not a train: param"),
    ("tune.space={augment: {type: int, low: 0, high: 2}}", "is a section; name one of its params"),
    ("tune.space={lr: {type: float, low: 0, high: 1, log: true}}", "log scale needs low > 0"),
    ("tune.space={batch_size: {type: categorical}}", "categorical needs a non-empty `choices` list"),
    ("tune.space={trainable_stages: {type: int, low: 1, high: 3, when: {finetune: partial}}}",
     "'finetune' must be a key of space listed before 'trainable_stages'"),
])
def test_bad_space_fails_at_load(tmp_path, override, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_params(tmp_path, [override])


def test_sweep_needs_val_split(curated, tmp_path):
    with pytest.raises(tune.TuneError, match="val_fraction > 0"):
        tune.run(_params(curated, tmp_path, ["train.val_fraction=0"]))


def _write_project(p, folder):
    """A params.yaml that `python -m tasks.tune` reads from its working folder."""
    folder.mkdir(parents=True, exist_ok=True)
    dump_resolved(p, folder / "params.yaml")
    return folder


def test_sigkill_mid_trial_then_rerun_resumes(curated, tmp_path):
    """A worker killed mid-trial leaves a RUNNING trial; the re-run fails it, runs the same
    values again from the dead trial's last epoch checkpoint, and ends with every trial."""
    p = _params(curated, tmp_path, ["tune.epochs=6", "tune.trials=3"])
    project = _write_project(p, tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.tune"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim, deadline = None, time.time() + 240
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            running = _study(p).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        victim = next((t for t in running if len(t.intermediate_values) >= 2), None)
    assert victim is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no trial"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _study(p).trials[victim.number].state == TrialState.RUNNING  # what a kill leaves behind

    tune.run(p)
    study = _study(p)
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["stale"]
    assert "is gone" in dead.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].params == dead.params
    # the first trial cannot be pruned (startup_trials=1), so its retry completes, resumed
    # from the dead trial's checkpoint rather than from scratch
    assert retry[0].state == TrialState.COMPLETE and retry[0].user_attrs["resumed_after_epoch"] >= 2
    _check_finished(study, 3)


def _check_workers(study, n):
    trials = _check_finished(study, n)
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2, "both workers ran trials"
    values = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(values)) == len(values), "no trial ran twice"


def test_two_workers_on_the_journal_file(curated, tmp_path):
    p = _params(curated, tmp_path, ["tune.workers=2", "tune.trials=6", "train.num_threads=2"])
    r = tune.run(p)
    assert r.n_complete + r.n_pruned == 6
    _check_workers(_study(p), 6)


def test_two_workers_on_postgresql(curated, tmp_path, postgres_url):  # noqa: F811 (fixture)
    p = _params(curated, tmp_path, ["tune.workers=2", "tune.trials=6", "train.num_threads=2",
                                    f"tune.storage={postgres_url}"])
    tune.run(p)
    study = optuna.load_study(study_name=tune.study_for(p), storage=postgres_url)
    _check_workers(study, 6)
    assert read_json(p.paths.data / "tune" / "tune.json")["storage"].startswith("postgresql+psycopg://")


def test_time_budget_stops_new_trials(curated, tmp_path):
    """timeout_s: the trial under way finishes, no new one starts; what finished is summarized."""
    p = _params(curated, tmp_path, ["tune.trials=50", "tune.timeout_s=3"])
    r = tune.run(p)
    assert 1 <= r.n_complete + r.n_pruned < 50
    assert read_json(p.paths.data / "tune" / "tune.json")["counts"]["COMPLETE"] == r.n_complete


def test_disabled_stage_writes_its_outputs_only(curated, tmp_path):
    p = _params(curated, tmp_path, ["tune.enabled=false"])
    assert not tune.run(p).enabled
    assert read_json(p.paths.data / "tune" / "tune.json") == {"enabled": False}
    assert "tune.enabled" in (p.paths.reports / "tune" / "index.html").read_text()
    assert not (p.paths.cache / "tune").exists()  # no study, no journal


def test_invalid_values_fail_their_trial_with_the_reason(curated, tmp_path):
    """A value the train: model rejects fails that trial (recorded, counted), never the worker;
    with no trial left to pick, the stage says why."""
    p = _params(curated, tmp_path, ["tune.trials=2",
                                    "tune.space={augment.randaugment_magnitude: {type: int, low: 31, high: 31}}"])
    with pytest.raises(tune.TuneError, match="no trial completed.*randaugment_magnitude"):
        tune.run(p)
    trials = _study(p).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("less than or equal to 30" in t.user_attrs["fail_reason"] for t in trials)
    assert not (p.paths.data / "tune" / "best.json").exists()  # no half-made result
