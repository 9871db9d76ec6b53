"""The stage registry and DVC's lock file as the one record of what is up to date.

Both doors use this: `dvc repro` runs `python -m tasks.<stage>` and records dvc.lock; the
Prefect flow and the CLI ask DVC (in-process) whether a stage is up to date, run the same
stage function when it is not, then `commit` the stage so that `dvc repro` sees the work. A recorded stage holds the project's
DVC writer lock (pixelops.repo_lock) from its status check to its commit.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("ingest", "validate", "pretrain", "curate", "tune", "train", "evaluate", "review", "export")


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float
    result: object = None


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"tasks.{name}")


def _repo(root: Path | str = "."):
    from dvc.repo import Repo

    return Repo(str(root))


def is_up_to_date(stage: str, root: Path | str = ".") -> bool:
    """True when dvc.lock records this stage with unchanged deps, params and outputs."""
    with _repo(root) as repo:
        return not repo.status(targets=[stage])


class NotRecorded(RuntimeError):
    """DVC could not copy a stage's outputs into its cache; dvc.lock keeps its previous record."""


def commit_stage(stage: str, root: Path | str = ".") -> None:
    """Record the stage's current deps/params/outs in dvc.lock (what `dvc repro` would write).

    DVC's commit logs a file it failed to copy into the cache (a full disk) and still writes
    dvc.lock, which would then record outputs DVC cannot restore or push. So every output object
    is checked to be in the cache afterwards; if one is not, dvc.lock is put back as it was.
    """
    import shutil

    from pixelops.integrity import objects_of

    lock = Path(root) / "dvc.lock"
    # A copy taken before, put back by rename: restoring must not need space on a full disk.
    backup = lock.with_name(".dvc.lock.before-commit")
    if lock.is_file():
        shutil.copyfile(lock, backup)
    try:
        with _repo(root) as repo:
            repo.commit(stage, force=True)
            missing = [o for o in objects_of(repo, cached_outs(repo, stage)) if not o.cache_path.is_file()]
    except BaseException:
        _put_back(backup, lock)
        raise
    if missing:
        _put_back(backup, lock)
        raise NotRecorded(f"stage {stage}: DVC could not copy {len(missing)} output file(s) into its cache "
                          f"(e.g. {missing[0].workspace}; a full disk? its error is above), so dvc.lock keeps the "
                          "previous record; free space and re-run")
    backup.unlink(missing_ok=True)


def cached_outs(repo, stage: str) -> list[tuple[str, str]]:
    """(workspace path, hash) of the stage's outputs DVC keeps in its cache (not `cache: false` ones)."""
    (found,) = repo.stage.collect(stage)
    return [(str(out.def_path), out.hash_info.value) for out in found.outs if out.use_cache and out.hash_info]


def _put_back(backup: Path, lock: Path) -> None:
    if backup.is_file():
        backup.replace(lock)
    else:  # there was no dvc.lock before
        lock.unlink(missing_ok=True)


def enter_project(root: Path | str) -> str:
    """Make `root` the working directory; returns its absolute path.

    params.yaml's paths (data/, reports/ ...) are relative to the project root, and a flow run
    does not always start there: a work-pool worker starts it in the code's folder.
    """
    root = Path(root).resolve()
    if Path.cwd() != root:
        os.chdir(root)
    return str(root)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def repo_writer(params, root: Path | str, purpose: str, say=_say):
    """The project's DVC writer lock (pixelops.repo_lock), waiting up to server.repo_lock_timeout_s."""
    from pixelops.repo_lock import writer_lock

    return writer_lock(root, purpose=purpose, timeout_s=params.server.repo_lock_timeout_s, say=say)


def run_stage(stage: str, params, *, root: Path | str = ".", record: bool = True, **run_kwargs) -> StageOutcome:
    """Skip `stage` if DVC says it is up to date, else run `tasks.<stage>.run(params)` and commit.

    `record=False` runs the function without consulting or updating dvc.lock (ad-hoc runs with
    overridden params must not be recorded as if params.yaml had produced them). `run_kwargs`
    go to the stage's run() (the Prefect flow's per-trial task wrapper for tune).
    """
    t0 = time.perf_counter()
    if not record:
        return StageOutcome(stage, False, time.perf_counter() - t0, stage_module(stage).run(params, **run_kwargs))
    with repo_writer(params, root, f"stage {stage} (pid {os.getpid()})"):
        if is_up_to_date(stage, root):
            return StageOutcome(stage, True, time.perf_counter() - t0)
        result = stage_module(stage).run(params, **run_kwargs)
        commit_stage(stage, root)
        if stage == "ingest":
            from pixelops.versions import sync_registry

            sync_registry(params, root)  # the registry line learns the DVC hash of this version
    return StageOutcome(stage, False, time.perf_counter() - t0, result)


def prepare_curation(params, root: Path | str = ".") -> dict:
    """Before a run: FiftyOne's database up, and curators' App tags pulled into the curation file.

    The project's own mongod is started if it is not running (tasks.fo_service: safe when
    several runs start it at once); a user's MongoDB (curate.database.uri) must already answer.
    Tags are pulled only once the version has a FiftyOne dataset; the curation file, not the
    database, is what the curate stage (and so `dvc repro`) reads.
    """
    if not params.curate.fiftyone:
        return {"database": "off", "pulled": None}
    from tasks import curate, fo_service

    db = fo_service.start(fo_service.spec_for(params.curate.database, root))
    try:
        pulled = curate.pull(params)
    except curate.CurateError:  # no version or no dataset yet: the first run creates them
        pulled = None
    return {"database": db["action"], "uri": db["uri"], "pulled": pulled}
