"""Stage tune: an Optuna sweep over `tune.space`; every trial is the train stage's own train().

Inputs:  data/curate (the curated version), pretrained weights, params `tune:`, `train:`, `seed`.
Outputs: data/tune/ (`paths.data`/tune)
    tune.json     enabled, study name and storage, trial counts, pruning savings, seconds
    best.json     the best trial: number, val accuracy, its `train:` values (dotted keys) and
                  epochs. The train stage reads it and trains the final model with those values
                  on train+val (tasks.train.final_params), so evaluate scores the tuned model.
         reports/tune/  index.html with the trials table and static PNGs (tasks.tune_report)
State:   the study, in `tune.storage`: by default Optuna's journal file
         `paths.cache`/tune/optuna.journal (several local processes append to it safely);
         a postgresql+psycopg:// URL lets workers on several machines share one study.
         A storage another process holds locked for over tune_study.LOCK_TIMEOUT_S fails the
         stage with what to do, before the last sweep's outputs are touched.

The objective (`_objective`) turns `trial.suggest_*` into a TrainParams (params.with_values)
and calls train() with an `on_epoch` callback that reports val accuracy and raises
TrialPruned; `trial` never reaches the training code. One process talks to Optuna per trial.

A study is named after the curated version and everything that shapes its trials (space,
base `train:` recipe, epochs, sampler, pruner, seed), so changing data or space starts a new
study and re-running an unchanged stage resumes the old one: finished trials are kept.

Stale trials: a worker stamps its running trial every `heartbeat_s` and records host, pid and
the pid's start time. Before each new trial, a worker fails every RUNNING trial whose process
is gone (same host) or whose stamp is older than `stale_after_s`, and enqueues the same values
again; the retry runs in the same workspace and train() resumes from the dead trial's last
epoch checkpoint. (Optuna's built-in heartbeat covers RDB storage only; this one covers both.)

Parallel: `tune.workers: N` runs N processes on the same storage (worker 0 in this one), the
train threads split between them; on several machines run `python -m tasks.tune worker` (or
the Prefect flow `flows.tune`) against one PostgreSQL storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.io import atomic_write_json, atomic_write_text, read_json
from tasks.params import Params, with_values
from tasks.tune_study import (
    Heartbeat,
    TuneError,
    counted,
    create_study,
    fail_stale_trials,
    load_study,
    owner,
    storage_errors,
    storage_label,
    study_name,
    trial_epochs,
)

OFF_PAGE = ("<!doctype html><meta charset=utf-8><title>Hyperparameter sweep: off</title>"
            "<p>No sweep: <code>tune.enabled</code> is false in params.yaml. Set it to true to run the "
            "Optuna sweep over <code>tune.space</code>; the train stage then uses the best trial's values.</p>\n")


@dataclass(frozen=True)
class TuneResult:
    enabled: bool
    study: str | None = None
    best_value: float | None = None
    best_params: dict | None = None
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0


# ---- one trial ----------------------------------------------------------------------------

def suggest(trial, space: dict) -> dict:
    """The trial's values for `tune.space`, dotted `train:` keys; `when` skips conditional keys."""
    values: dict = {}
    for key, dim in space.items():
        if dim.when and any(values.get(k, object()) != v for k, v in dim.when.items()):
            continue
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def workspace(params: Params, name: str, values: dict) -> Path:
    """A trial's scratch folder, named by its values: a retry of the same values finds the
    dead trial's epoch checkpoints there and resumes."""
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    return params.paths.cache / "tune" / name / f"values-{digest}"


def _objective(trial, params: Params, name: str, threads: int) -> tuple[Callable[[], dict], dict]:
    """(run, values): `run()` trains with the trial's values and returns the outcome; the
    only code here that touches `trial`, through suggest() and the epoch callback."""
    import optuna

    from tasks.train import train
    from tasks.weights import train_weights

    values = suggest(trial, params.tune.space)
    epochs = trial_epochs(params)
    talk = {"seconds": 0.0, "epochs": 0}  # time in Optuna calls during training; epochs reported

    def on_epoch(entry: dict) -> None:
        t0 = time.perf_counter()
        trial.report(entry["val_accuracy"], entry["epoch"])
        prune = trial.should_prune()
        talk["seconds"] += time.perf_counter() - t0
        talk["epochs"] += 1
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {entry['epoch']}")

    def run() -> dict:
        folder = workspace(params, name, values)
        t0, outcome = time.perf_counter(), {"values": values, "epochs_requested": epochs}
        try:  # invalid values (e.g. a bound the train: model rejects) fail this trial, not the sweep
            recipe = with_values(train_weights(params), values, epochs=epochs, num_threads=threads)
            result = train(params.paths.data / "curate", params=recipe, out_dir=folder / "model", seed=params.seed,
                           cache_dir=folder, on_epoch=on_epoch)
            resumed = read_json(folder / "model" / "model.json").get("resumed_after_epoch")
            outcome.update(state="COMPLETE", value=result.best_val_accuracy, resumed_after_epoch=resumed)
        except optuna.TrialPruned as e:
            outcome.update(state="PRUNED", value=None, reason=str(e))
        except Exception as e:  # noqa: BLE001 -- a recipe that cannot train (bad combination, OOM) fails its trial
            traceback.print_exc()
            outcome.update(state="FAIL", value=None, reason=f"{type(e).__name__}: {e}")
        outcome.update(seconds=round(time.perf_counter() - t0, 3), optuna_seconds=talk["seconds"],
                       epochs_run=talk["epochs"])
        shutil.rmtree(folder, ignore_errors=True)  # finished: its checkpoints can go
        return outcome

    return run, values


def direct(number: int, values: dict, run: Callable[[], dict]) -> dict:
    return run()


# ---- a worker: ask, train, tell, until the study has its trials --------------------------

def run_worker(params: Params, name: str, *, index: int = 0, threads: int | None = None,
               deadline: float | None = None, run_trial: Callable = direct) -> list[dict]:
    """Run trials of study `name` until `tune.trials` are counted or `deadline` (epoch seconds).

    run_trial(number, values, run) runs one trial's `run()` and returns its outcome; the
    Prefect flow passes one that makes each trial a task run. Returns one record per trial
    run here: number, state, value, seconds (ask to tell) and optuna_seconds (time in Optuna).
    """
    from optuna.trial import TrialState

    tp = params.tune
    threads = threads or params.train.num_threads
    study, records = load_study(params, name, worker=index), []
    while deadline is None or time.time() < deadline:
        t_ask = time.perf_counter()
        fail_stale_trials(study, tp)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if len(counted(trials)) >= tp.trials and not waiting:
            break
        trial = study.ask()
        trial.set_user_attr("worker", owner())
        trial.set_user_attr("epochs_requested", trial_epochs(params))
        before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(before) >= tp.trials:  # another worker took the last slot at the same moment
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        run, values = _objective(trial, params, name, threads)
        talk = time.perf_counter() - t_ask
        print(f"trial {trial.number} (worker {index}): {values}", flush=True)
        with Heartbeat(study._storage, trial._trial_id, tp.heartbeat_s) as beat:
            outcome = run_trial(trial.number, values, run)
        t_tell = time.perf_counter()
        for key in ("seconds", "epochs_run", "resumed_after_epoch", "reason"):
            if outcome.get(key) is not None:
                trial.set_user_attr(key if key != "reason" else "fail_reason", outcome[key])
        state = TrialState[outcome["state"]]
        study.tell(trial, outcome["value"] if state == TrialState.COMPLETE else None,
                   state=None if state == TrialState.COMPLETE else state)
        talk += time.perf_counter() - t_tell + outcome["optuna_seconds"] + beat.seconds
        records.append({"number": trial.number, "state": outcome["state"], "value": outcome["value"],
                        "epochs_run": outcome["epochs_run"], "train_seconds": outcome["seconds"],
                        "seconds": round(time.perf_counter() - t_ask, 3), "optuna_seconds": round(talk, 4)})
        print(f"trial {trial.number}: {outcome['state']} value={outcome['value']} "
              f"epochs={outcome['epochs_run']}/{trial_epochs(params)} in {outcome['seconds']:.1f}s", flush=True)
    return records


# ---- the stage ----------------------------------------------------------------------------

def _check_runnable(params: Params, curate_dir: Path) -> str:
    """The curated version to sweep on; TuneError when the sweep cannot run."""
    from tasks.train import dataset_task

    if not params.tune.space:
        raise TuneError("tune.enabled: true needs tune.space (e.g. lr: {type: float, low: 1e-4, high: 1e-2, log: true})")
    if params.train.val_fraction <= 0:
        raise TuneError("tune needs train.val_fraction > 0: trials are scored and pruned on the val split")
    if dataset_task(curate_dir) != "classification":
        raise TuneError(f"{curate_dir}: tune sweeps classification training only (this version is detection)")
    return read_json(curate_dir / "curation.json")["curated_version"]


def study_for(params: Params) -> str:
    """The name of the study this sweep runs or resumes; TuneError when it cannot run."""
    return study_name(params, _check_runnable(params, params.paths.data / "curate"))


def _spawn_workers(params: Params, name: str, *, threads: int, deadline: float | None,
                   worker_cmd: list[str]) -> list[subprocess.Popen]:
    """Workers 1..N-1 as processes of `worker_cmd` (python -m tasks.tune worker, or the flow's)."""
    spec = params.paths.cache / "tune" / name / "params.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(params.model_dump_json(by_alias=True))
    gpus = _gpu_count(params)
    return [subprocess.Popen([*worker_cmd, "--params", str(spec), "--study", name, "--index", str(i),
                              "--threads", str(threads), "--deadline", str(deadline or 0)],
                             # several GPUs: worker i gets GPU i mod count (worker 0, here, the first)
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else None)
            for i in range(1, params.tune.workers)]


def _gpu_count(params: Params) -> int:
    if params.train.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def _summarize(params: Params, name: str, out_dir: Path, report_dir: Path, seconds: float) -> TuneResult:
    """best.json, tune.json and the report from the study as it now stands."""
    from optuna.trial import TrialState

    from tasks.tune_report import pruning_savings, write_tune_report

    study = load_study(params, name)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s: sum(t.state == TrialState[s] for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    if not complete:
        reasons = sorted({t.user_attrs.get("fail_reason", "?") for t in trials if t.state == TrialState.FAIL})
        raise TuneError(f"study {name}: no trial completed ({counts}); failures: {reasons[:5]}")
    best = study.best_trial
    best_info = {"study": name, "trial": best.number, "value": best.value, "params": best.params,
                 "epochs": trial_epochs(params), "storage": storage_label(params)}
    savings = pruning_savings(study, epochs_requested=trial_epochs(params))
    atomic_write_json(out_dir / "best.json", best_info)
    atomic_write_json(out_dir / "tune.json", {
        "enabled": True, "study": name, "storage": storage_label(params), "trials_requested": params.tune.trials,
        "counts": counts, "pruning": savings, "best": best_info, "seconds": round(seconds, 2)})
    write_tune_report(study, report_dir, epochs_requested=trial_epochs(params), storage=storage_label(params),
                      best={**best_info, "final_model": "data/train (train stage, on train+val)"})
    return TuneResult(True, name, best.value, best.params, counts["COMPLETE"], counts["PRUNED"], counts["FAIL"])


def tune(params: Params, *, out_dir: Path, report_dir: Path, run_trial: Callable = direct,
         worker_cmd: list[str] | None = None) -> TuneResult:
    """Run (or resume) the sweep of `tune:` on data/curate; write best.json and the report.

    run_trial:  wraps each trial run in this process (see run_worker).
    worker_cmd: the command of workers 1..N-1 (default `python -m tasks.tune worker`); each
                gets --params FILE --study NAME --index I --threads T --deadline S.
    Raises TuneError when the sweep cannot run, its storage stays locked (LOCK_TIMEOUT_S) or is
    down, a worker fails, or no trial completes; the previous outputs stay until the storage answers.
    """
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    if not params.tune.enabled:  # the same outputs either way, so the stage graph does not change
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(report_dir, ignore_errors=True)
        atomic_write_json(out_dir / "tune.json", {"enabled": False})
        atomic_write_text(report_dir / "index.html", OFF_PAGE)
        return TuneResult(False)
    t0 = time.perf_counter()
    name = study_for(params)
    with storage_errors(params):
        create_study(params, name)  # first: a locked or down storage leaves the previous outputs alone
        shutil.rmtree(out_dir, ignore_errors=True)  # no stale best.json from an earlier sweep
        print(f"study {name} on {storage_label(params)}", flush=True)
        tp = params.tune
        deadline = time.time() + tp.timeout_s if tp.timeout_s else None
        threads = max(1, params.train.num_threads // tp.workers)  # each worker its share of the cores
        workers = _spawn_workers(params, name, threads=threads, deadline=deadline,
                                 worker_cmd=worker_cmd or [sys.executable, "-m", "tasks.tune", "worker"])
        try:
            run_worker(params, name, index=0, threads=threads, deadline=deadline, run_trial=run_trial)
        finally:
            codes = [w.wait() for w in workers]
        if any(codes):
            raise TuneError(f"study {name}: worker exit codes {codes}; re-run the stage to resume the study")
        return _summarize(params, name, out_dir, report_dir, time.perf_counter() - t0)


def run(params: Params, **kwargs) -> TuneResult:
    return tune(params, out_dir=params.paths.data / "tune", report_dir=params.paths.reports / "tune", **kwargs)


def parse_worker_args(argv: list[str]) -> dict:
    """`worker --params FILE --study NAME [--index I] [--threads T] [--deadline EPOCH_S]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.tune worker",
                                 description="Run trials of one study (another machine: same storage).")
    ap.add_argument("--params", required=True, help="Params as JSON (written by the tune stage)")
    ap.add_argument("--study", required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=0, help="no new trial after this time (0: none)")
    a = ap.parse_args(argv)
    params = Params.model_validate_json(Path(a.params).read_text())
    return {"params": params, "name": a.study, "index": a.index, "threads": a.threads,
            "deadline": a.deadline or None}


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    argv = list(argv or [])
    if argv[:1] == ["worker"]:
        args = parse_worker_args(argv[1:])
        run_worker(args.pop("params"), args.pop("name"), **args)
        return 0
    r = run(load_params(overrides=argv))
    if not r.enabled:
        print("tune: off (tune.enabled: false)")
    else:
        print(f"study {r.study}: best val accuracy {r.best_value:.4f} with {r.best_params} "
              f"({r.n_complete} complete, {r.n_pruned} pruned, {r.n_failed} failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
