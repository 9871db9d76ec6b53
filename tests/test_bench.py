"""bench/: every benchmark is listed, and one runs end to end writing its ratios and raw figures."""

from __future__ import annotations

import json

from bench.__main__ import BENCHMARKS, main


def test_list_names_every_benchmark(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("pipeline", "ingest", "augment", "train_step"):
        assert name in BENCHMARKS and name in out


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
