"""The Prefect flow and `dvc repro` on one tiny real project: same work, one notion of done.

A temporary project (git + DVC, a copy of tasks/ and dvc.yaml, params.yaml shrunk) runs the
flow under Prefect's test harness, then DVC is asked in-process and by its CLI.
"""

from __future__ import annotations

import json

import pytest

from bench.project import dvc, make_project, set_param
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _project(tmp, extra=()):
    return make_project(tmp / "project", [*TINY_OVERRIDES, "curate.dataset_prefix=flowtest", *extra])


def _ran(result):
    return [s["stage"] for s in result["stages"] if not s["skipped"]]


def _assert_fiftyone_shows_the_same_accuracy(project) -> None:
    """Predictions are written back to FiftyOne with its own evaluation run of the test split,
    whose accuracy is the report's (same model, same kept test samples)."""
    import fiftyone as fo

    review = json.loads((project / "data" / "review" / "review.json").read_text())
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    ev = review["fiftyone_evaluation"]
    assert ev["n"] == metrics["n_test"]
    assert abs(ev["accuracy"] - metrics["accuracy"]) <= 1 / metrics["n_test"]  # at most one near-tie flips
    dataset = fo.load_dataset(review["dataset_name"])
    assert ev["eval_key"] in dataset.list_evaluations()
    assert dataset.count_values(f"{ev['eval_key']}")[True] == round(metrics["accuracy"] * metrics["n_test"])


def _assert_result_artifacts(project) -> None:
    """The flow run shows the summary, the per-class table and a link to the report page."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["pipeline-summary", "per-class-metrics", "evaluation-report"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    latest = {}
    for a in sorted(found, key=lambda a: a.created):
        latest[a.key] = a
    assert set(latest) == set(keys)
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.4f}" in latest["pipeline-summary"].data
    table = json.loads(latest["per-class-metrics"].data) if isinstance(latest["per-class-metrics"].data, str) \
        else latest["per-class-metrics"].data
    assert {r["class"] for r in table} == set(metrics["per_class"])
    assert (project / "reports" / "evaluate" / "index.html").resolve().as_uri() in latest["evaluation-report"].data


def test_flow_and_dvc_agree(harness, tmp_path, monkeypatch):
    from dvc.repo import Repo

    from flows.pipeline import pipeline

    tmp = _project(tmp_path)
    monkeypatch.chdir(tmp)
    first = pipeline()
    assert _ran(first) == ["ingest", "validate", "pretrain", "curate", "tune", "train", "evaluate", "review",
                          "export"]
    assert (tmp / "reports" / "metrics.json").is_file()
    _assert_result_artifacts(tmp)
    _assert_fiftyone_shows_the_same_accuracy(tmp)
    with Repo(str(tmp)) as repo:
        assert repo.status() == {}  # the flow's work is recorded in dvc.lock

    repro = dvc(tmp, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "didn't change, skipping" in repro.stdout and "Running stage" not in repro.stdout

    assert _ran(pipeline()) == []  # nothing changed: every stage skipped

    set_param(tmp, "train.lr", 0.002)  # tune's base recipe too: with the sweep off, a no-op rerun
    assert _ran(pipeline()) == ["tune", "train", "evaluate", "review", "export"]

    set_param(tmp, "train.lr", 0.001)
    repro = dvc(tmp, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Running stage 'train'" in repro.stdout and "Running stage 'ingest'" not in repro.stdout
    # history.jsonl is a persisted output: dvc repro keeps it, so the report compares with the flow's run
    cmp = json.loads((tmp / "reports" / "evaluate" / "metrics.json").read_text())["comparison"]
    assert cmp["params_changed"]["lr"] == [0.002, 0.001] and not cmp["data"]["changed"]
    assert _ran(pipeline()) == []  # after dvc repro, the flow does no stage work


def test_failing_validation_stops_the_flow(harness, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from tasks.validate import ValidationFailed

    tmp = _project(tmp_path, ["validate.min_per_class=1000"])
    monkeypatch.chdir(tmp)
    with pytest.raises(ValidationFailed, match="min_per_class"):
        pipeline()
    assert not (tmp / "data" / "curate").exists()  # nothing downstream ran
    summary = json.loads((tmp / "reports" / "validate" / "summary.json").read_text())
    assert summary["success"] is False
