"""Pruning's savings and Optuna's overhead on a real sweep: the same study with and without a pruner.

Data: `size` train images (default 3,000) sampled with seed 0 from the curated version
(data/curate) into a temp curate folder (bench.train.make_subset); 15% of them are carved out
as the val split that scores and prunes trials.
Sweep: params.yaml's `tune.space` and `train:` recipe, TPE with seed 0, `trials` trials of
`epochs` epochs (default 16 × 5), 3 startup trials, one worker in this process, every arm
a fresh study on its own journal file. Arms: pruner none (the baseline), median, hyperband,
successive_halving (asynchronous successive halving, reduction factor 3).

Figures per pruned arm, against the baseline measured in the same run:
- epochs_ratio: epochs trained ÷ the baseline's (goal ≤ 0.5)
- best_val_gap: baseline best val accuracy − this arm's (goal ≤ 0.005)
- wall_ratio: the arm's sweep seconds ÷ the baseline's
and per arm optuna_overhead: seconds in Optuna calls (ask, tell, report, should_prune,
stale checks, heartbeat stamps) ÷ trial seconds (goal ≤ 0.01).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from tasks.io import atomic_write_json, read_json
from tasks.params import load_params

DEFAULT_SIZE = 3000
ARMS = ("none", "median", "hyperband", "successive_halving")


def _params(root: Path, pruner: str, *, trials: int, epochs: int, overrides: list[str]):
    return load_params(overrides=[
        f"paths.data={root / 'data'}", f"paths.cache={root / pruner / 'cache'}",
        f"paths.reports={root / pruner / 'reports'}", "tune.enabled=true", f"tune.trials={trials}",
        f"tune.epochs={epochs}", "tune.startup_trials=3", "tune.warmup_epochs=1", "tune.sampler=tpe",
        f"tune.pruner={pruner}", "tune.workers=1", "train.val_fraction=0.15", "seed=0",
        f"train.num_threads={min(2, os.cpu_count() or 1)}", *overrides])


def _arm(root: Path, pruner: str, *, trials: int, epochs: int, overrides: list[str]) -> dict:
    from tasks import tune

    params = _params(root, pruner, trials=trials, epochs=epochs, overrides=overrides)
    name = tune.study_for(params)
    tune.create_study(params, name)
    t0 = time.perf_counter()
    records = tune.run_worker(params, name)
    wall = time.perf_counter() - t0
    values = [r["value"] for r in records if r["state"] == "COMPLETE"]
    trial_s = sum(r["seconds"] for r in records)
    return {"pruner": pruner, "trials": len(records), "epochs_trained": sum(r["epochs_run"] for r in records),
            "epochs_requested": len(records) * epochs, "best_val_accuracy": max(values) if values else None,
            "n_pruned": sum(r["state"] == "PRUNED" for r in records), "seconds": round(wall, 1),
            "optuna_seconds": round(sum(r["optuna_seconds"] for r in records), 3),
            "optuna_overhead": round(sum(r["optuna_seconds"] for r in records) / trial_s, 5),
            "trials_table": records}


def run(size: int | None = None, *, trials: int = 16, epochs: int = 5,
        arms: tuple[str, ...] = ARMS, source: Path | None = None, overrides: list[str] = ()) -> dict:
    """The figures above; `overrides` (params.yaml `-S` style) apply to every arm."""
    from bench.train import default_source, make_subset

    size = size or DEFAULT_SIZE
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-tune-") as tmp:
        root = Path(tmp)
        curate = make_subset(source or default_source(), root / "data" / "curate", n_train=size, n_test=1)
        info = read_json(curate / "curation.json")
        atomic_write_json(curate / "curation.json", {**info, "curated_version": info["version"]})
        results = {arm: _arm(root, arm, trials=trials, epochs=epochs, overrides=list(overrides)) for arm in arms}
    base = results["none"]
    ratios = {}
    for arm, r in results.items():
        if arm != "none":
            ratios[f"{arm}: epochs ÷ none"] = round(r["epochs_trained"] / base["epochs_trained"], 3)
            ratios[f"{arm}: best val gap to none"] = round(base["best_val_accuracy"] - r["best_val_accuracy"], 4)
            ratios[f"{arm}: wall ÷ none"] = round(r["seconds"] / base["seconds"], 3)
        ratios[f"{arm}: optuna s ÷ trial s"] = r["optuna_overhead"]
    return {"size": size, "trials": trials, "epochs": epochs, "ratios": ratios, "arms": results}
