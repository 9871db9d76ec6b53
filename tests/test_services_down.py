"""Services down: FiftyOne's database, the Prefect server and an Optuna storage, each really stopped
or locked while a stage needs it.

Each case: the stage fails within a bound (measured here) with a message that names the service and
says what to do; nothing is lost (previous outputs unchanged, finished work kept); a re-run once the
service is back completes. Faults are real: a SIGKILLed or SIGTERMed mongod of the test's own (the
session's TEST_DB is never touched), a SIGKILLed Prefect server, a lock held by another process (and,
for the journal, a holder killed with the lock held, whose stale lock the next run removes).
The fault is injected at a fixed point (a stage function wrapped to stop the service first), so no
test depends on winning a race.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.project import make_project
from pixelops import server
from tasks import curate, curation, fo_service, ingest, tune, tune_study
from tasks.io import read_json
from tasks.params import DatabaseParams
from tests.conftest import ROOT, TINY_OVERRIDES, _free_port, tiny_params
from tests.postgres import postgres_url  # noqa: F401 (fixture)

# --------------------------------------------------------------------------- helpers


def _snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` (or the file itself), by path: what "nothing lost" compares."""
    files = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            files[str(path)] = path.read_bytes()
    return files


def _down_at(stderr: str) -> float:
    """The time the driver stopped the service (its `DOWN <epoch s>` line)."""
    down = [line.split()[1] for line in stderr.splitlines() if line.startswith("DOWN ")]
    assert down, f"the service was never stopped: {stderr[-3000:]}"
    return float(down[0])


def _line(stderr: str, prefix: str) -> str:
    """The process's message: its stderr line that starts with `prefix` (Prefect logs after it)."""
    return next((line for line in stderr.splitlines() if line.startswith(prefix)), stderr[-3000:])


def _run(cmd: list[str], *, cwd: Path, env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return done, time.time()


# --------------------------------------------------------------------------- FiftyOne's database

# Runs stage curate's own main(); with a fault point, the database goes down just before that
# function runs: `sync` (the first FiftyOne call after the stage's reachability check) or
# `signals` (mid-curation: the dataset is loaded and the embeddings computed).
CURATE_DRIVER = """
import os, signal, sys, time
from pathlib import Path
from tasks import curate, curate_fiftyone, curate_signals, fo_service

def database_down_first(fn, how, pidfile):
    def wrapper(*args, **kwargs):
        pid = int(Path(pidfile).read_text())
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
        while fo_service._alive(pid):
            time.sleep(0.05)
        print(f"DOWN {time.time()}", file=sys.stderr, flush=True)
        return fn(*args, **kwargs)
    return wrapper

if __name__ == "__main__":
    point, how, pidfile, *overrides = sys.argv[1:]
    if point == "sync":
        curate_fiftyone._open_matching = database_down_first(curate_fiftyone._open_matching, how, pidfile)
    elif point == "signals":
        curate_signals.compute = database_down_first(curate_signals.compute, how, pidfile)
    sys.exit(curate.main(overrides))
"""


def test_fiftyone_database_stopped_mid_curation(ingested, tmp_path, monkeypatch):
    _, ingest_result = ingested
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")  # this test's own mongod, not the session's
    spec = fo_service.spec_for(DatabaseParams(port=_free_port(), dir=tmp_path / "db", timeout_s=2, cache_size_gb=0.25))
    shutil.copytree(Path(ingest_result.out_dir), tmp_path / "data" / "ingest")
    out, registry, decisions = tmp_path / "data" / "curate", tmp_path / "versions.jsonl", tmp_path / "curation"
    overrides = [f"paths.data={tmp_path / 'data'}", f"paths.cache={tmp_path / 'cache'}", f"paths.curation={decisions}",
                 f"paths.versions={registry}", f"curate.database.port={spec.port}",
                 f"curate.database.dir={spec.dbpath}", f"curate.database.timeout_s={spec.timeout_s:g}",
                 "curate.database.cache_size_gb=0.25"]
    env = dict(os.environ)

    def curate_stage(point="none", how="none"):
        return _run([sys.executable, "-c", CURATE_DRIVER, point, how, str(spec.pidfile), *overrides], cwd=ROOT, env=env)

    try:
        fo_service.start(spec)
        done, _ = curate_stage()
        assert done.returncode == 0, done.stderr[-3000:]
        before = read_json(out / "curation.json")
        # A curator excludes one train image: the next run makes a new curated version.
        victim = pd.read_parquet(out / "manifest.parquet").query("split == 'train' and not excluded")["sample_id"].iloc[0]
        curation.write_decisions(curation.decisions_path(decisions, before["version"]), pd.DataFrame(
            [(victim, "exclude", None, "blurry", "curator:test")], columns=list(curation.DECISION_COLUMNS)))
        previous = _snapshot(out, decisions, registry)

        for point, how in [("sync", "kill"), ("signals", "stop")]:  # a crash, then a clean shutdown
            fo_service.start(spec)  # after SIGKILL: mongod recovers its journal
            done, ended = curate_stage(point, how)
            seconds = ended - _down_at(done.stderr)
            print(f"database {how} at {point}: stage failed {seconds:.1f} s later (timeout_s {spec.timeout_s:g})")
            assert done.returncode == 2, done.stderr[-3000:]
            message = _line(done.stderr, "curate: ")
            assert message.startswith(f"curate: FiftyOne's database at {spec.uri} stopped answering"), message
            assert "pixelops db start" in message and "curate.database.uri" in message and "re-run" in message
            assert "Traceback" not in done.stderr
            # pymongo alone waits 30 s per server selection (60 s for a retried read)
            assert seconds < 3 * spec.timeout_s + 10
            assert _snapshot(out, decisions, registry) == previous  # no output written, none half-written

        fo_service.start(spec)
        done, _ = curate_stage()
        assert done.returncode == 0, done.stderr[-3000:]
        after = read_json(out / "curation.json")
        assert after["n_excluded"] == before["n_excluded"] + 1 and after["curated_version"] != before["curated_version"]
        assert [e["version"] for e in ingest.load_registry(registry) if e.get("kind") == "curation"] == \
            [before["curated_version"], after["curated_version"]]
    finally:
        fo_service.stop(spec)


# --------------------------------------------------------------------------- the Prefect server

# The curate flow (ingest, validate, pretrain, curate), called as flows.pipeline.main() calls the
# pipeline: inside server.reachable_api(). With `kill`, the server is SIGKILLed as stage curate starts.
FLOW_DRIVER = """
import json, os, signal, sys, time

if __name__ == "__main__":
    from pixelops import server
    import tasks.curate as stage

    run = stage.run

    def server_down_first(params):
        info = server.status()
        os.killpg(info.pid, signal.SIGKILL)
        while server.healthy(info.url, 0.5):
            time.sleep(0.1)
        print(f"DOWN {time.time()}", file=sys.stderr, flush=True)
        return run(params)

    if sys.argv[1:] == ["kill"]:
        stage.run = server_down_first
    from flows.pipeline import curate_flow

    try:
        with server.reachable_api():
            result = curate_flow(".")
    except server.PrefectUnreachable as e:
        print(f"curate flow: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
"""
FLOW_STAGES = ["ingest", "validate", "pretrain", "curate"]


def test_prefect_server_unreachable_before_and_during_a_flow(tmp_path):
    port = _free_port()
    project = make_project(tmp_path / "project", [*TINY_OVERRIDES, "ingest.limit_per_split=40",
                                                  "validate.min_per_class=1", "curate.fiftyone=false",
                                                  f"server.port={port}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    url = f"http://127.0.0.1:{port}/api"
    pixelops = [sys.executable, "-m", "pixelops.cli"]

    # (b) PREFECT_API_URL names a dead port before the flow starts: the pipeline's own entry point.
    dead = f"http://127.0.0.1:{_free_port()}/api"
    started = time.time()
    done, ended = _run([sys.executable, "-m", "flows.pipeline"], cwd=project, env={**env, "PREFECT_API_URL": dead})
    print(f"dead API URL: the flow failed {ended - started:.1f} s after it was started")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert f"pipeline: the Prefect API at {dead} does not answer" in done.stderr
    assert "pixelops server start" in done.stderr and "unset PREFECT_API_URL" in done.stderr
    assert ended - started < 30
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()  # nothing ran

    # (a) the server dies mid-flow: Prefect 3 runs task runs client-side, so the stages finish
    # (each committed to dvc.lock); the flow fails when it reports its own state.
    flow_env = {**env, "PREFECT_API_URL": url}
    try:
        started_server, _ = _run([*pixelops, "server", "start"], cwd=project, env=env)
        assert started_server.returncode == 0, started_server.stderr
        done, ended = _run([sys.executable, "-c", FLOW_DRIVER, "kill"], cwd=project, env=flow_env)
        seconds = ended - _down_at(done.stderr)
        print(f"server SIGKILLed mid-flow: the flow failed {seconds:.1f} s later "
              f"(PREFECT_CLIENT_MAX_RETRIES={server.CLIENT_MAX_RETRIES})")
        assert done.returncode == 1, done.stdout + done.stderr[-3000:]
        message = _line(done.stderr, "curate flow: ")
        assert message.startswith(f"curate flow: the Prefect API at {url} stopped answering during the flow run")
        assert "pixelops server start" in message and "recorded in dvc.lock" in message
        assert seconds < 60  # Prefect's default 5 retries: over 70 s here
        assert list(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == FLOW_STAGES  # nothing lost

        restarted, _ = _run([*pixelops, "server", "start"], cwd=project, env=env)
        assert restarted.returncode == 0, restarted.stderr
        done, _ = _run([sys.executable, "-c", FLOW_DRIVER], cwd=project, env=flow_env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert [(s["stage"], s["skipped"]) for s in result["stages"]] == [(s, True) for s in FLOW_STAGES]
    finally:
        subprocess.run([*pixelops, "server", "stop"], cwd=project, env=env, capture_output=True, timeout=120,
                       check=False)


# --------------------------------------------------------------------------- an Optuna storage

SWEEP = ["curate.fiftyone=false", "train.num_threads=1", "tune.enabled=true", "tune.trials=2", "tune.epochs=1",
         "tune.startup_trials=1", "tune.heartbeat_s=1", "tune.stale_after_s=60"]
LOCK_TIMEOUT_S = 2.0

# Lock holders, each a process of its own that holds the lock until its stdin closes.
HOLD_JOURNAL = """
import sys
from pathlib import Path
from tasks.tune_study import JournalLock
lock = JournalLock(Path(sys.argv[1]), timeout_s=60)  # what every PixelOps process takes to append
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""
HOLD_SQLITE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""
HOLD_POSTGRES = """
import sys
import psycopg
with psycopg.connect(sys.argv[1]) as db:
    db.execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
    print("locked", flush=True)
    sys.stdin.read()
"""


class Holder:
    """A process holding a storage's lock; `release()` lets it go, `kill()` leaves a stale lock."""

    def __init__(self, code: str, target: str):
        self.proc = subprocess.Popen([sys.executable, "-c", code, target], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def curated_data(ingested, tmp_path_factory):
    """The session's tiny version, curated without FiftyOne (data only: the sweeps' input)."""
    _, ingest_result = ingested
    tmp = tmp_path_factory.mktemp("tune-locked")
    shutil.copytree(Path(ingest_result.out_dir), tmp / "data" / "ingest")
    curate.run(tiny_params(tmp, SWEEP))
    return tmp


def _sweep(curated_data, tmp_path, storage: str | None, extra=()):
    p = tiny_params(curated_data, [*SWEEP, *extra])
    paths = p.paths.model_copy(update={"cache": tmp_path / "cache", "reports": tmp_path / "reports",
                                       "data": tmp_path / "data"})
    return p.model_copy(update={"paths": paths, "tune": p.tune.model_copy(update={"storage": storage})})


def _trials(p) -> list[tuple]:
    return [(t.number, t.state.name, t.params) for t in tune.load_study(p, tune.study_for(p)).get_trials()]


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql"])
def test_optuna_storage_locked(kind, curated_data, tmp_path, monkeypatch, request):
    monkeypatch.setattr(tune_study, "LOCK_TIMEOUT_S", LOCK_TIMEOUT_S)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "curate").symlink_to(curated_data / "data" / "curate")
    if kind == "journal":
        storage, target, hold = None, str(tmp_path / "cache" / "tune" / "optuna.journal"), HOLD_JOURNAL
    elif kind == "sqlite":
        storage, target, hold = f"sqlite:///{tmp_path / 'optuna.db'}", str(tmp_path / "optuna.db"), HOLD_SQLITE
    else:
        storage = request.getfixturevalue("postgres_url")
        target, hold = storage.replace("postgresql+psycopg://", "postgresql://"), HOLD_POSTGRES
    p = _sweep(curated_data, tmp_path, storage)
    tune.run(p)
    outputs = tmp_path / "data" / "tune"
    previous, finished = _snapshot(outputs), _trials(p)
    assert [state for _, state, _ in finished] in (["COMPLETE", "COMPLETE"], ["COMPLETE", "PRUNED"])
    more = _sweep(curated_data, tmp_path, storage, ["tune.trials=3"])  # the same study, one trial more

    # Another process holds the lock (a sweep writing, a session with an open transaction).
    holder = Holder(hold, target)
    started = time.monotonic()
    with pytest.raises(tune.TuneError) as err:
        tune.run(more)
    seconds = time.monotonic() - started
    print(f"{kind} locked: the stage failed after {seconds:.1f} s (lock timeout {LOCK_TIMEOUT_S:g} s)")
    assert seconds < LOCK_TIMEOUT_S + 10
    message = str(err.value)
    if kind == "journal":
        assert f"tune.storage journal:{target} is locked" in message and "wait for it or stop it" in message
    else:
        assert f"tune.storage {tune.storage_label(p)} is locked or down" in message and "wait for it" in message
    assert "re-run" in message and "resume" in message
    assert _snapshot(outputs) == previous  # best.json and tune.json from the finished sweep

    # The journal: the holder is killed with the lock held (a killed worker), leaving its lock file
    # behind; the next run removes it once the timeout shows its holder gone. The others: released.
    if kind == "journal":
        holder.kill()
    else:
        holder.release()
    assert _trials(p) == finished  # the study's trials, untouched
    started = time.monotonic()
    result = tune.run(more)  # the re-run resumes the study: one trial more, the old ones kept
    seconds = time.monotonic() - started
    if kind == "journal":
        print(f"journal lock left by a killed holder: removed, the sweep done after {seconds:.1f} s")
        assert seconds >= LOCK_TIMEOUT_S and not Path(f"{target}.lock").exists()
    assert result.n_complete + result.n_pruned == 3
    assert _trials(more)[:2] == finished and read_json(outputs / "tune.json")["study"] == tune.study_for(p)
