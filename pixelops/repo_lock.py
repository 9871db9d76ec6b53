"""One writer at a time to a project's DVC repository, with a wait message instead of DVC's lock error.

DVC takes its own lock only while one command runs, so two runs (a flow from the UI and a
`pixelops run` in a shell, or two flow runs) interleave: one commits a stage while the other
rewrites params.yaml or the outputs under it, and DVC answers the loser with "Unable to acquire
lock". Everything in PixelOps that writes outputs and commits them (a pipeline flow run, a
single stage, `pixelops run` around `dvc repro`) holds this lock for the whole of its work:

    with writer_lock(root, purpose="pipeline flow run 3f2a...", timeout_s=3600):
        ...

The lock is `fcntl.flock` on `.dvc/tmp/pixelops-writer.lock`: the kernel releases it when the
holder dies, so a SIGKILLed run never leaves a stale lock. The file holds who has it (pid,
host, purpose, since), which the waiting side prints. Within one process the lock is
re-entrant (a flow run holds it, its stage tasks in worker threads pass through).

DVC's own per-command lock (`.dvc/tmp/rwlock`) names processes by pid and skips a pid that no
longer exists, but a SIGKILLed `dvc repro` whose parent died too stays a zombie until PID 1
reaps it, and in a container PID 1 often never does: DVC then refuses every later command
("is being blocked by (PID n)"). `clear_dead_dvc_locks` drops entries of dead and zombie pids;
the writer lock calls it once acquired, and `pixelops status` before asking DVC.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

LOCK_NAME = "pixelops-writer.lock"


class RepoBusy(RuntimeError):
    """Another run kept the project's DVC repository longer than the wait allowed."""


_held: dict[str, int] = {}  # lock path -> depth, for re-entry from this process's threads
_guard = threading.Lock()


def lock_path(root: Path | str) -> Path:
    root = Path(root).resolve()
    # Beside DVC's own lock when there is a repository; a bare folder (a sweep run outside DVC)
    # gets a dot-file rather than a `.dvc/` that would make DVC take it for a repository.
    return root / ".dvc" / "tmp" / LOCK_NAME if (root / ".dvc").is_dir() else root / f".{LOCK_NAME}"


def holder(root: Path | str) -> dict | None:
    """Who holds (or last held) the lock, as written by the holder; None when never taken."""
    try:
        return json.loads(lock_path(root).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('purpose')}, since {info.get('since')})"


@contextlib.contextmanager
def writer_lock(root: Path | str, *, purpose: str, timeout_s: float = 3600, poll_s: float = 0.5,
                say: Callable[[str], None] = print, say_every_s: float = 60) -> Iterator[None]:
    """Hold the project's writer lock; wait up to `timeout_s` (0: fail at once), saying why."""
    path = lock_path(root)
    key = str(path)
    with _guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, root, purpose=purpose, timeout_s=timeout_s, poll_s=poll_s, say=say, say_every_s=say_every_s)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                "since": datetime.now(UTC).isoformat(timespec="seconds")}
        clear_dead_dvc_locks(root)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # a full disk: the holder's description is for people, the flock is the lock
            pass
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _dead(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def clear_dead_dvc_locks(root: Path | str, say: Callable[[str], None] = print) -> list[dict]:
    """Remove the entries of dead (or zombie) processes from DVC's rwlock file; returns them."""
    from dvc.fs import localfs
    from dvc.rwlock import RWLOCK_FILE, _edit_rwlock  # DVC's own guarded edit of its lock file

    tmp_dir = Path(root).resolve() / ".dvc" / "tmp"
    if not (tmp_dir / RWLOCK_FILE).is_file():
        return []
    removed = []
    with _edit_rwlock(str(tmp_dir), localfs, False) as lock:
        for path, info in list(lock["write"].items()):
            if _dead(int(info["pid"])):
                removed.append(lock["write"].pop(path))
        for path, infos in list(lock["read"].items()):
            alive = [i for i in infos if not _dead(int(i["pid"]))]
            removed += [i for i in infos if i not in alive]
            if alive:
                lock["read"][path] = alive
            else:
                del lock["read"][path]
    for info in {json.dumps(i, sort_keys=True): i for i in removed}.values():
        say(f"removed DVC's lock entry of pid {info['pid']} ({info['cmd']}): that process is dead")
    return removed


def _acquire(fd: int, root, *, purpose: str, timeout_s: float, poll_s: float, say, say_every_s: float) -> None:
    t0 = time.monotonic()
    said_at = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if said_at is not None:
                say(f"{purpose}: the DVC repository is free after {time.monotonic() - t0:.0f}s; going on")
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - t0
        other = _describe(holder(root))
        if waited >= timeout_s:
            raise RepoBusy(
                f"{Path(root).resolve()}: the DVC repository is busy: {other} is writing to it, and "
                f"{purpose} waited {waited:.0f}s (server.repo_lock_timeout_s={timeout_s:g}). Nothing was "
                "changed. Re-run when that run has finished, or raise the timeout to queue behind it.")
        if said_at is None or time.monotonic() - said_at >= say_every_s:
            say(f"{purpose}: waiting for the DVC repository: {other} is writing to it "
                f"(waited {waited:.0f}s of {timeout_s:g}s)")
            said_at = time.monotonic()
        time.sleep(poll_s)
