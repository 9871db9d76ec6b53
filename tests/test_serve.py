"""The Prefect server, served deployments with typed forms, a work pool with two process workers.

Everything is real and separate processes, as a user runs it: `pixelops server start` (Prefect's
server on 127.0.0.1), `pixelops serve`, `pixelops deploy --pool`, `prefect worker start`. Flow
runs are created through the API, as the UI's "Run" button does, and ingest a tiny real
Fashion-MNIST version into a throwaway project. Processes are stopped by PID: the ones that
run flows first, the server last.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from bench.project import dvc, make_project
from pixelops import server
from tests.conftest import TINY_OVERRIDES, _free_port


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1", **extra}


def _pixelops(project: Path, env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pixelops.cli", *args], cwd=project, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _server_info(home: Path) -> server.ServerInfo:
    return server.ServerInfo(**json.loads((home / server.STATE_FILE).read_text()))


def _listening(pid: int) -> set[str]:
    """Local addresses the process and its children listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {f"{c.laddr.ip}:{c.laddr.port}" for p in procs for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _client(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _wait_for(what: str, check, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _run_and_wait(url: str, name: str, parameters: dict, timeout: float = 300):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        return run_deployment(name, parameters=parameters, timeout=timeout, poll_interval=2)


def _project(tmp: Path, name: str, port: int) -> Path:
    return make_project(tmp / name, [*TINY_OVERRIDES, f"server.port={port}", "ingest.limit_per_split=40"])


def test_serve_deployments_run_one_from_the_api_stop_in_order(tmp_path):
    port = _free_port()
    project = _project(tmp_path, "project", port)
    home = tmp_path / "prefect-home"
    env = _env(home)

    out = _pixelops(project, env, "server", "start")
    info = _server_info(home)
    assert f"UI http://127.0.0.1:{port}" in out.stdout
    serve = None
    try:
        assert _listening(info.pid) == {f"127.0.0.1:{port}"}  # loopback only, nothing else opened
        serve = subprocess.Popen([sys.executable, "-m", "pixelops.cli", "serve"], cwd=project, env=env,
                                 stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT)
        with _client(info.url) as client:
            deployments = _wait_for("4 served deployments", lambda: (
                len(found := client.read_deployments()) == 4 and found))
        by_name = {d.name: d for d in deployments}
        assert set(by_name) == {"pipeline", "ingest", "curate", "tune"}
        # typed forms: each section is its params model, defaults from the project's params.yaml
        schema = by_name["pipeline"].parameter_openapi_schema
        assert {"TrainParams", "IngestParams", "CurateParams", "ValidateParams"} <= set(schema["definitions"])
        assert by_name["pipeline"].parameters["train"]["epochs"] == 1
        assert by_name["ingest"].parameters["root"] == str(project)

        form = {**by_name["ingest"].parameters["ingest"], "limit_per_split": 30}  # the UI sends the whole form
        run = _run_and_wait(info.url, "pixelops-ingest/ingest", {"ingest": form})
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])

        assert "limit_per_split: 30" in (project / "params.yaml").read_text()  # the form went into params.yaml
        version = json.loads((project / "data" / "ingest" / "version.json").read_text())
        assert version["per_split"] == {"test": 30, "train": 30}
        status = dvc(project, "status", "ingest")
        assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr

        # Stop in order: the served flows, then the server (which must still be up at that point).
        _stop(serve)
        assert serve.returncode is not None
        assert server.healthy(info.url)  # `serve` reused the server; it stops only one it started
    finally:
        if serve is not None:
            _stop(serve)
        _pixelops(project, env, "server", "stop")
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert not server.healthy(info.url)


def test_auth_string_refuses_unauthenticated_requests(tmp_path):
    port = _free_port()
    project = _project(tmp_path, "project", port)
    home = tmp_path / "prefect-home"
    env = _env(home, PREFECT_SERVER_API_AUTH_STRING="admin:correct-horse")
    _pixelops(project, env, "server", "start")
    info = _server_info(home)

    def post(auth: str | None) -> int:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        request = urllib.request.Request(f"{info.url}/flows/filter", data=b"{}", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert post(None) == 401
        assert post("admin:wrong") == 401
        assert post("admin:correct-horse") == 200
        # Prefect's own client, given the same string, is let in
        client_env = _env(home, PREFECT_API_URL=info.url, PREFECT_API_AUTH_STRING="admin:correct-horse")
        ok = subprocess.run([sys.executable, "-m", "prefect", "flow", "ls"], env=client_env, capture_output=True,
                            text=True, timeout=120, check=False)
        assert ok.returncode == 0, ok.stderr
        denied = subprocess.run([sys.executable, "-m", "prefect", "flow", "ls"], capture_output=True, text=True,
                                env=_env(home, PREFECT_API_URL=info.url), timeout=120, check=False)
        assert denied.returncode != 0
    finally:
        _pixelops(project, env, "server", "stop")


def test_work_pool_two_process_workers_run_submitted_flows(tmp_path):
    port = _free_port()
    projects = [_project(tmp_path, f"project-{i}", port) for i in range(2)]
    home = tmp_path / "prefect-home"
    env = _env(home)
    pool = "pixelops-test"
    _pixelops(projects[0], env, "server", "start")
    info = _server_info(home)
    workers = []
    try:
        worker_env = {**env, "PREFECT_API_URL": info.url}
        out = _pixelops(projects[0], worker_env, "deploy", "--pool", pool)
        assert f"registered on work pool '{pool}'" in out.stdout
        for i in range(2):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", f"worker-{i}",
                 "--type", "process"], env=worker_env, cwd=tmp_path,
                stdout=(tmp_path / f"worker-{i}.log").open("w"), stderr=subprocess.STDOUT))
        with _client(info.url) as client:
            _wait_for("2 workers polling the pool", lambda: len(client.read_workers_for_work_pool(pool)) == 2)
            deployment = client.read_deployment_by_name("pixelops-ingest/ingest")
        assert deployment.work_pool_name == pool

        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: info.url}):
            submitted = [run_deployment("pixelops-ingest/ingest", timeout=0,
                                        parameters={"root": str(p), "ingest": deployment.parameters["ingest"]})
                         for p in projects]
        with _client(info.url) as client:
            def finished():
                runs = [client.read_flow_run(r.id) for r in submitted]
                return runs if all(r.state.is_final() for r in runs) else None

            runs = _wait_for("both flow runs to finish", finished, timeout=400)
        logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
        for run in runs:
            assert run.state.is_completed(), (run.state, logs[-4000:])
            assert run.work_pool_name == pool and run.infrastructure_pid  # a worker started its process
        for p in projects:
            assert json.loads((p / "data" / "ingest" / "version.json").read_text())["n_images"] == 80
    finally:
        for w in workers:
            _stop(w)
        _pixelops(projects[0], env, "server", "stop")


@pytest.mark.parametrize("slots", [1])
def test_gpu_limit_serializes_model_tasks(tmp_path, slots):
    """Tasks holding the `gpu` limit never overlap beyond its slots (what a second GPU flow run meets)."""
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    from flows.concurrency import ensure_gpu_limit, gpu_slot
    from tests.conftest import tiny_params

    @task
    def hold(i: int) -> tuple[float, float]:
        with gpu_slot(True):
            t0 = time.monotonic()
            time.sleep(1.0)
            return t0, time.monotonic()

    @flow
    def two_trainings() -> list:
        assert ensure_gpu_limit(tiny_params(tmp_path), slots=slots)
        return [f.result() for f in hold.map(range(3))]

    with prefect_test_harness(server_startup_timeout=120):
        spans = sorted(two_trainings())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.05  # one at a time


def test_serve_alone_starts_the_server_and_stops_it_after_serving(tmp_path):
    """`pixelops serve` with no server up: starts one, and on SIGTERM stops serving, then it."""
    port = _free_port()
    project = _project(tmp_path, "project", port)
    home = tmp_path / "prefect-home"
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "pixelops.cli", "serve"], cwd=project, env=_env(home),
                             stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        info = _wait_for("the server record", lambda: (home / server.STATE_FILE).is_file() and _server_info(home))
        with _client(info.url) as client:
            _wait_for("4 served deployments", lambda: len(client.read_deployments()) == 4)
        assert psutil.pid_exists(info.pid)
    finally:
        _stop(serve)
    text = log.read_text()
    assert serve.returncode is not None and "Prefect server started" in text
    assert f"Prefect server stopped (pid {info.pid})" in text  # after serving ended, in serve's finally
    assert not server.healthy(info.url)
    assert not (home / server.STATE_FILE).exists()
