"""Shared I/O: atomic writes, content hashes, and the canonical manifest schema.

The manifest is the contract between stages (one row per image):
    sample_id     unique id of the record: sha256(content_hash, split, source key)[:24]
    content_hash  sha256 of the stored image file's bytes (identical images share it)
    path          image path relative to the manifest's folder
    label         class name (one of classes.json)
    split         train | val | test
    width, height, mode   decoded image facts (size as stored, before EXIF orientation)
    exif_orientation      1..8 (1: none); load_canonical applies it, boxes need gate.orient_box
    source_key    where the record came from inside the source (file path or idx index)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("content_hash", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("exif_orientation", pa.int8()),  # 1..8; boxes are in the stored grid (tasks/gate.orient_box)
        ("source_key", pa.string()),
    ]
)


# One row per label (classification: box columns null) or per box (absolute xyxy pixels in the
# stored image's pixel grid). Images without rows in detection are background images.
ANNOTATION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("label", pa.string()),
        ("x1", pa.float64()),
        ("y1", pa.float64()),
        ("x2", pa.float64()),
        ("y2", pa.float64()),
    ]
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write ran out of space (ENOSPC, or EDQUOT for a quota); the message names the file.

    An OSError with the original errno, so callers that handle OSError still do. The kernel's
    own message ("[Errno 28] No space left on device") names no file for a failed write().
    """

    def __init__(self, path: Path | str, nbytes: int | None, cause: OSError):
        size = f" ({nbytes:,} bytes)" if nbytes is not None else ""
        super().__init__(cause.errno, f"no space left on device writing {path}{size}: free space on its "
                                      "filesystem and re-run; the previous file there is unchanged")
        self.path = str(path)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write via temp file + fsync + rename, so readers see the old file or the new, never half.

    A full disk raises DiskFull naming `path`, with the previous file intact and no temp file left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise (DiskFull(path, len(data), e) if e.errno in NO_SPACE else e) from e
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise DiskFull(path, len(data), e) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def save_table(table: pa.Table, path: Path | str) -> None:
    """Write a Parquet table atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def load_table(path: Path | str) -> pa.Table:
    return pq.read_table(path)


def table_content_hash(table: pa.Table, columns: list[str]) -> str:
    """Hash of a table's content independent of Parquet encoding and library versions.

    Rows are hashed in sample_id order, so the same records give the same hash however
    they were produced.
    """
    t = table.select(columns).sort_by("sample_id")
    h = hashlib.sha256("\x1f".join(columns).encode())
    for batch in t.to_batches(max_chunksize=65536):
        cols = [c.to_pylist() for c in batch.columns]
        for row in zip(*cols):
            h.update(("\x1f".join("" if v is None else str(v) for v in row) + "\n").encode())
    return h.hexdigest()


class Staged:
    """Outputs written in full first, then put in place by renames only.

    A full disk or a crash while writing leaves every previous output as it was (the staged
    copies are removed), and publishing itself needs no free space:

        with Staged() as out:
            folder = out.folder(report_dir)        # write the new report into `folder`
            out.file(metrics_path, json_bytes)
        # here: report_dir and metrics_path are both the new ones
    """

    def __init__(self) -> None:
        self._moves: list[tuple[Path, Path]] = []  # (staged, final)

    def folder(self, final: Path | str) -> Path:
        final = Path(final)
        staged = final.with_name(f".{final.name}.partial")
        shutil.rmtree(staged, ignore_errors=True)  # left by a killed run
        staged.mkdir(parents=True)
        self._moves.append((staged, final))
        return staged

    def file(self, final: Path | str, data: bytes) -> None:
        final = Path(final)
        staged = final.with_name(f".{final.name}.partial")
        atomic_write_bytes(staged, data)
        self._moves.append((staged, final))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            for staged, _ in self._moves:
                shutil.rmtree(staged, ignore_errors=True) if staged.is_dir() else staged.unlink(missing_ok=True)
            return
        for staged, final in self._moves:
            if staged.is_dir():
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                if final.exists():
                    final.rename(old)
                staged.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)
