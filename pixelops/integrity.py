"""Integrity of DVC's cache: every object dvc.lock and the version registry point at is rehashed.

DVC trusts its cache: measured here, `dvc checkout` copies a cache file with a flipped byte
into the workspace without a word (only a later `dvc status` notices, as "not in cache").
`pixelops verify` rehashes each object against its name (DVC 3 names files by the md5 of their
bytes, and a folder's `.dir` listing by the md5 of its JSON), and says which workspace file
each bad object is. `--repair` moves the bad objects aside under `.dvc/tmp/corrupt/` (kept for
inspection, never deleted), puts back a good copy from the workspace when the workspace file
still has the right hash, fetches the rest (and any missing object) by hash from the default DVC
remote, and verifies again.
`pixelops checkout` and `pixelops push` verify what they are about to use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tasks.ingest import load_registry


@dataclass(frozen=True)
class CacheObject:
    md5: str            # DVC's hash: a file's md5, or "<md5>.dir" for a folder's listing
    cache_path: Path
    workspace: str      # the file it stands for, relative to the project (for people)


@dataclass
class Report:
    checked: int = 0
    missing: list[CacheObject] = field(default_factory=list)
    corrupted: list[CacheObject] = field(default_factory=list)
    repaired: list[CacheObject] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupted

    def describe(self) -> str:
        lines = [f"checked {self.checked} cache objects: {len(self.corrupted)} corrupted, "
                 f"{len(self.missing)} not in the cache (fine: `dvc fetch` gets them when needed)"
                 + (f", {len(self.repaired)} repaired" if self.repaired else "")]
        lines += [f"  corrupted: {o.cache_path} (md5 should be {o.md5}) = {o.workspace}" for o in self.corrupted]
        if self.corrupted:  # (missing ones: DVC deletes a corrupted object it trips over; --repair fetches them)
            lines.append("run `pixelops verify --repair`: it moves them to .dvc/tmp/corrupt/ and restores good "
                         "copies from the workspace or the DVC remote")
        return "\n".join(lines)


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_path(odb, md5: str) -> Path:
    return Path(odb.oid_to_path(md5))


def _locked_outs(repo) -> list[tuple[str, str]]:
    """(workspace path, md5) of every output dvc.lock records that DVC caches (not `cache: false`)."""
    return [(str(out.def_path), out.hash_info.value) for stage in repo.index.stages for out in stage.outs
            if out.use_cache and out.hash_info and out.hash_info.value]


def _registered_trees(params, root: Path) -> list[tuple[str, str]]:
    """Every dataset version the registry ties to a DVC tree (older ones are only in the cache)."""
    entries = load_registry(root / params.paths.versions)
    data = str(params.paths.data / "ingest")
    return [(f"{data} (version {e['version']})", e["dvc_md5"]) for e in entries if e.get("dvc_md5")]


def objects(repo, params, root: Path) -> list[CacheObject]:
    """Every cache object the project points at, each once: listings and the files in them."""
    return objects_of(repo, _locked_outs(repo) + _registered_trees(params, root))


def objects_of(repo, outs: list[tuple[str, str]]) -> list[CacheObject]:
    """The cache objects of (workspace path, md5) outputs: each listing and the files in it, once."""
    odb = repo.cache.local
    seen: dict[str, CacheObject] = {}

    def add(md5: str, workspace: str) -> None:
        if md5 not in seen:
            seen[md5] = CacheObject(md5, cache_path(odb, md5), workspace)

    for workspace, md5 in outs:
        add(md5, workspace)
        if not md5.endswith(".dir"):
            continue
        listing = cache_path(odb, md5)
        if not listing.is_file() or md5_file(listing) != md5.removesuffix(".dir"):
            continue  # a missing or corrupted listing is reported as such; its entries are unknown
        for entry in json.loads(listing.read_text()):
            add(entry["md5"], f"{workspace}/{entry['relpath']}")
    return list(seen.values())


def verify(params, root: Path | str = ".", *, repair: bool = False) -> Report:
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        report = _check(objects(repo, params, root))
        if repair and (report.corrupted or report.missing):
            _repair(repo, root, report.corrupted, report.missing)
            after = _check(objects(repo, params, root))
            bad = set(after.corrupted + after.missing)
            after.repaired = [o for o in report.corrupted + report.missing if o not in bad]
            report = after
    return report


def _check(found: list[CacheObject]) -> Report:
    report = Report(checked=len(found))
    for obj in found:
        if not obj.cache_path.is_file():
            report.missing.append(obj)
        elif md5_file(obj.cache_path) != obj.md5.removesuffix(".dir"):
            report.corrupted.append(obj)
    return report


def _repair(repo, root: Path, corrupted: list[CacheObject], missing: list[CacheObject]) -> None:
    aside = root / ".dvc" / "tmp" / "corrupt"
    aside.mkdir(parents=True, exist_ok=True)
    for obj in corrupted:
        obj.cache_path.chmod(0o644)
        shutil.move(obj.cache_path, aside / obj.md5)
        workspace = root / obj.workspace
        if workspace.is_file() and md5_file(workspace) == obj.md5:
            tmp = obj.cache_path.with_name(obj.cache_path.name + ".repair")
            shutil.copyfile(workspace, tmp)
            tmp.chmod(0o444)  # DVC keeps its cache read-only
            tmp.replace(obj.cache_path)
    # DVC itself deletes a corrupted object it trips over (a status or commit), so missing ones count too.
    lost = [o for o in corrupted + missing if not o.cache_path.is_file()]
    if lost and repo.config["core"].get("remote"):
        from dvc_data.hashfile.hash_info import HashInfo

        # By hash, not by stage: an older version's objects are not in the current dvc.lock.
        repo.cloud.pull([HashInfo("md5", o.md5) for o in lost])
