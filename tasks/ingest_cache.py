"""Re-ingest without redoing work: unchanged files are not decoded or hashed again.

Two levels, both kept beside (not inside) the version folder, so the DVC-tracked version
stays byte-identical for identical content:
  * source fingerprint: every source file's (path, size, mtime, inode), the ingest params and
    the ingest code. Unchanged → the published version is returned as is (a no-op re-ingest).
  * per-file facts: path → (size, mtime, inode, sha256, image facts). A file whose stat is
    unchanged skips the image gate; its bytes are copied, never decoded.
`verify_version` re-hashes a published version against its manifest on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from tasks.io import atomic_write_text, sha256_file

CODE = ("ingest.py", "ingest_cache.py", "gate.py", "formats.py", "formats_detection.py", "archive.py", "io.py")


def cache_path(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.cache.json")


def _stamp_path(out_dir: Path) -> Path:
    # fingerprint + version apart from the per-file table, so a no-op check reads a few bytes
    return out_dir.with_name(f".{out_dir.name}.stamp.json")


def is_unchanged(out_dir: Path, fingerprint: str) -> bool:
    """The source, params and code are as when `out_dir`'s version was made."""
    try:
        stamp = json.loads(_stamp_path(out_dir).read_text())
        info = json.loads((out_dir / "version.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return stamp.get("fingerprint") == fingerprint and stamp.get("version") == info["version"]


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def source_fingerprint(source: Path, params_json: str) -> str:
    """Hash of the source files' stat, the params and the ingest code (no file is read)."""
    h = hashlib.sha256(params_json.encode())
    here = Path(__file__).parent
    for name in CODE:
        h.update((here / name).read_bytes())
    source = Path(source)
    if source.is_file():
        h.update(json.dumps([source.name, *_stat_key(source.stat())]).encode())
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        rel = os.path.relpath(dirpath, source)
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{rel}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


class FactsCache:
    """path → (stat, sha256, facts) for files seen by earlier ingests."""

    def __init__(self, data: dict | None = None):
        self.data = data or {"fingerprint": None, "version": None, "files": {}}

    @classmethod
    def load(cls, out_dir: Path) -> FactsCache:
        path = cache_path(out_dir)
        try:
            return cls(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return cls()  # a missing or damaged cache only costs time

    def lookup(self, path: Path) -> tuple[str, dict, list[int]] | None:
        entry = self.data["files"].get(os.fspath(path))  # readers give absolute paths inside the root
        if entry is None:
            return None
        try:
            stat = _stat_key(os.stat(path))
        except OSError:
            return None
        return (entry["sha256"], entry["facts"], stat) if entry["stat"] == stat else None

    def remember(self, path: Path, digest: str, facts: dict, stat: list[int] | None = None) -> None:
        self.data["files"][os.fspath(path)] = {
            "stat": stat or _stat_key(os.stat(path)), "sha256": digest, "facts": facts}

    def save(self, out_dir: Path, *, fingerprint: str, version: str) -> None:
        self.data.update(fingerprint=fingerprint, version=version)
        atomic_write_text(cache_path(out_dir), json.dumps(self.data))
        atomic_write_text(_stamp_path(out_dir), json.dumps({"fingerprint": fingerprint, "version": version}))


def verify_version(out_dir: Path) -> list[str]:
    """Re-hash every image of a published version; return the paths whose bytes changed or vanished."""
    manifest = pq.read_table(Path(out_dir) / "manifest.parquet", columns=["path", "content_hash"]).to_pylist()
    bad = []
    for row in {r["path"]: r for r in manifest}.values():
        path = Path(out_dir) / row["path"]
        if not path.is_file() or sha256_file(path) != row["content_hash"]:
            bad.append(row["path"])
    return bad
