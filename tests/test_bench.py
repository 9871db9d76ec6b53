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
