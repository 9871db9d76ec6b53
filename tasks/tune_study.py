"""The Optuna side of stage tune: study identity, storage, sampler, pruner, stale trials.

tasks.tune runs the trials; this module decides which study they belong to, where it lives
and how a trial whose worker died is detected and retried (see tasks.tune's docstring).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from tasks.params import Params, TuneParams

HOST = socket.gethostname()
# Train knobs that cannot change a trial's result: outside the study's identity.
_NOT_IDENTITY = {"num_threads", "keep_checkpoints", "resume", "device", "detection"}
# How long a sweep waits for a storage that another process holds locked (the journal's lock
# file, SQLite's write lock, a PostgreSQL lock) before it fails. A candidate for params.yaml
# (tune.lock_timeout_s).
LOCK_TIMEOUT_S = 30.0


class TuneError(RuntimeError):
    """The sweep cannot run or produced no usable trial."""


# ---- the study: name, storage, sampler, pruner -------------------------------------------

def study_name(params: Params, curated_version: str) -> str:
    """pixelops-<curated version>-<10 hex of the sweep's identity>."""
    tp = params.tune
    train = params.train.model_dump(mode="json", exclude=_NOT_IDENTITY | set(tp.space))
    identity = {"space": {k: v.model_dump(mode="json") for k, v in tp.space.items()}, "train": train,
                "epochs": trial_epochs(params), "sampler": tp.sampler, "pruner": tp.pruner, "seed": params.seed,
                "startup_trials": tp.startup_trials, "warmup_epochs": tp.warmup_epochs}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"pixelops-{curated_version}-{digest}"


def trial_epochs(params: Params) -> int:
    return params.tune.epochs or params.train.epochs


def storage_label(params: Params) -> str:
    """Where the study lives, for logs and tune.json (a URL's password hidden)."""
    url = params.tune.storage
    if url is None:
        return f"journal:{params.paths.cache / 'tune' / 'optuna.journal'}"
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


class JournalLock:
    """The journal's write lock: Optuna's own `<journal>.lock` symlink (so Optuna clients outside
    PixelOps are still excluded), taken while holding a kernel lock on `<journal>.lock.held`,
    which tells a live holder from a dead one (the kernel drops a killed process's lock).

    Held by a live process for over `timeout_s`: TuneError (Optuna's lock breaks any lock after
    30 s and appends beside its holder). Left by a dead one (a killed worker): removed after
    `timeout_s`, as Optuna would. JournalFileBackend's `lock_obj`: acquire() and release().
    """

    def __init__(self, journal: Path, timeout_s: float):
        self.journal, self.timeout_s = journal, timeout_s
        self.path, self.held = Path(f"{journal}.lock"), Path(f"{journal}.lock.held")
        self._fd: int | None = None

    def acquire(self) -> bool:
        deadline, pause = time.monotonic() + self.timeout_s, 0.001
        fd = os.open(self.held, os.O_CREAT | os.O_RDWR, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process is writing
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TuneError(
                        f"tune.storage journal:{self.journal} is locked: a process has held its lock for over "
                        f"{self.timeout_s:g} s. Another sweep (python -m tasks.tune, its workers or the tune flow) "
                        "is writing to it and seems stuck: wait for it or stop it, then re-run. Finished trials "
                        "are kept and the sweep resumes.") from None
            else:
                try:
                    os.symlink(self.journal, self.path)
                    self._fd = fd
                    return True
                except FileExistsError:  # an Optuna client outside PixelOps, or a dead holder's
                    if time.monotonic() > deadline:
                        # Safe from PixelOps' own writers: they hold the kernel lock, which we have.
                        print(f"removing {self.path}: its holder is gone (held over {self.timeout_s:g} s)",
                              flush=True)
                        self.path.unlink(missing_ok=True)
                        continue
                    fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_wait_args(url: str) -> dict:
    """The RDB driver's wait for a lock, bounded by LOCK_TIMEOUT_S (PostgreSQL waits forever)."""
    if url.startswith("sqlite"):
        return {"timeout": LOCK_TIMEOUT_S}
    if url.startswith("postgresql") and "options=" not in url:  # the URL's own options win
        return {"options": f"-c lock_timeout={int(LOCK_TIMEOUT_S * 1000)}"}
    return {}


def open_storage(params: Params):
    """An Optuna storage for `tune.storage` (journal file by default, or an RDB URL)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = params.tune.storage
    if url is None or url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")) if url else params.paths.cache / "tune" / "optuna.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalLock(path, LOCK_TIMEOUT_S)))
    if url.startswith("sqlite") and params.tune.workers > 1:
        raise TuneError(f"tune.storage {url}: SQLite is not safe for parallel workers; use the journal "
                        "file (storage: null) or PostgreSQL")
    # pool_pre_ping: a long trial must not find its pooled connection dropped by the server
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True,
                                                          "connect_args": _lock_wait_args(url)})


@contextmanager
def storage_errors(params: Params):
    """Inside: an RDB storage that is locked or down raises TuneError naming it and what to do
    (SQLAlchemy's OperationalError, which Optuna may wrap in a StorageInternalError about "invalid data")."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except (OperationalError, StorageInternalError) as e:
        cause = e if isinstance(e, OperationalError) else e.__cause__
        if not isinstance(cause, OperationalError):
            raise
        detail = str(cause.orig or cause).strip().splitlines()[0]
        raise TuneError(
            f"tune.storage {storage_label(params)} is locked or down ({detail}; waited up to {LOCK_TIMEOUT_S:g} s). "
            "If another sweep or database session holds it, wait for it (or end that session) and re-run; if "
            "the database server is down, start it. Finished trials stay in the study: a re-run resumes it.") from e


def build_sampler(tp: TuneParams, seed: int):
    import optuna

    if tp.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group/constant_liar are "experimental" since 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: running trials count as bad, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tp.startup_trials, multivariate=True,
                                          group=True, constant_liar=True)


def build_pruner(tp: TuneParams, epochs: int):
    import optuna

    if tp.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tp.startup_trials, n_warmup_steps=tp.warmup_epochs)
    if tp.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if tp.pruner == "successive_halving":  # ASHA: at epochs 1, 3, 9, ... only the top third goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler_seed(seed: int, n_trials: int, worker: int) -> int:
    """A fresh stream per worker and per resume (a resumed study must not replay old draws);
    for a new study the same as any other new study with this seed, so two sweeps that differ
    only in their pruner start from the same trials."""
    text = f"{seed}/{n_trials}/{worker}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def load_study(params: Params, name: str, *, worker: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(params))
    n = len(study.get_trials(deepcopy=False))
    study.sampler = build_sampler(params.tune, _sampler_seed(params.seed, n, worker))
    study.pruner = build_pruner(params.tune, trial_epochs(params))
    return study


def create_study(params: Params, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=open_storage(params), direction="maximize",
                                load_if_exists=True)
    if "space" not in study.user_attrs:
        study.set_user_attr("space", {k: v.model_dump(mode="json") for k, v in params.tune.space.items()})
        study.set_user_attr("epochs_requested", trial_epochs(params))
    return study


# ---- stale trials: heartbeat, detection, retry --------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may contain spaces


def owner() -> dict:
    return {"host": HOST, "pid": os.getpid(), "start": _proc_start(os.getpid())}


def _is_stale(trial, tp: TuneParams, now: float) -> str | None:
    owner = trial.user_attrs.get("worker") or {}
    if owner.get("host") == HOST and _proc_start(owner.get("pid", -1)) != owner.get("start"):
        return f"worker process {owner.get('pid')} on {HOST} is gone"
    stamp = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
    if now - stamp > tp.stale_after_s:
        return f"no heartbeat for {now - stamp:.0f}s (> stale_after_s={tp.stale_after_s:g})"
    return None


def fail_stale_trials(study, tp: TuneParams) -> list[int]:
    """Fail RUNNING trials whose worker is gone and enqueue their values again; their numbers."""
    from optuna.trial import TrialState

    failed, now = [], time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _is_stale(t, tp, now)
        if reason is None:
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"stale: {reason}; retried")
            storage.set_trial_user_attr(t._trial_id, "stale", True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except RuntimeError:  # another worker failed it first (UpdateFinishedTrialError): its retry
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        print(f"trial {t.number}: {reason}; failed and queued again", flush=True)
        failed.append(t.number)
    return failed


class Heartbeat:
    """Stamps one trial's `heartbeat` user attr every `interval` seconds, from a thread."""

    def __init__(self, storage, trial_id: int, interval: float):
        self._storage, self._id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self.seconds = 0.0  # time spent talking to the storage
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            t0 = time.perf_counter()
            self._storage.set_trial_user_attr(self._id, "heartbeat", time.time())
            self.seconds += time.perf_counter() - t0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def counted(trials) -> list:
    """Trials that use up the budget: all but stale ones (their retry counts instead)."""
    return [t for t in trials if not t.user_attrs.get("stale") and not t.user_attrs.get("surplus")]
