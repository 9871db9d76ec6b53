"""Every server the project starts listens on loopback only, by default.

Checked elsewhere, with psutil, started the way users start them:
    the Prefect server, `pixelops server start`           tests/test_serve.py
    FiftyOne's database, tasks.fo_service                  tests/test_fo_service.py
    the FiftyOne App, `python -m tasks.fo_app --port N`    tests/test_app.py
Here: the defaults (params.yaml and the code's), the App as `pixelops app` starts it, the
session's mongod with its children, Prefect's ephemeral API server (what a flow starts when no
server is set) and the Dask cluster of `flows.ingest --dask-workers N`. optuna-dashboard is not a
dependency: the sweep report only prints the command to run it.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil

from tasks import curate, fo_app, fo_service
from tasks.params import DatabaseParams, ServerParams, load_params
from tests.conftest import TEST_DB, _free_port
from tests.test_app import first_line

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1"}


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every inet socket the process and its children listen on."""
    root = psutil.Process(pid)
    found = set()
    for proc in (root, *root.children(recursive=True)):
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # a short-lived helper child
            continue
    return found


def _assert_loopback_only(listening: set[tuple[str, int]]) -> None:
    assert listening, "nothing is listening"
    assert {ip for ip, _ in listening} <= LOOPBACK, f"listening beyond loopback: {sorted(listening)}"


def test_defaults_are_loopback(monkeypatch):
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")  # the session's; a user's default has none
    params = load_params(ROOT / "params.yaml")
    assert params.server.host == ServerParams().host == "127.0.0.1"  # `pixelops server start` / `serve`
    assert params.curate.database.uri is None  # the project's own mongod, which fo_service binds:
    assert fo_service.LOOPBACK == "127.0.0.1"
    spec = fo_service.spec_for(params.curate.database)
    assert spec.uri == f"mongodb://127.0.0.1:{params.curate.database.port}"
    # the App: no host in params.yaml (only curate.app_port); `pixelops app` serves on this
    assert fo_app.LOOPBACK == "127.0.0.1"
    assert curate.launch_app.__kwdefaults__["address"] == "127.0.0.1"
    assert fo_app.serve_app.__kwdefaults__["address"] == "127.0.0.1"
    assert fo_app.serve_app.__kwdefaults__["allow_remote"] is False
    from prefect.settings import get_current_settings

    runner = get_current_settings().runner.server  # `pixelops serve` starts no webserver of its own
    assert runner.enable is False and runner.host in ("localhost", "127.0.0.1")
    deps = (ROOT / "pyproject.toml").read_text() + (ROOT / "requirements.lock").read_text()
    assert "optuna-dashboard" not in deps and "optuna_dashboard" not in deps  # nothing to bind


def test_session_database_listens_on_loopback_only():
    pid = fo_service.status(TEST_DB)["pid"]
    assert pid, "the session's mongod is not running"
    listening = _listening(pid)
    _assert_loopback_only(listening)
    assert ("127.0.0.1", TEST_DB.port) in listening


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    return first_line(proc, lines, timeout_s)


def test_pixelops_app_listens_on_loopback_only(tmp_path):
    """`pixelops app` as a user runs it (params.yaml defaults; only the port is a free one, so a
    running App on 5151 cannot make this fail), on a small persistent dataset."""
    from PIL import Image

    fo = fo_service.connect(DatabaseParams())  # the session database (FIFTYONE_DATABASE_URI)
    version = f"bind{uuid.uuid4().hex[:8]}"
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.new("L", (28, 28)).save(image)
    dataset = fo.Dataset(curate.dataset_name(load_params(ROOT / "params.yaml").curate.dataset_prefix, version),
                         persistent=True)
    dataset.add_sample(fo.Sample(filepath=str(image)))
    port, log = _free_port(), (tmp_path / "app.stderr").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pixelops.cli", "app", "--version", version, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = _first_line(proc, timeout_s=90)
        assert line.startswith(f"FiftyOne App for {dataset.name}: http://127.0.0.1:{port}/"), line
        listening = _listening(proc.pid)
        _assert_loopback_only(listening)
        assert ("127.0.0.1", port) in listening
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        dataset.delete()


_EPHEMERAL_FLOW = """
import json, os
import psutil
from prefect import flow

@flow
def listening() -> list:
    me = psutil.Process(os.getpid())
    return sorted({(c.laddr.ip, c.laddr.port) for p in (me, *me.children(recursive=True))
                   for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})

print(json.dumps(listening()))
"""


def test_prefect_ephemeral_server_listens_on_loopback_only(tmp_path):
    """A flow run with no PREFECT_API_URL (`python -m flows.pipeline`) starts Prefect's API as a
    child process; from inside a flow, that tree listens on loopback only."""
    script = tmp_path / "flow.py"
    script.write_text(_EPHEMERAL_FLOW)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, check=False, env={**env, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 0, done.stderr[-3000:]
    listening = {(ip, port) for ip, port in json.loads(done.stdout.strip().splitlines()[-1])}
    _assert_loopback_only(listening)


def test_dask_cluster_of_the_ingest_flow_listens_on_loopback_only():
    from flows.ingest import dask_runner

    with dask_runner(1) as runner:
        client = runner.client  # the runner starts its cluster on first use
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        listening = _listening(os.getpid())
        _assert_loopback_only(listening)
        workers = client.scheduler_info()["workers"]
        assert workers and all(w.startswith("tcp://127.0.0.1:") for w in workers)
