"""tasks/tune_report.py on real in-memory Optuna studies with a cheap, deterministic objective."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from optuna.trial import TrialState

from tasks.tune_report import pruning_savings, trials_table, write_tune_report

EPOCHS = 5
EVIL = "<script>x</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    """x decides the score; lr and act barely matter. Reports one value per epoch."""
    x = trial.suggest_float("x", 0.0, 1.0)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    act = trial.suggest_categorical("act", ["relu", EVIL])
    trial.set_user_attr("epochs_requested", EPOCHS)
    score = x + 0.001 * lr + (0.001 if act == "relu" else 0.0)
    for epoch in range(EPOCHS):
        value = score * (epoch + 1) / EPOCHS
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def _study(n_trials: int, *, name: str = "sweep", direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(study_name=name, direction=direction,
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1))
    study.enqueue_trial({"act": EVIL})  # the malicious choice is certainly in the table
    study.optimize(_objective, n_trials=n_trials)
    return study


def _add_failed_and_running(study: optuna.Study) -> None:
    failed = study.ask()
    failed.suggest_float("x", 0.0, 1.0)
    failed.report(0.1, 0)
    failed.set_user_attr("fail_reason", "CUDA out of memory")
    study.tell(failed, state=TrialState.FAIL)
    retry = study.ask()  # left RUNNING, as a sweep killed mid-trial leaves it
    retry.set_user_attr("retry_of", failed.number)
    study.enqueue_trial({"x": 0.5})  # WAITING


@pytest.fixture(scope="module")
def sweep():
    study = _study(30, name="<b>sweep</b> & co")
    _add_failed_and_running(study)
    return study


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_report")
    best = {"trial": sweep.best_trial.number, "value": sweep.best_value, "params": sweep.best_params,
            "final_model": "data/tune/model.pt"}
    summary = write_tune_report(sweep, out, epochs_requested=EPOCHS, best=best, storage="sqlite:///tune.db")
    return out, summary


def test_writes_files_and_valid_pngs(report):
    out, _ = report
    for name in ("index.html", "trials.csv", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("history.png", "intermediate.png", "importances.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    html = (out / "index.html").read_text()
    for src in ('src="history.png"', 'src="intermediate.png"', 'src="importances.png"'):
        assert src in html  # relative paths: the folder is self-contained
    assert "<script" not in html.replace(EVIL.replace("<", "&lt;"), "")  # no JavaScript at all
    assert "optuna-dashboard sqlite:///tune.db" in html
    assert json.loads((out / "summary.json").read_text())["study_name"] == "<b>sweep</b> & co"


def test_counts_and_pruning_ratio_match_trials(sweep, report):
    _, summary = report
    trials = sweep.get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    finished = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]
    assert by_state[TrialState.PRUNED], "the fixture should prune some trials"
    run = sum(len(t.intermediate_values) for t in finished)
    p = summary["pruning"]
    assert (p["epochs_run"], p["epochs_requested"]) == (run, len(finished) * EPOCHS)
    assert p["ratio"] == pytest.approx(run / (len(finished) * EPOCHS))
    assert p["ratio"] < 1.0
    assert (p["n_complete"], p["n_pruned"], p["n_failed"]) == tuple(
        len(by_state[s]) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    assert summary["counts"] == {s.name: len(v) for s, v in by_state.items()}
    assert summary["best_value"] == max(t.value for t in by_state[TrialState.COMPLETE])
    assert f"{run} epochs run of {len(finished) * EPOCHS} requested" in (report[0] / "index.html").read_text()


def test_trials_table_and_csv(sweep, report):
    rows = trials_table(sweep)
    assert [r["number"] for r in rows] == sorted(t.number for t in sweep.trials)
    assert {r["state"] for r in rows} == {"COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"}
    running = next(r for r in rows if r["state"] == "RUNNING")
    assert running["seconds"] is None and running["user_attrs"]["retry_of"] is not None
    complete = next(r for r in rows if r["state"] == "COMPLETE")
    assert (complete["epochs_run"], complete["epochs_requested"]) == (EPOCHS, EPOCHS)
    assert complete["seconds"] is not None and set(complete["params"]) == {"x", "lr", "act"}
    with open(report[0] / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"param_x", "param_act", "user_attrs"} <= set(table[0])


def test_html_escapes_user_data(report):
    html = (report[0] / "index.html").read_text()
    assert EVIL not in html and "<b>sweep</b>" not in html
    assert "act=&lt;script&gt;x&lt;/script&gt;" in html
    assert "&lt;b&gt;sweep&lt;/b&gt; &amp; co" in html
    assert "CUDA out of memory" in html and "data/tune/model.pt" in html


def test_importances_find_the_param_that_matters(report):
    _, summary = report
    imp = summary["importances"]
    assert imp is not None, summary["importances_reason"]
    assert max(imp, key=imp.get) == "x" and imp["x"] > 0.5


@pytest.mark.parametrize("n_complete", [0, 1])
def test_degenerate_studies_still_report(tmp_path, n_complete):
    study = optuna.create_study(study_name="tiny", direction="minimize")
    if n_complete:
        study.optimize(_objective, n_trials=1)
    _add_failed_and_running(study)
    summary = write_tune_report(study, tmp_path, epochs_requested=EPOCHS)
    html = (tmp_path / "index.html").read_text()
    assert (tmp_path / "history.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "importances.png").exists()
    assert summary["importances"] is None and "completed trials" in summary["importances_reason"]
    assert summary["importances_reason"] in html
    assert summary["counts"]["COMPLETE"] == n_complete and summary["pruning"]["n_failed"] == 1
    if n_complete:
        assert summary["best_trial"] == 0 and summary["direction"] == "minimize"
    else:
        assert summary["best_trial"] is None and summary["pruning"]["ratio"] is None
        assert "No completed trials" in html


def test_constant_params_give_a_reason_not_a_plot(tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: float(len(t.suggest_categorical("act", ["relu"]))), n_trials=3)
    summary = write_tune_report(study, tmp_path, epochs_requested=EPOCHS)
    assert summary["importances"] is None and "no parameter varies" in summary["importances_reason"]
    assert not (tmp_path / "importances.png").exists()


def test_bad_arguments_name_the_problem(sweep, tmp_path):
    with pytest.raises(ValueError, match="epochs_requested must be an int >= 1, got 0"):
        pruning_savings(sweep, epochs_requested=0)
    multi = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(ValueError, match="single objective"):
        write_tune_report(multi, tmp_path, epochs_requested=EPOCHS)
