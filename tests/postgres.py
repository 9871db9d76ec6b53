"""A throwaway PostgreSQL server for tests: the `postgres_url` fixture (one per test session).

Optuna studies that several processes share need a real database server (SQLite locks the whole
file), so tests run them on PostgreSQL exactly as users do: `optuna.storages.RDBStorage(url)`
with psycopg 3. The fixture needs no running service and no configuration: it finds Debian's
server binaries (/usr/lib/postgresql/<newest>/bin, else initdb/pg_ctl/postgres on PATH), creates
a fresh cluster in a temp folder, starts it, creates the database `optuna` with Optuna's tables
(processes that create them at once collide, so the fixture does it first), yields
`postgresql+psycopg://postgres@127.0.0.1:PORT/optuna`, and at the end stops the server
(`pg_ctl stop -m fast`) and deletes the folder. Missing binaries fail the tests (they do not skip):
`make setup` installs Debian's `postgresql` package.

Why it looks like this:
- Root: tests and CI run as root, and PostgreSQL refuses to run as root. Then initdb, postgres and
  pg_ctl run as the unprivileged `postgres` OS user that the Debian package creates (switched to
  the way `setpriv` does, by subprocess's user/group: no runuser process in between, so signals
  reach postgres itself), on a temp folder chowned to it. Not root: they run as the current user.
- Loopback only: the server listens on 127.0.0.1 on a free port, with its unix socket in the temp
  folder, so it never meets the machine's own cluster (/var/run/postgresql, port 5432). That is
  also why authentication is `trust`: nothing outside this machine can reach it.
- Its own child: postgres runs as a direct child of the test process (not `pg_ctl start`), so the
  test process can always signal it and reaps it at the end: no process is left behind, zombie or not.
- Speed over durability: fsync, synchronous_commit and full_page_writes are off; the data is
  thrown away anyway.

Use it with `from tests.postgres import postgres_url  # noqa: F401` (in conftest.py or a test module).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout, one folder per major version
SERVER_OS_USER = "postgres"  # who runs the server when we are root (created by Debian's package)
SUPERUSER = "postgres"  # the cluster's database superuser (initdb -U)
DATABASE = "optuna"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
INSTALL_HINT = "install Debian's `postgresql` package (`make setup` does it, as root: apt-get install -y postgresql)"
_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path:
    """The folder with initdb, pg_ctl and postgres: the newest /usr/lib/postgresql/*/bin, else PATH."""

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)

    found = [Path(d) for d in glob.glob(BIN_GLOB) if all((Path(d) / tool).is_file() for tool in _TOOLS)]
    if found:
        return max(found, key=version)
    on_path = shutil.which("initdb")
    if on_path:  # e.g. a symlink in /usr/local/bin: pg_ctl must find postgres next to the real file
        bindir = Path(on_path).resolve().parent
        if all((bindir / tool).is_file() for tool in _TOOLS):
            return bindir
    pytest.fail(f"PostgreSQL server binaries ({', '.join(_TOOLS)}) not found in {BIN_GLOB} or on PATH: "
                f"{INSTALL_HINT}", pytrace=False)


def _server_user() -> dict:
    """subprocess arguments that drop root to the `postgres` OS user (none when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        pytest.fail(f"running as root, and PostgreSQL refuses to run as root; the OS user "
                    f"`{SERVER_OS_USER}` to run it as does not exist: {INSTALL_HINT}", pytrace=False)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class _Server:
    """One cluster in a temp folder: initdb, start, stop, remove."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_user = _server_user()
        self.base = Path(tempfile.mkdtemp(prefix="pixelops-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        # Only our own settings: PG* variables (PGDATA, PGPORT, PGHOST ...) would redirect the tools.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        if self.as_user:
            os.chown(self.base, self.as_user["user"], self.as_user["group"])

    def _tool(self, name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        # cwd: the tools chdir-check their working folder, which the postgres user may not reach (/root).
        return subprocess.run([str(self.bindir / name), *args], cwd=self.base, env=self.env, **self.as_user,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def _fail(self, what: str, done: subprocess.CompletedProcess | None = None) -> None:
        output = (done.stdout + done.stderr).strip()[-1000:] if done is not None else ""
        pytest.fail(f"PostgreSQL test server ({self.bindir}): {what}\n{output}\n"
                    f"--- server log ({self.log}), last lines ---\n{_tail(self.log)}", pytrace=False)

    def init(self) -> None:
        done = self._tool("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                          "--encoding=UTF8", "--locale=C", "--no-sync")
        if done.returncode != 0:
            self._fail(f"initdb failed (exit {done.returncode})", done)

    def start(self) -> None:
        """Run postgres as our own child (not `pg_ctl start`, which leaves it to PID 1 to reap)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for attempt in range(1, 4):  # a free port can be taken between choosing and binding it
            self.port = _free_port()
            with open(self.log, "wb") as log:  # truncated: each try is judged by its own log
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                     "-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={self.base}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    cwd=self.base, env=self.env, **self.as_user,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready(deadline):
                break
            if "could not bind" not in _tail(self.log, 30) or attempt == 3:
                self._fail(f"postgres exited (code {self.proc.returncode}) before accepting connections")
        import psycopg

        with psycopg.connect(host=LOOPBACK, port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def _wait_ready(self, deadline: float) -> bool:
        """True once it takes a TCP connection on 127.0.0.1; False if it exited; fails at the deadline."""
        import psycopg

        while True:
            try:
                psycopg.connect(host=LOOPBACK, port=self.port, user=SUPERUSER, dbname="postgres",
                                connect_timeout=2).close()
                return True
            except psycopg.OperationalError as exc:
                error = exc  # refused, or "the database system is starting up"
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self._fail(f"no connection on {LOOPBACK}:{self.port} within {START_TIMEOUT_S:g} s: {error}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{LOOPBACK}:{self.port}/{DATABASE}"

    def stop(self) -> None:
        """Stop the server if it runs (fast: disconnects clients), wait for it, then delete the folder."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                done = self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60",
                                  timeout=90)
                if done.returncode != 0:  # e.g. still starting up (no postmaster.pid yet)
                    self.proc.send_signal(signal.SIGINT)  # what `-m fast` sends
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGQUIT)  # `-m immediate`
                    self.proc.wait(timeout=30)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _create_optuna_schema(url: str) -> None:
    """Create Optuna's tables once, up front. RDBStorage creates them on first use, and two processes
    doing that at once on an empty PostgreSQL database collide (CREATE TYPE studydirection: duplicate
    key in pg_type); with the schema in place, concurrent create_study/load_study calls are safe."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    storage.engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database on 127.0.0.1, with Optuna's (empty) schema."""
    server = _Server()
    try:
        server.init()
        server.start()
        _create_optuna_schema(server.url)
        yield server.url
    finally:
        server.stop()
