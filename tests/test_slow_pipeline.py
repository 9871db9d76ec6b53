"""The default pipeline on the full Fashion-MNIST data, as `make run` runs it (slow: about 7 min).

Run with `make test-slow` (CI runs it after `make test`).
"""

from __future__ import annotations

import json

import pytest

from bench.project import dvc, make_project


@pytest.mark.slow
def test_default_pipeline_reaches_090_and_rerun_skips_everything(tmp_path):
    project = make_project(tmp_path / "project", [])
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["n_test"] == 10_000 and metrics["accuracy"] >= 0.90, metrics
    again = dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
