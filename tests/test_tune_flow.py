"""The tune stage as Prefect flows (flows.tune), on a tiny real Fashion-MNIST version under
Prefect's test harness: every trial a `trial-<n>` task run with a table artifact, and the
second worker its own `pixelops-tune-worker` flow run on the same Prefect server."""

from __future__ import annotations

import json
import os

import pytest
from optuna.trial import TrialState

from tasks import tune
from tasks.params import dump_resolved
from tests.conftest import tiny_params
from tests.test_tune import _params, curated  # noqa: F401 (the same tiny version)

FLOW = ["tune.workers=2", "tune.trials=4", "tune.epochs=2", "train.num_threads=2"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_gpu_guard_off_on_cpu(tmp_path):
    from flows.concurrency import ensure_gpu_limit

    p = tiny_params(tmp_path, ["train.device=cpu"])
    assert ensure_gpu_limit(p) is False  # no client call, no concurrency limit on CPU


def test_tune_flow_two_workers_report_to_one_server(harness, curated, tmp_path, monkeypatch):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows.tune import _artifact_key, tune_flow

    # tune_wiring sets PREFECT_API_URL in os.environ for the worker processes: set-then-delete
    # records the variable's original state (here: absent) so monkeypatch restores it afterwards.
    monkeypatch.setenv("PREFECT_API_URL", "unset-by-this-test")
    monkeypatch.delenv("PREFECT_API_URL")

    p = _params(curated, tmp_path, FLOW)
    project = tmp_path / "project"
    project.mkdir()
    dump_resolved(p, project / "params.yaml")
    monkeypatch.chdir(project)  # as `cd project && python -m flows.tune`; the worker starts here too

    result = tune_flow(str(project))
    assert result["complete"] + result["pruned"] == 4 and result["failed"] == 0
    study = tune.load_study(p, result["study"])
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(trials) == 4
    numbers = {t.number for t in finished}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) <= 2

    # the worker reached the harness server, not an ephemeral one of its own
    with get_client(sync_client=True) as client:
        assert os.environ["PREFECT_API_URL"] == str(client.api_url)
        main = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pixelops-tune"])))
        workers = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pixelops-tune-worker"])))
        assert len(main) == 1 and main[0].state.is_completed()
        assert len(workers) == 1 and workers[0].state.is_completed()  # tune.workers=2: one more process
        ids = [main[0].id, *(w.id for w in workers)]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        by_name = {}
        for tr in task_runs:
            by_name.setdefault(tr.name, []).append(tr)
        assert set(by_name) == {f"trial-{n}" for n in numbers}, sorted(by_name)
        assert all(len(runs) == 1 and runs[0].state.is_completed() for runs in by_name.values())

        keys = {n: _artifact_key(result["study"], n) for n in numbers}
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys.values()))))
        by_key = {a.key: a for a in artifacts}
        assert set(by_key) == set(keys.values())
        for t in finished:
            a = by_key[keys[t.number]]
            assert a.type == "table"
            rows = json.loads(a.data) if isinstance(a.data, str) else a.data
            assert rows[0]["trial"] == t.number and rows[0]["state"] == t.state.name
            assert rows[0]["epochs_run"] == len(t.intermediate_values)
