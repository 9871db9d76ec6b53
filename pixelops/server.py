"""The project's Prefect server: started on 127.0.0.1 in the background, stopped by its PID.

    pixelops server start | stop | status

It is Prefect's own server (`prefect server start`), with the project's state (`PREFECT_HOME`,
by default .prefect/) and `server:` in params.yaml for host and port. The process runs in a
session of its own and is recorded in `$PREFECT_HOME/pixelops-server.json` (pid, url, log), so
`stop` ends it and everything it started, and `start` is a no-op when it already answers.

A flow run that talks to this server (PREFECT_API_URL) checks it answers before it starts, and
fails with what to do when it stops answering (`reachable_api`); Prefect's client retries a lost
server CLIENT_MAX_RETRIES times (about 14 s), not its default 5 (over a minute per request).

Binding: 127.0.0.1 unless params.yaml says otherwise. The API has no authentication of its
own; before exposing it, set `PREFECT_SERVER_API_AUTH_STRING` (e.g. `admin:<secret>`) in the
server's environment and `PREFECT_API_AUTH_STRING` in every client's. Secrets never go into
params.yaml, which is tracked by git.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

STATE_FILE = "pixelops-server.json"
# Prefect retries a request to a server it reached before after 2, 4, 8 ... s; its default 5
# retries make a flow whose server died wait over a minute per request before it fails. Three
# (about 14 s) still ride out a server restart. A candidate for params.yaml (server.client_retries).
CLIENT_MAX_RETRIES = 3
HEALTH_TIMEOUT_S = 5.0
WHAT_TO_DO = ("start it with `pixelops server start` (or point PREFECT_API_URL at a running server), "
              "or unset PREFECT_API_URL to run the flow on a temporary local server, "
              "or run `pixelops run` (dvc repro, no Prefect)")


class ServerError(RuntimeError):
    """The Prefect server did not start or stop as asked."""


class PrefectUnreachable(ServerError):
    """The Prefect API a flow run reports to (PREFECT_API_URL) does not answer."""


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    url: str  # the API, e.g. http://127.0.0.1:4200/api
    log: str

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", ".prefect")).resolve()


def _state_path() -> Path:
    return _home() / STATE_FILE


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """The server answers its (always unauthenticated) health check."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def bound_client_retries() -> None:
    """Default PREFECT_CLIENT_MAX_RETRIES to CLIENT_MAX_RETRIES; call before importing prefect."""
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(CLIENT_MAX_RETRIES))


@contextlib.contextmanager
def reachable_api(timeout_s: float = HEALTH_TIMEOUT_S):
    """Around a flow call: PrefectUnreachable, saying what to do, when PREFECT_API_URL does not answer.

    Checked before the flow starts (Prefect's own error names no remedy), and when the flow
    fails with a transport error, so a server that died mid-run is told apart from other
    failures. Without PREFECT_API_URL a flow runs on a temporary local server: nothing to check.
    Yields the URL (or None).
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url and not healthy(url, timeout_s):
        raise PrefectUnreachable(f"the Prefect API at {url} does not answer; {WHAT_TO_DO}")
    try:
        yield url
    except httpx.TransportError as e:
        if not url or healthy(url, timeout_s):
            raise
        raise PrefectUnreachable(
            f"the Prefect API at {url} stopped answering during the flow run ({type(e).__name__}: {e}); "
            f"{WHAT_TO_DO}. Stages that finished are recorded in dvc.lock: a re-run skips them.") from e


def _alive(pid: int) -> bool:
    """The process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def status() -> ServerInfo | None:
    """The running server this project started, or None (a stale record is removed)."""
    path = _state_path()
    try:
        info = ServerInfo(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    if not _alive(info.pid):
        path.unlink(missing_ok=True)
        return None
    return info


def start(host: str = "127.0.0.1", port: int = 4200, *, timeout_s: float = 120) -> tuple[ServerInfo, bool]:
    """Start the server unless this project's is already up; (info, started_now)."""
    running = status()
    if running:
        return running, False
    url = f"http://{host}:{port}/api"
    if healthy(url):
        raise ServerError(f"{url} already answers, but not as this project's server ({_state_path()} "
                          "has no record of it): stop the other server or set server.port in params.yaml")
    home = _home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the server itself must not be a client of another
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # its own process group: stop() ends the server and its children
    info = ServerInfo(pid=proc.pid, url=url, log=str(log))
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None:
            raise ServerError(f"the Prefect server exited with code {proc.returncode} while starting; "
                              f"its log: {log}")
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise ServerError(f"the Prefect server did not answer {url}/health within {timeout_s:g}s "
                              f"(server.startup_timeout_s); its log: {log}")
        time.sleep(0.5)
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(info.__dict__))
    os.replace(tmp, _state_path())
    return info, True


def _terminate(pid: int, grace_s: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # children that outlived the leader too
    except ProcessLookupError:
        pass


def stop() -> ServerInfo | None:
    """Stop this project's server (and its process group); the info of what was stopped, or None."""
    info = status()
    if info is None:
        return None
    _terminate(info.pid)
    _state_path().unlink(missing_ok=True)
    return info
