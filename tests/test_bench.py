"""bench/: every benchmark is listed, and one runs end to end writing its ratios and raw figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS, main


def test_list_names_every_benchmark(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("pipeline", "ingest", "augment", "train_step", "train", "seed_recipe", "detection"):
        assert name in BENCHMARKS and name in out


def test_registered_benchmark_without_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(BENCHMARKS, "not_written_yet", "a benchmark whose module is missing")
    assert main(["not_written_yet"]) == 2
    err = capsys.readouterr().err
    assert "bench/not_written_yet.py does not exist" in err and "augment" in err


def test_augment_writes_ratios_and_raw_timings(tmp_path, capsys):
    assert main(["augment", "--size", "512", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "augment.json").read_text())
    assert figures["cores"] >= 1 and figures["images"] == 512
    assert set(figures["seconds"]) == {"per_sample_v2", "batched_preset"}
    (name, ratio), = figures["ratios"].items()
    assert ratio > 0 and name in capsys.readouterr().out


def test_curate_measures_load_resync_and_brain_steps(ingested):
    """Two tiny scales against the session's database: every step runs and is reported."""
    import math
    import os
    from pathlib import Path

    from bench import curate

    params, result = ingested
    figures = curate.run(scales=(200, 400), params=params, ingest_dir=Path(result.out_dir),
                         database_uri=os.environ["FIFTYONE_DATABASE_URI"], repeats=1)
    assert figures["scales"] == [200, 400] and figures["embedding"]["n"] == 400
    for n in ("200", "400"):
        step = figures["per_scale"][n]
        assert (step["load"]["action"], step["resync"]["action"]) == ("created", "unchanged")
        assert set(step["signals"]["calls"]) == set(curate.BRAIN_CALLS)
        assert min(step[s]["peak_rss_mb"] for s in ("load", "resync", "signals")) > 0
        assert step["load"]["mongod"]["peak_rss_mb"] > 0  # the session mongod, found by its port
    assert figures["scaling"]["steps"]["load"]["time_exponent"] is not None
    assert figures["ratios"] and all(math.isfinite(v) for v in figures["ratios"].values())


# Shrunk so a bench run takes seconds: one thread, small batches (params.yaml otherwise).
TINY_TRAIN = ["train.num_threads=1", "train.batch_size=32", "train.device=cpu"]


@pytest.fixture
def curated_tiny(ingested, tmp_path):
    """The session's tiny ingested version as a curate folder (nothing excluded)."""
    import shutil

    from tasks.io import atomic_write_json

    _, result = ingested
    shutil.copy(Path(result.out_dir) / "manifest.parquet", tmp_path / "manifest.parquet")
    atomic_write_json(tmp_path / "curation.json", {"version": result.version, "images_root": result.out_dir})
    return tmp_path


def test_train_bench_reports_trainer_over_bare_and_finetune_modes(curated_tiny):
    from bench import train

    figures = train.run(size=64, source=curated_tiny, repeats=1, epochs=1, overrides=TINY_TRAIN, detection=False)
    t = figures["throughput"]
    assert len(t["bare_images_per_second"]) == 2 and len(t["trainer_images_per_second"]) == 1
    assert min(t["bare_images_per_second"] + t["trainer_images_per_second"]) > 0
    f = figures["finetune"]
    assert set(f["modes"]) == {"linear_probe", "full"} and f["n_test"] == 64
    assert 0 < f["trainable_parameters"]["linear_probe"] < f["trainable_parameters"]["full"]
    assert all(0 <= m["test_accuracy"] <= 1 for m in f["modes"].values())
    assert figures["detection"] == "skipped"
    ratios = figures["ratios"]
    assert ratios["trainer / bare loop (images/s, training loop)"] > 0
    assert ratios["linear_probe / full (training seconds)"] > 0
    assert all(math.isfinite(v) for v in ratios.values())


@pytest.mark.parametrize("target", [0.0, 1.01])
def test_seed_recipe_reports_speedup_or_its_lower_bound(curated_tiny, target):
    """Target 0: both reach it at once (a speed-up); above 1: neither does (no figure, honestly)."""
    from bench import seed_recipe

    figures = seed_recipe.run(size=64, source=curated_tiny, n_test=64, target=target, cap_seconds=0.5,
                              eval_every=1, max_epochs=1, overrides=TINY_TRAIN)
    assert figures["image_size"]["seed_recipe"] == figures["image_size"]["platform"] == 32
    assert figures["weights"]["sha256"].startswith("b0353104")
    for side in ("platform", "seed_recipe"):
        assert figures[side]["seconds"] > 0 and 0 <= figures[side]["test_accuracy"] <= 1
    assert figures["platform"]["reached"] is (target == 0.0)
    assert (figures["speedup"] is not None) is (target == 0.0)
    assert figures["ratios"] and all(math.isfinite(v) and v >= 0 for v in figures["ratios"].values())


def test_train_bench_nests_detection_figures(monkeypatch, tmp_path):
    """bench/detection.py's run(size, out) gets its own folder under `out`; its ratios join the table."""
    import importlib.machinery
    import sys
    import types

    from bench import train

    calls = []
    fake = types.ModuleType("bench.detection")
    fake.__spec__ = importlib.machinery.ModuleSpec("bench.detection", None)
    fake.run = lambda size=None, out=None: calls.append(out) or {"ratios": {"map trained / untrained": 2.0}}
    monkeypatch.setitem(sys.modules, "bench.detection", fake)
    assert train._detection(tmp_path)["ratios"] == {"map trained / untrained": 2.0}
    assert calls == [tmp_path / "detection"]


def test_tune_bench_compares_pruning_with_none(curated_tiny):
    from bench import tune

    figures = tune.run(size=100, source=curated_tiny, trials=4, epochs=2, arms=("none", "median"),
                       overrides=TINY_TRAIN)
    none, median = figures["arms"]["none"], figures["arms"]["median"]
    assert none["trials"] == median["trials"] == 4
    assert none["epochs_trained"] == 8 and none["n_pruned"] == 0  # no pruner: every epoch runs
    assert median["epochs_trained"] == sum(r["epochs_run"] for r in median["trials_table"]) <= 8
    ratios = figures["ratios"]
    assert ratios["median: epochs ÷ none"] == round(median["epochs_trained"] / 8, 3)
    assert 0 < ratios["none: optuna s ÷ trial s"] < 1 and 0 < ratios["median: optuna s ÷ trial s"] < 1
    assert all(math.isfinite(v) for v in ratios.values())
