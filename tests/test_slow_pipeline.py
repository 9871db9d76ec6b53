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
    _full_report_loads_offline(project, tmp_path)


def _full_report_loads_offline(project, tmp_path) -> None:
    """The default run's report holds every section and renders in headless Chromium, offline:
    no failed request, every image (plots and the mistakes gallery) decoded, no console error."""
    from tests.browser import Browser

    page = project / "reports" / "evaluate" / "index.html"
    html = page.read_text()
    for section in ("Since the previous run", "Lineage", "Per class", "Confusion matrix", "Calibration",
                    "Most confident mistakes", "Training"):
        assert f"<h2>{section}</h2>" in html, section
    card = (project / "reports" / "evaluate" / "model_card.md").read_text()
    lineage = json.loads((project / "reports" / "evaluate" / "lineage.json").read_text())
    assert lineage["dataset_version"] in card
    with Browser(tmp_path / "chromium") as browser:
        check = browser.check(page, tmp_path / "report.png")
    assert not check.problems(), check.problems()
    assert check.n_images >= 3 + 24  # confusion, reliability, training curve, the 24-image gallery
