"""Source readers: a folder or label file becomes a neutral `SourceDataset` (tasks/sources.py).

Input:   `ingest.source` (params: `path`, `format`, `classes`), read by the ingest stage.
Output:  a `SourceDataset` whose items point at image files (idx sources carry PNG bytes).
Nothing here decodes or modifies an image (YOLO reads image headers for their size only).

Formats (`format: auto` picks one with `detect_format`):
    image-folder  root/<class>/* or root/<split>/<class>/*; files directly in the root or in
                  a split folder have no class and are not items; hidden files (.name) neither
    csv, parquet  label files with columns path,label[,split]; paths relative to the label
                  file's folder; split from the column, else from the file name (train.csv,
                  val.parquet), else train; a folder source reads every such file in it
    idx           MNIST / Fashion-MNIST train-/t10k- idx files (optionally .gz), PNG-encoded
    coco, voc, yolo  detection, see tasks/formats_detection.py (box conventions there)

Rules (a violation raises SourceError naming the file, the row or element, and the rule):
    * image paths stay inside the source root: absolute paths, `..` and symlinks that
      resolve outside it are rejected; symlinked folders are not followed; a path (the
      source_key) is UTF-8 text without NUL;
    * label files are UTF-8 (a BOM is dropped) and well formed (fields per row, numbers,
      known class / category ids);
    * `classes`, when given, names every label (idx: label index -> name) and fixes the
      class order; COCO / YOLO name their classes themselves and must agree with it.
Not judged here: box geometry (validation stage), split names (validation), image bytes
(image gate). An image that a label file names but that does not exist is still yielded,
so the gate quarantines it as missing and it is counted, never silently dropped.
Labels are parsed when `read_source` is called (so label errors surface before any image
is processed), except YOLO txt files, read as items are iterated; items are lazy where the
format allows (idx, image-folder, yolo) and `SourceDataset.items` can be iterated again.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image

from tasks.params import FORMATS
from tasks.sources import SourceDataset, SourceError, SourceItem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
SET_FORMAT = "set ingest.source.format"


class LazyItems:
    """Items made on demand; every iteration starts again from the source."""

    def __init__(self, make: Callable[..., Iterator[SourceItem]], *args):
        self._make, self._args = make, args

    def __iter__(self) -> Iterator[SourceItem]:
        return self._make(*self._args)


class SourceRoot:
    """The folder every image path must stay inside, checked after resolving symlinks."""

    def __init__(self, root: Path):
        self.path = Path(root)
        self.real = self.path.resolve()
        self._dirs: dict[Path, Path] = {}  # resolved parents: one stat per file, not per component

    def image(self, rel: str | Path, *, where: str, base: Path | None = None) -> tuple[Path, str]:
        """Return (resolved file, source_key) for `rel` under `base` (default: the root)."""
        text = str(rel)
        if not text.strip():
            raise SourceError(f"{where}: empty image path")
        if "\x00" in text or text.encode("utf-8", "replace").decode() != text:  # lone surrogates: non-UTF-8 bytes
            raise SourceError(f"{where}: image path {text!r} holds a NUL byte or bytes that are not UTF-8 "
                              "(source keys are UTF-8 text); rename the file")
        if os.path.isabs(text) or PureWindowsPath(text).drive:
            raise SourceError(f"{where}: image path {text!r} is absolute; image paths must be "
                              f"relative to the source root {self.path}")
        full = (base or self.path) / text
        try:
            if ".." in Path(text).parts:
                real = full.resolve()
            else:
                parent = self._dirs.get(full.parent)
                if parent is None:
                    parent = self._dirs[full.parent] = full.parent.resolve()
                real = parent / full.name
                real = real.resolve() if real.is_symlink() else real
        except OSError as e:  # a name longer than the file system allows, a symlink loop ...
            raise SourceError(f"{where}: image path {text!r} cannot be looked up: {e.strerror or e}") from None
        if not real.is_relative_to(self.real):
            raise SourceError(f"{where}: image path {text!r} resolves to {real}, outside the source root "
                              f"{self.real}; no absolute paths, '..' or symlinks leading out of the root")
        return real, Path(os.path.relpath(os.path.normpath(full), self.path)).as_posix()


# --------------------------------------------------------------------------- shared helpers


def read_text(path: Path) -> str:
    """A UTF-8 label file (a BOM is dropped); SourceError naming the line of the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as e:  # a folder where a file should be, no permission ...
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts after its BOM
        line = raw[:at].count(b"\n") + 1
        hint = "; a UTF-16 file? save it as UTF-8" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise SourceError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {at}){hint}") from None


def files_under(folder: Path) -> list[Path]:
    """Files below `folder` in sorted path order, hidden files and folders left out."""
    return sorted(p for p in folder.rglob("*")
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and (p.is_file() or p.is_symlink()))


def split_dirs(folder: Path) -> list[tuple[str, Path]]:
    """[(split, folder)] from train/val/test subfolders, else [("train", folder)]."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    named = {p.name: p for p in subdirs if p.name in SPLITS}
    if not named:
        return [("train", folder)]
    others = [p.name for p in subdirs if p.name not in SPLITS]
    if others:
        raise SourceError(f"{folder}: split folders ({', '.join(named)}) mixed with other folders "
                          f"({', '.join(others)}); use only {'/'.join(SPLITS)} at this level, or none")
    return [(s, named[s]) for s in SPLITS if s in named]


def split_from_name(stem: str) -> str | None:
    """train/val/test when a token of the file name is one (instances_val2017 -> val)."""
    for token in re.split(r"[^a-z0-9]+", stem.lower()):
        if token.rstrip("0123456789") in SPLITS:
            return token.rstrip("0123456789")
    return None


def class_list(first_seen: dict[str, str], classes: list[str] | None) -> list[str]:
    """Class names: `classes` when given (every label must be in it), else the labels sorted."""
    if classes is None:
        names = list(first_seen)
        # isdecimal, not isdigit: "²" is a digit that int() refuses
        return sorted(names, key=int) if all(n.isdecimal() for n in names) else sorted(names)
    allowed = set(classes)
    for label, where in first_seen.items():
        if label not in allowed:
            raise SourceError(f"{where}: label {label!r} is not in ingest.source.classes {list(classes)}; "
                              "add it there, or set classes to null to use the labels found")
    return list(classes)


def limit_items(items: Iterable[SourceItem], limit: int | None) -> Iterator[SourceItem]:
    """The first `limit` items of each split, in source order."""
    counts: Counter[str] = Counter()
    for item in items:
        if limit is None or counts[item.split] < limit:
            counts[item.split] += 1
            yield item


def table_files(path: Path, fmt: str) -> list[Path]:
    """The csv/parquet label file, or those in a folder with columns path and label."""
    if path.is_file():
        return [path]
    return [f for f in sorted(path.glob(f"*.{fmt}")) if {"path", "label"} <= set(_columns(f, fmt))]


def _columns(f: Path, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(f).names
        except (OSError, ValueError) as e:
            raise SourceError(f"{f}: unreadable parquet file: {e}") from None
    with f.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        return [h.strip() for h in next(csv.reader(fh), [])]


def _idx_path(base: Path) -> Path | None:
    return next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)


def _check_exists(path: Path) -> None:
    if not path.exists():
        hint = (" (the default Fashion-MNIST data comes from the Debian package dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist, or `make setup`)" if "fashion-mnist" in str(path) else "")
        raise SourceError(f"{path}: source not found{hint}")


def _need_dir(path: Path, fmt: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{path}: format {fmt} reads a folder, not a file")
    return path


def _shown(files: list[Path], root: Path) -> str:
    names = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# --------------------------------------------------------------------------- public API


def detect_format(path: Path) -> str:
    """Guess the format of `path`; raise SourceError naming what was found when ambiguous or unknown."""
    path = Path(path)
    _check_exists(path)
    if path.is_file():
        by_suffix = {".csv": "csv", ".parquet": "parquet", ".json": "coco", ".xml": "voc"}
        if path.suffix.lower() not in by_suffix:
            raise SourceError(f"{path}: cannot detect the format of a {path.suffix or 'suffix-less'} file; a "
                              f"file source is a .csv, .parquet, COCO .json or VOC .xml label file; {SET_FORMAT}")
        return by_suffix[path.suffix.lower()]
    from tasks.formats_detection import coco_files, voc_files

    found: dict[str, str] = {}
    idx = [p for base in (*IDX_FILES.values(), *IDX_LABELS.values()) if (p := _idx_path(path / base))]
    if idx:
        found["idx"] = _shown(idx, path)
    for fmt, files in (("coco", coco_files(path)), ("voc", voc_files(path)),
                       ("csv", table_files(path, "csv")), ("parquet", table_files(path, "parquet"))):
        if files:
            found[fmt] = _shown(files, path)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        found["yolo"] = "images/ and labels/"
    if len(found) > 1:
        what = "; ".join(f"{fmt}: {files}" for fmt, files in found.items())
        raise SourceError(f"{path}: ambiguous source, found {what}; {SET_FORMAT} to one of {', '.join(found)}")
    if found:
        return next(iter(found))
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return "image-folder"
    raise SourceError(f"{path}: cannot detect the format: no idx files, COCO .json, VOC .xml, YOLO images/ + "
                      f"labels/, csv/parquet file with columns path,label, nor class folders; {SET_FORMAT}")


def read_source(path: Path, *, format: str = "auto", classes: list[str] | None = None,
                limit_per_split: int | None = None) -> SourceDataset:
    """Read a source folder (or a csv/parquet/COCO label file) into a `SourceDataset`.

    Args:
        path: the source folder, or a label file (csv, parquet, COCO json, VOC xml).
        format: one of FORMATS; "auto" calls `detect_format`.
        classes: class names (idx: in label-index order); None uses the names the source gives.
        limit_per_split: keep only the first N items of each split (tests, smoke runs).
    Returns the dataset; raises SourceError for a source that breaks a rule (see the module doc).
    """
    path = Path(path)
    if format not in FORMATS:
        raise SourceError(f"unknown source format {format!r}; allowed: {', '.join(FORMATS)}")
    if limit_per_split is not None and (isinstance(limit_per_split, bool) or limit_per_split < 1):
        raise SourceError(f"limit_per_split must be a positive integer or None, got {limit_per_split!r}")
    if classes is not None and len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise SourceError(f"ingest.source.classes names {dup!r} twice; class names must be unique")
    _check_exists(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt in ("coco", "voc", "yolo"):
        from tasks import formats_detection

        reader = getattr(formats_detection, f"read_{fmt}")
    else:
        reader = {"idx": _read_idx_source, "image-folder": _read_image_folder,
                  "csv": _read_table, "parquet": _read_table}[fmt]
    return reader(path, fmt=fmt, classes=classes, limit=limit_per_split)


# --------------------------------------------------------------------------- idx


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{path}: not a readable gzip file: {e}") from None
    ndim = expected_magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise SourceError(f"{path}: {len(raw)} bytes, too short for an idx header ({4 + 4 * ndim} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise SourceError(f"{path}: idx magic {magic:#010x}, expected {expected_magic:#010x}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(dims):  # exact integers: numpy's int64 product wraps on a forged header
        raise SourceError(f"{path}: header says {dims} ({math.prod(dims)} bytes), body has {len(body)}")
    if 0 in dims[1:]:
        raise SourceError(f"{path}: header says {dims}: items of {dims[1:]} hold no pixels")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_source(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    root = _need_dir(path, fmt)
    files = {s: (_idx_path(root / IDX_FILES[s]), _idx_path(root / IDX_LABELS[s])) for s in IDX_FILES}
    files = {s: pair for s, pair in files.items() if pair != (None, None)}
    if not files:
        raise SourceError(f"{root}: no idx files ({', '.join(IDX_FILES.values())}, optionally .gz)")
    for split, (images, labels) in files.items():
        if images is None or labels is None:
            missing = IDX_FILES[split] if images is None else IDX_LABELS[split]
            raise SourceError(f"{root}: {split} split has no {missing}(.gz)")
    labels = {s: _read_idx(lab, 0x00000801) for s, (_, lab) in files.items()}
    top = max((int(a.max()) for a in labels.values() if a.size), default=-1)
    names = list(classes) if classes is not None else [str(i) for i in range(top + 1)]
    for split, a in labels.items():
        bad = np.flatnonzero(a >= len(names))
        if bad.size:
            i = int(bad[0])
            raise SourceError(f"{files[split][1]}: item {i}: label {int(a[i])} out of range; "
                              f"ingest.source.classes names {len(names)} classes (labels 0..{len(names) - 1})")
    items = LazyItems(_iter_idx, {s: f[0] for s, f in files.items()}, labels, names, limit)
    return SourceDataset("classification", names, items, format="idx")


def _iter_idx(images: dict[str, Path], labels: dict[str, np.ndarray], names: list[str],
              limit: int | None) -> Iterator[SourceItem]:
    for split, image_file in images.items():
        pixels = _read_idx(image_file, 0x00000803)
        if len(pixels) != len(labels[split]):
            raise SourceError(f"{image_file}: {len(pixels)} images but {len(labels[split])} labels")
        for i in range(len(pixels) if limit is None else min(limit, len(pixels))):
            buf = io.BytesIO()
            # Fixed PNG settings keep the encoding, hence the content hash, reproducible.
            Image.fromarray(pixels[i], mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
            yield SourceItem(split=split, source_key=f"{IDX_FILES[split]}[{i}]",
                             label=names[int(labels[split][i])], data=buf.getvalue())


# --------------------------------------------------------------------------- image folder


def _read_image_folder(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    root = _need_dir(path, fmt)
    layout = [(split, d.name, d) for split, folder in split_dirs(root)
              for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not layout:
        raise SourceError(f"{root}: no class folders; image-folder expects root/<class>/* or root/<split>/<class>/*")
    first_seen = {}
    for _, label, d in layout:
        first_seen.setdefault(label, f"{d}: class folder")
    names = class_list(first_seen, classes)
    return SourceDataset("classification", names, LazyItems(_iter_image_folder, SourceRoot(root), layout, limit),
                         format="image-folder")


def _iter_image_folder(root: SourceRoot, layout: list[tuple[str, str, Path]],
                       limit: int | None) -> Iterator[SourceItem]:
    counts: Counter[str] = Counter()
    for split, label, class_dir in layout:
        room = None if limit is None else limit - counts[split]
        for f in files_under(class_dir)[:room] if room is None or room > 0 else ():
            counts[split] += 1
            real, key = root.image(f.relative_to(root.path), where=str(f))
            yield SourceItem(split=split, source_key=key, label=label, path=real)


# --------------------------------------------------------------------------- csv and parquet


def _csv_rows(f: Path) -> Iterator[tuple[str, str, str, str | None]]:
    reader = csv.reader(io.StringIO(read_text(f), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if not {"path", "label"} <= set(header):
            raise SourceError(f"{f}: line 1: header {','.join(header) or '(empty)'} lacks columns path,label "
                              "(allowed: path,label[,split])")
        col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        for row in reader:
            where = f"{f}: line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise SourceError(f"{where}: {len(row)} fields, the header has {len(header)} ({','.join(header)})")
            yield where, row[col["path"]].strip(), row[col["label"]].strip(), (
                row[col["split"]].strip() if "split" in col else None)
    except csv.Error as e:  # a field over csv.field_size_limit
        raise SourceError(f"{f}: line {reader.line_num}: malformed CSV: {e}") from None


def _parquet_rows(f: Path) -> Iterator[tuple[str, str, str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = _columns(f, "parquet")
    names = [c for c in ("path", "label", "split") if c in found]
    if not {"path", "label"} <= set(names) or any(found.count(c) > 1 for c in names):
        raise SourceError(f"{f}: columns {found} lack path,label or name one twice (allowed: path,label[,split])")
    try:
        table = pq.read_table(f, columns=names).to_pydict()
    except (pa.ArrowException, OSError, ValueError) as e:  # a corrupt page, text that is not UTF-8
        raise SourceError(f"{f}: unreadable parquet file: {e}") from None
    for i in range(len(table["path"])):
        where = f"{f}: row {i}"
        values = {c: table[c][i] for c in names}
        if type(values["label"]) is int:  # integer labels become their decimal names
            values["label"] = str(values["label"])
        for c, v in values.items():
            if not isinstance(v, str):
                raise SourceError(f"{where}: column {c} is {v!r}; expected text (label: text or integer)")
        yield where, values["path"].strip(), values["label"].strip(), (
            values["split"].strip() if "split" in values else None)


def _read_table(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    files = table_files(path, fmt)
    if not files:
        found = sorted(path.glob(f"*.{fmt}"))
        seen = f" (found {_shown(found, path)} without them)" if found else ""
        raise SourceError(f"{path}: no .{fmt} label file with columns path,label[,split]{seen}")
    items, first_seen = [], {}
    for f in files:
        root, default_split = SourceRoot(f.parent), split_from_name(f.stem) or "train"
        for where, rel, label, split in (_csv_rows(f) if fmt == "csv" else _parquet_rows(f)):
            for column, value in (("path", rel), ("label", label), ("split", split)):
                if value == "":
                    raise SourceError(f"{where}: empty {column}" + (
                        f"; allowed: {', '.join(SPLITS)}" if column == "split" else ""))
            real, key = root.image(rel, where=where)
            first_seen.setdefault(label, where)
            items.append(SourceItem(split=split or default_split, source_key=key, label=label, path=real))
    names = class_list(first_seen, classes)
    return SourceDataset("classification", names, list(limit_items(items, limit)), format=fmt)
