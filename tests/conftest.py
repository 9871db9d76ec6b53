"""Shared fixtures: the real params.yaml, shrunk; a tiny real Fashion-MNIST version.

Environment is configured before anything imports prefect or fiftyone, with state in a
per-session temp folder so tests never touch the project's .prefect/.fiftyone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _owner_alive() -> bool:
    """True in the session's own process (imported twice: as conftest and as tests.conftest) and in
    its subprocesses (gate workers, spawned children), which reuse its state and database."""
    import psutil

    owner = os.environ.get("PIXELOPS_TEST_DB_OWNER", "")
    return owner.isdigit() and (int(owner) == os.getpid() or psutil.pid_exists(int(owner)))


_SHARED = _owner_alive()
if not _SHARED:
    _STATE = Path(tempfile.mkdtemp(prefix="pixelops-test-state-"))
    # Registered first so it runs last (atexit is LIFO): after the database below has stopped.
    # Left behind, each session's state (database, Prefect home) is ~300 MB of disk CI also needs.
    atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
    os.environ["PIXELOPS_TEST_STATE"] = str(_STATE)
else:
    _STATE = Path(os.environ["PIXELOPS_TEST_STATE"])
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("FIFTYONE_DEFAULT_DATASET_DIR", str(_STATE / "fiftyone-datasets"))
# Tests share torch's hub cache with the project so the installed weights file is found.
os.environ.setdefault("TORCH_HOME", str(ROOT / ".torch"))

from tasks.env import configure_environment

configure_environment(ROOT)

from tasks import fo_service
from tasks.params import DatabaseParams


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One FiftyOne database service for the whole session, in the temp state folder, started the
# way users start theirs (tasks.fo_service); every test and subprocess reaches it by URI.
# Guarded: the session's process imports this file twice, and its subprocesses import it too.
if not _SHARED:
    os.environ.pop("FIFTYONE_DATABASE_URI", None)  # never the user's own database
    TEST_DB = fo_service.spec_for(DatabaseParams(port=_free_port(), dir=_STATE / "fiftyone-db", cache_size_gb=0.25))
    fo_service.start(TEST_DB)
    os.environ["FIFTYONE_DATABASE_URI"] = TEST_DB.uri
    os.environ["PIXELOPS_TEST_DB_OWNER"] = str(os.getpid())
    # atexit runs last-registered first: registered before fiftyone is imported, this stop
    # runs after FiftyOne's own exit handlers, which still talk to the database.
    atexit.register(fo_service.stop, TEST_DB)
    os.environ["PIXELOPS_TEST_DB_DIR"] = str(TEST_DB.dbpath)
else:  # the second import: the same service
    _port = int(os.environ["FIFTYONE_DATABASE_URI"].rsplit(":", 1)[1])
    TEST_DB = fo_service.DatabaseSpec(uri=os.environ["FIFTYONE_DATABASE_URI"], managed=True, port=_port,
                                      dbpath=Path(os.environ["PIXELOPS_TEST_DB_DIR"]), timeout_s=5.0,
                                      cache_size_gb=0.25)

from tasks.params import Params, apply_overrides, from_dict, load_raw

TINY_OVERRIDES = [
    "ingest.limit_per_split=300",
    "validate.min_per_class=5",
    "train.epochs=1",
    "train.batch_size=64",
    "train.num_threads=1",
    "train.device=cpu",
    "evaluate.batch_size=128",
]


def tiny_params(tmp: Path, extra: list[str] | None = None) -> Params:
    """params.yaml shrunk for tests, with outputs under `tmp`."""
    raw = apply_overrides(load_raw(ROOT / "params.yaml"), TINY_OVERRIDES + (extra or []))
    raw["paths"] = {"data": str(tmp / "data"), "reports": str(tmp / "reports"),
                    "versions": str(tmp / "dataset-versions.jsonl"), "curation": str(tmp / "curation"),
                    "cache": str(tmp / "cache")}
    return from_dict(raw, origin="tiny params")


@pytest.fixture
def params_tiny(tmp_path) -> Params:
    return tiny_params(tmp_path)


@pytest.fixture(scope="session")
def ingested(tmp_path_factory):
    """A tiny real dataset version (300 train + 300 test Fashion-MNIST images), made once."""
    from tasks import ingest

    tmp = tmp_path_factory.mktemp("ingested")
    params = tiny_params(tmp)
    result = ingest.run(params)
    return params, result


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Params:
    """Params of a tiny real project trained 2 epochs (checkpoints kept), made once. Tests that
    damage its files put the original bytes back."""
    from tasks import curate, ingest, train

    params = tiny_params(tmp_path_factory.mktemp("trained"), [
        "curate.fiftyone=false", "train.epochs=2", "train.keep_checkpoints=2", "ingest.limit_per_split=200"])
    ingest.run(params)
    curate.run(params)
    train.run(params)
    return params
