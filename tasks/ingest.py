"""Stage ingest: a source dataset becomes one canonical, content-addressed dataset version.

Inputs:  `ingest.source` (idx files such as Fashion-MNIST, or an image-folder tree).
Outputs: data/ingest/ (`paths.data`/ingest)
    images/<hh>/<sha256>.<ext>   every accepted image, stored once by content
    manifest.parquet             one row per image (schema in tasks.io)
    quarantine.parquet           rejected records with a reason (never silently dropped)
    classes.json                 class names in label-index order
    version.json                 dataset version (hash of the manifest content) and counts
Params:  `ingest:` section.

The output folder is built beside the old one and swapped in at the end, so a crash
never leaves a partial dataset version where a finished one is expected.
"""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from tasks.io import (
    MANIFEST_SCHEMA,
    atomic_write_json,
    save_table,
    sha256_bytes,
    table_content_hash,
)
from tasks.params import IngestParams, SourceParams

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
QUARANTINE_SCHEMA = pa.schema([("source_key", pa.string()), ("split", pa.string()), ("reason", pa.string())])


class IngestError(ValueError):
    """The source cannot be read as the requested format."""


@dataclass(frozen=True)
class IngestResult:
    version: str
    out_dir: str
    manifest: str
    n_images: int
    n_quarantined: int
    classes: list[str]
    per_split: dict[str, int]


@dataclass
class _Record:
    data: bytes  # encoded image bytes as stored
    ext: str
    label: str
    split: str
    source_key: str


# --------------------------------------------------------------------------- readers


def _open_maybe_gz(base: Path) -> bytes:
    for candidate in (base, base.with_name(base.name + ".gz")):
        if candidate.is_file():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise IngestError(f"{base}(.gz): idx file not found")


def _read_idx(base: Path, expected_magic: int) -> np.ndarray:
    raw = _open_maybe_gz(base)
    if len(raw) < 8:
        raise IngestError(f"{base}: too short for an idx header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise IngestError(f"{base}: idx magic {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise IngestError(f"{base}: header says {dims} ({int(np.prod(dims))} bytes), body has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _iter_idx(root: Path, classes: list[str] | None, limit: int | None):
    for split in ("train", "test"):
        images = _read_idx(root / IDX_FILES[split], 0x00000803)
        labels = _read_idx(root / IDX_LABELS[split], 0x00000801)
        if len(images) != len(labels):
            raise IngestError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        names = classes or [str(i) for i in range(int(labels.max()) + 1)]
        n = len(images) if limit is None else min(limit, len(images))
        for i in range(n):
            buf = io.BytesIO()
            # Fixed PNG settings keep the encoding, hence the content hash, reproducible.
            Image.fromarray(images[i], mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
            label = int(labels[i])
            name = names[label] if label < len(names) else None
            yield _Record(buf.getvalue(), ".png", name, split, f"{IDX_FILES[split]}[{i}]"), label


def _iter_image_folder(root: Path, limit: int | None):
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    has_splits = subdirs and all(p.name in SPLITS for p in subdirs)
    split_dirs = [(p.name, p) for p in subdirs] if has_splits else [("train", root)]
    for split, split_dir in split_dirs:
        count = 0
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if not f.is_file() or (limit is not None and count >= limit):
                    continue
                count += 1
                key = str(f.relative_to(root))
                yield _Record(f.read_bytes(), f.suffix.lower(), class_dir.name, split, key), None


def detect_format(path: Path) -> str:
    """Guess the source format; raise naming what was found when it is ambiguous or unknown."""
    if not path.exists():
        hint = (" (the default Fashion-MNIST data comes from the Debian package dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist, or `make setup`)" if "fashion-mnist" in str(path) else "")
        raise IngestError(f"{path}: source not found{hint}")
    if not path.is_dir():
        raise IngestError(f"{path}: expected a folder (idx files or class folders)")
    names = {p.name.removesuffix(".gz") for p in path.iterdir()}
    if set(IDX_FILES.values()) <= names:
        return "idx"
    if any(p.is_dir() for p in path.iterdir()):
        return "image-folder"
    raise IngestError(
        f"{path}: cannot detect the format: no idx files ({', '.join(IDX_FILES.values())}) "
        "and no class folders; set ingest.source.format"
    )


# --------------------------------------------------------------------------- the gate


def _check_image(data: bytes, ext: str) -> tuple[int, int, str] | str:
    """Decode once; return (width, height, mode) or a quarantine reason."""
    if ext not in IMAGE_EXTENSIONS:
        return f"unsupported-extension: {ext or '(none)'}"
    if not data:
        return "empty-file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: truncated files fail here, not in training
            return img.width, img.height, img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"decode-error: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- the stage


def ingest(source: SourceParams, *, out_dir: Path, limit_per_split: int | None = None) -> IngestResult:
    """Read `source` into a new dataset version under `out_dir` (replaced atomically).

    Returns the version id, counts and paths. Raises IngestError for an unreadable source.
    """
    root = Path(source.path)
    fmt = detect_format(root) if source.format == "auto" else source.format
    if fmt == "idx":
        records = _iter_idx(root, source.classes, limit_per_split)
    elif fmt == "image-folder":
        records = _iter_image_folder(root, limit_per_split)
    else:
        raise IngestError(f"unknown format {fmt!r}; allowed: auto, idx, image-folder")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images").mkdir(parents=True)

    rows: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    quarantine: dict[str, list] = {f.name: [] for f in QUARANTINE_SCHEMA}
    written: set[str] = set()
    for rec, raw_label in records:
        facts = _check_image(rec.data, rec.ext)
        if rec.label is None:
            facts = f"label-out-of-range: {raw_label} not in classes ({len(source.classes or [])} names)"
        if isinstance(facts, str):
            for k, v in (("source_key", rec.source_key), ("split", rec.split), ("reason", facts)):
                quarantine[k].append(v)
            continue
        digest = sha256_bytes(rec.data)
        rel = f"images/{digest[:2]}/{digest}{rec.ext}"
        if rel not in written:  # identical images are stored once
            (stage / rel).parent.mkdir(exist_ok=True)
            (stage / rel).write_bytes(rec.data)
            written.add(rel)
        width, height, mode = facts
        row = {
            "sample_id": sha256_bytes(f"{digest}|{rec.split}|{rec.source_key}".encode())[:24],
            "content_hash": digest,
            "path": rel,
            "label": rec.label,
            "split": rec.split,
            "width": width,
            "height": height,
            "mode": mode,
            "source_key": rec.source_key,
        }
        for k, v in row.items():
            rows[k].append(v)

    if not rows["sample_id"]:
        shutil.rmtree(stage)
        raise IngestError(f"{root}: no readable images ({len(quarantine['reason'])} quarantined)")
    manifest = pa.table(rows, schema=MANIFEST_SCHEMA)
    if fmt == "idx":
        classes = list(source.classes or sorted(set(rows["label"]), key=int))
    else:
        classes = sorted(set(rows["label"]))
    version = "v" + table_content_hash(manifest, [f.name for f in MANIFEST_SCHEMA])[:12]
    per_split = {s: rows["split"].count(s) for s in sorted(set(rows["split"]))}

    save_table(manifest, stage / "manifest.parquet")
    save_table(pa.table(quarantine, schema=QUARANTINE_SCHEMA), stage / "quarantine.parquet")
    atomic_write_json(stage / "classes.json", classes)
    info = {
        "version": version,
        "source": str(root),
        "format": fmt,
        "n_images": manifest.num_rows,
        "n_unique_files": len(written),
        "n_quarantined": len(quarantine["reason"]),
        "per_split": per_split,
        "classes": classes,
    }
    atomic_write_json(stage / "version.json", info)

    # Swap the finished version in: rename is atomic, the old folder goes only after.
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    stage.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return IngestResult(
        version=version,
        out_dir=str(out_dir),
        manifest=str(out_dir / "manifest.parquet"),
        n_images=manifest.num_rows,
        n_quarantined=info["n_quarantined"],
        classes=classes,
        per_split=per_split,
    )


def run(params, out_dir: Path | None = None) -> IngestResult:
    """Run the stage from a loaded `Params` (the door used by dvc, flows and the CLI)."""
    p: IngestParams = params.ingest
    return ingest(p.source, out_dir=out_dir or params.paths.data / "ingest", limit_per_split=p.limit_per_split)


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    result = run(load_params(overrides=argv or []))
    print(f"dataset version {result.version}: {result.n_images} images {result.per_split}, "
          f"{result.n_quarantined} quarantined")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
