"""FiftyOne's database as an explicit service: start, stop, loopback only, bounded failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tasks import fo_service
from tasks.params import DatabaseParams
from tests.conftest import ROOT, TEST_DB, _free_port


def _listening(pid: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]


def test_session_database_is_the_project_mongod_on_loopback():
    info = fo_service.status(TEST_DB)
    assert info["reachable"] and info["managed"] and info["pid"]
    proc = psutil.Process(info["pid"])
    assert proc.name() == "mongod" and str(TEST_DB.dbpath) in proc.cmdline()
    assert set(_listening(info["pid"])) == {"127.0.0.1"}


def test_concurrent_starts_give_one_mongod_and_stop_ends_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")
    spec = fo_service.spec_for(DatabaseParams(port=_free_port(), dir=tmp_path / "db", cache_size_gb=0.25))
    assert spec.managed and spec.uri.startswith("mongodb://127.0.0.1:")
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: fo_service.start(spec), range(3)))
        assert sorted(r["action"] for r in results) == ["running", "running", "started"]
        assert len({r["pid"] for r in results}) == 1
        assert fo_service.start(spec)["action"] == "running"   # idempotent
    finally:
        stopped = fo_service.stop(spec)
    assert stopped["action"] == "stopped" and not stopped["reachable"]
    assert not psutil.pid_exists(results[0]["pid"]) or psutil.Process(results[0]["pid"]).status() == "zombie"


def test_down_database_fails_fast_and_says_how_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")
    spec = fo_service.spec_for(DatabaseParams(port=_free_port(), dir=tmp_path / "db", timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(fo_service.DatabaseUnavailable, match="pixelops db start") as err:
        fo_service.ensure_reachable(spec)
    assert time.monotonic() - start < 5
    assert "data/ is unaffected" in str(err.value)


def test_curate_stage_with_database_down_exits_with_the_message(tmp_path, ingested):
    """The stage's own entry point, in a fresh process: bounded, readable, no outputs."""
    params, _ = ingested
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_DATABASE_URI"}
    cmd = [sys.executable, "-m", "tasks.curate", f"paths.data={params.paths.data}",
           f"curate.database.port={_free_port()}", "curate.database.timeout_s=1",
           f"paths.cache={tmp_path / 'cache'}", f"paths.curation={tmp_path / 'curation'}",
           f"paths.versions={tmp_path / 'versions.jsonl'}"]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "did not answer within 1 s" in done.stderr and "pixelops db start" in done.stderr
    assert time.monotonic() - start < 60


def test_a_users_own_database_is_never_started_or_stopped(monkeypatch):
    monkeypatch.setenv("FIFTYONE_DATABASE_URI", TEST_DB.uri)
    spec = fo_service.spec_for(DatabaseParams(port=_free_port()))
    assert not spec.managed and spec.uri == TEST_DB.uri
    assert fo_service.start(spec)["action"] == "external"
    with pytest.raises(fo_service.DatabaseUnavailable, match="not the project's own database"):
        fo_service.stop(spec)
