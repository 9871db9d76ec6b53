"""Property tests for every label parser (tasks/formats.py, tasks/formats_detection.py) and for archives.

For each format (csv, parquet, idx, image-folder, coco, voc, yolo):
  * round trip: a random valid source, written the untidy ways tools and people write them (BOMs,
    CRLF, padding, UTF-16, CDATA, data.yaml or classes.txt ...), reads back as the same items in the
    same order: split, source_key, label or boxes, path; and the same classes / category map;
  * broken: a valid source with one rule broken (a sloppy annotator, or an attacker) raises
    SourceError whose message names the file and the row, line or element;
  * bytes: a label file mutated byte by byte is either refused with SourceError naming a file of the
    source, or read into items that can all be consumed and that stay inside the source root.
Archives: random members extract to the same tree; mutated archives raise ArchiveError and leave nothing.

Examples are derandomized (the same every run); `-m slow` runs the same properties with 25x more.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from PIL import Image

from tasks.archive import ArchiveError, extract_to_staging
from tasks.formats import IDX_FILES, IDX_LABELS, read_source
from tasks.params import ArchiveParams
from tasks.sources import Box, SourceError
from tests.fuzz_inputs import (
    FAST,
    PER_RULE,
    ROUND_TRIP,
    SLOW,
    apply_edits,
    byte_edits,
    finite,
    key_of,
    labels,
    names,
    rel_paths,
    scratch,
)

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- helpers


def _refused(read: Callable[[], object], *where: str) -> str:
    """`read()` raises SourceError whose message contains every string in `where`; returns the message."""
    with pytest.raises(SourceError) as info:
        read()
    msg = str(info.value)
    missing = [w for w in where if w not in msg]
    assert not missing, f"SourceError {msg!r} does not name {missing}"
    return msg


def _read_all(path: Path, **kw):
    ds = read_source(path, **kw)
    return ds, list(ds.items)


def _assert_inside(items, root: Path) -> None:
    """Every image a reader points at stays inside the root; keys are relative and normalized."""
    for item in items:
        if item.path is not None:
            assert item.path.resolve().is_relative_to(root), (item.source_key, item.path)
            assert not os.path.isabs(item.source_key) and ".." not in item.source_key.split("/"), item.source_key


def _sorted_classes(found: list[str]) -> list[str]:
    """The documented class order when classes is null: numeric when every label is an integer, else text."""
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=int) if all(n.isdecimal() for n in unique) else sorted(unique)


def _limited(expected: list[tuple], limit: int | None) -> list[tuple]:
    """The first `limit` expected items (split, ...) of each split, in order."""
    counts: dict[str, int] = {}
    out = []
    for item in expected:
        counts[item[0]] = counts.get(item[0], 0) + 1
        if limit is None or counts[item[0]] <= limit:
            out.append(item)
    return out


def _given_classes(data, found: list[str]) -> list[str] | None:
    """None, or ingest.source.classes as a user writes it: every label found, any order, maybe more."""
    if not data.draw(st.booleans(), label="give classes"):
        return None
    extra = data.draw(st.lists(labels(), max_size=2), label="extra classes")
    return data.draw(st.permutations(list(dict.fromkeys([*found, *extra]))), label="classes")


def _save_image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF"}[path.suffix.lower()]
    Image.new("RGB", size, (size[0] % 256, 90, size[1] % 256)).save(path, format=fmt)


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --------------------------------------------------------------------------- csv and parquet

TABLE_STEMS = {"labels": "train", "train": "train", "val_set": "val", "test2": "test", "annotations": "train"}
ABSOLUTE = ["/etc/passwd", "/tmp/x.png", "C:\\img\\a.png", "C:a.png", "\\\\server\\share\\a.png", "//server/a.png"]
ESCAPES = ["../outside.png", "a/../../outside.png", "./../outside.png", "..", "a/b/../../../outside.png",
           "out/x.png"]  # out/ is a symlink to a folder outside the root


@st.composite
def tables(draw, min_rows: int = 0):
    """Rows (path, label, split or None) of a csv/parquet label file, and how its columns are laid out."""
    ints = draw(st.booleans())
    pool = draw(st.lists(st.integers(-5, 300) if ints else labels(), min_size=1, max_size=4, unique=True))
    has_split = draw(st.booleans())
    split = st.sampled_from([*SPLITS, "holdout"]) if has_split else st.none()
    rows = draw(st.lists(st.tuples(rel_paths(), st.sampled_from(pool), split), min_size=min_rows, max_size=8))
    columns = ["path", "label"] + (["split"] if has_split else []) + (["note"] if draw(st.booleans()) else [])
    return {"rows": rows, "ints": ints, "has_split": has_split, "columns": draw(st.permutations(columns)),
            "stem": draw(st.sampled_from(sorted(TABLE_STEMS)))}


def _cells(table) -> list[list[str]]:
    return [[{"path": rel, "label": str(label), "split": split, "note": "n"}[c] for c in table["columns"]]
            for rel, label, split in table["rows"]]


def _csv_bytes(header: list[str], cells: list[list[str]], *, encoding="utf-8", newline="\n",
               quoting=csv.QUOTE_MINIMAL, pad=False, blank=False) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline, quoting=quoting)
    writer.writerow(header)
    for row in cells:
        writer.writerow([f" {c} " for c in row] if pad else row)
        if blank:
            buf.write(newline if len(row) % 2 else "," * (len(row) - 1) + newline)
    return buf.getvalue().encode(encoding)


def _parquet_bytes(table, columns: dict[str, list]) -> bytes:
    types = {"label": pa.int64() if table["ints"] else pa.string()}
    buf = io.BytesIO()
    pq.write_table(pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in columns.items()}), buf)
    return buf.getvalue()


def _parquet_columns(table, pad=False) -> dict[str, list]:
    cols = {c: [] for c in table["columns"]}
    for rel, label, split in table["rows"]:
        for c, v in (("path", rel), ("label", label), ("split", split), ("note", "n")):
            if c in cols:
                cols[c].append(f" {v} " if pad and isinstance(v, str) else v)
    return cols


def _table_round_trip(table, fmt, data):
    style = data.draw(st.fixed_dictionaries({
        "encoding": st.sampled_from(["utf-8", "utf-8-sig"]), "newline": st.sampled_from(["\n", "\r\n"]),
        "quoting": st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]), "pad": st.booleans(),
        "blank": st.booleans()}), label="style")
    via_folder = data.draw(st.booleans(), label="read the folder")
    limit = data.draw(st.one_of(st.none(), st.integers(1, 3)), label="limit_per_split")
    found = [str(label) for _, label, _ in table["rows"]]
    classes = _given_classes(data, found)
    event(fmt)
    with scratch() as root:
        f = root / f"{table['stem']}.{fmt}"
        if fmt == "csv":
            f.write_bytes(_csv_bytes(table["columns"], _cells(table), **style))
        else:
            f.write_bytes(_parquet_bytes(table, _parquet_columns(table, pad=style["pad"])))
        ds, items = _read_all(root if via_folder else f, classes=classes, limit_per_split=limit)
        default = TABLE_STEMS[table["stem"]]
        want = _limited([(split or default, key_of(rel), str(label)) for rel, label, split in table["rows"]], limit)
        assert [(i.split, i.source_key, i.label) for i in items] == want
        assert [i.path for i in items] == [root / key for _, key, _ in want]
        assert (ds.task, ds.format) == ("classification", fmt)
        assert ds.classes == (classes if classes is not None else _sorted_classes(found))


@ROUND_TRIP
@given(table=tables(), fmt=st.sampled_from(["csv", "parquet"]), data=st.data())
def test_table_round_trip(table, fmt, data):
    _table_round_trip(table, fmt, data)


TABLE_BREAKS = ["fields-", "fields+", "empty-path", "empty-label", "empty-split", "absolute", "escape", "nul",
                "long-name", "not-in-classes", "latin-1", "utf-16", "header", "empty-file"]
PARQUET_BREAKS = ["empty-path", "empty-label", "empty-split", "absolute", "escape", "nul", "long-name",
                  "not-in-classes", "null-label", "float-label", "no-label-column"]


def _table_broken(table, fmt, brk, data):
    """Write `table` with rule `brk` broken in one row; reading it must name the file and that row."""
    rows, cols = table["rows"], table["columns"]
    k = data.draw(st.integers(0, len(rows) - 1), label="broken row")
    line = f"line {k + 2}" if fmt == "csv" else f"row {k}"
    rel, label, _ = rows[k]
    classes, value, where = None, None, [line]
    column = {"empty-path": "path", "absolute": "path", "escape": "path", "nul": "path", "long-name": "path",
              "empty-label": "label", "empty-split": "split"}.get(brk)
    if brk.startswith("empty-"):
        value, where = "  ", [line, f"empty {column}"]
    elif brk == "absolute":
        value, where = data.draw(st.sampled_from(ABSOLUTE), label="path"), [line, "absolute"]
    elif brk == "escape":
        value, where = data.draw(st.sampled_from(ESCAPES), label="path"), [line, "outside the source root"]
    elif brk == "nul":
        value = rel[:1] + "\x00" + rel[1:]
    elif brk == "long-name":
        value = "a" * 300 + ".png"
    elif brk == "not-in-classes":
        first = next(j for j, r in enumerate(rows) if str(r[1]) == str(label))
        classes = list(dict.fromkeys(str(r[1]) for r in rows if str(r[1]) != str(label)))
        where = [f"line {first + 2}" if fmt == "csv" else f"row {first}", "not in ingest.source.classes"]
    with scratch() as base:
        root, outside = base / "src", base / "outside"
        for name in ("x.png", "outside.png"):
            _save_image(outside / name, (2, 2))
        root.mkdir()
        (root / "out").symlink_to(outside)
        f = root / f"{table['stem']}.{fmt}"
        if fmt == "parquet":
            columns = _parquet_columns(table)
            types = {c: pa.string() for c in columns}
            types["label"] = pa.int64() if table["ints"] else pa.string()
            if brk in ("empty-label", "null-label"):
                columns["label"], types["label"] = [str(v) for v in columns["label"]], pa.string()
            if column:
                columns[column][k] = value
            elif brk == "null-label":
                columns["label"][k], where = None, [line, "column label is None"]
            elif brk == "float-label":
                columns["label"], types["label"] = [1.5] * len(rows), pa.float64()
                where = ["row 0", "column label is 1.5"]
            elif brk == "no-label-column":
                del columns["label"], types["label"]
                where = ["lack path,label"]
            pq.write_table(pa.table({c: pa.array(v, types[c]) for c, v in columns.items()}), f)
            return _refused(lambda: read_source(f, classes=classes), str(f), *where)
        header, cells, encoding = list(cols), _cells(table), "utf-8"
        if column:
            cells[k][cols.index(column)] = value
        elif brk in ("fields-", "fields+"):
            cells[k] = cells[k][:-1] if brk == "fields-" else [*cells[k], "extra"]
            where = [line, "fields"]
        elif brk == "latin-1":  # one non-ASCII label saved by an editor in latin-1
            cells = [[c.encode("ascii", "replace").decode() for c in row] for row in cells]
            cells[k][cols.index("label")] = "café"
            encoding, where = "latin-1", [line, "not UTF-8"]
        elif brk == "utf-16":
            encoding, where = "utf-16", ["line 1", "not UTF-8", "UTF-16"]
        elif brk == "header":
            header[header.index("label")] = "lable"
            where = ["line 1", "lacks columns path,label"]
        elif brk == "empty-file":
            where = ["line 1", "lacks columns path,label"]
        f.write_bytes(b"" if brk == "empty-file" else _csv_bytes(header, cells, encoding=encoding))
        return _refused(lambda: read_source(f, classes=classes), str(f), *where)


@PER_RULE
@given(table=tables(min_rows=1), data=st.data())
@pytest.mark.parametrize("fmt, brk", [("csv", b) for b in TABLE_BREAKS] + [("parquet", b) for b in PARQUET_BREAKS])
def test_table_with_one_rule_broken_is_refused_naming_file_and_row(fmt, brk, table, data):
    assume(brk != "empty-split" or table["has_split"])
    _table_broken(table, fmt, brk, data)


# --------------------------------------------------------------------------- idx


@st.composite
def idx_sources(draw):
    splits = draw(st.lists(st.sampled_from(["train", "test"]), min_size=1, max_size=2, unique=True))
    out = {}
    for split in splits:
        n, h, w = draw(st.integers(0, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        pixels = np.array(draw(st.lists(st.integers(0, 255), min_size=n * h * w, max_size=n * h * w)),
                          np.uint8).reshape(n, h, w)
        out[split] = (pixels, np.array(draw(st.lists(st.integers(0, 11), min_size=n, max_size=n)), np.uint8),
                      draw(st.booleans()), draw(st.booleans()))  # gzip the images, the labels
    return out


def _idx_bytes(arr: np.ndarray, magic: int, gz: bool = False) -> bytes:
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _write_idx(root: Path, split: str, pixels, labels_, gz_images=False, gz_labels=False) -> tuple[Path, Path]:
    images = root / (IDX_FILES[split] + (".gz" if gz_images else ""))
    lab = root / (IDX_LABELS[split] + (".gz" if gz_labels else ""))
    images.write_bytes(_idx_bytes(pixels, 0x803, gz_images))
    lab.write_bytes(_idx_bytes(labels_, 0x801, gz_labels))
    return images, lab


@ROUND_TRIP
@given(source=idx_sources(), data=st.data())
def test_idx_round_trip(source, data):
    limit = data.draw(st.one_of(st.none(), st.integers(1, 3)), label="limit_per_split")
    top = max((int(lab.max()) for _, lab, *_ in source.values() if lab.size), default=-1)
    default = [str(i) for i in range(top + 1)]
    extra = data.draw(st.integers(0, 2), label="classes beyond the labels")
    classes = data.draw(st.sampled_from([None, [f"class {i}" for i in range(top + 1 + extra)]]), label="classes")
    names_ = classes if classes is not None else default
    with scratch() as root:
        for split, (pixels, lab, gz_i, gz_l) in source.items():
            _write_idx(root, split, pixels, lab, gz_i, gz_l)
        ds, items = _read_all(root, classes=classes, limit_per_split=limit)
        assert (ds.format, ds.classes) == ("idx", names_)
        want = _limited([(split, f"{IDX_FILES[split]}[{i}]", names_[int(label)], i)
                         for split in ("train", "test") if split in source
                         for i, label in enumerate(source[split][1])], limit)
        assert [(i.split, i.source_key, i.label) for i in items] == [w[:3] for w in want]
        for item, (split, _, _, i) in zip(items, want, strict=True):
            with Image.open(io.BytesIO(item.data)) as img:
                assert np.array_equal(np.asarray(img), source[split][0][i])


IDX_BREAKS = ["magic", "short-header", "short-body", "long-body", "dims-overflow", "zero-size", "gz-corrupt",
              "gz-truncated", "label-out-of-range", "count-mismatch", "no-labels-file"]


@PER_RULE
@given(n=st.integers(1, 4), gz=st.booleans(), cut=st.integers(0, 30))
@pytest.mark.parametrize("brk", IDX_BREAKS)
def test_idx_with_one_rule_broken_is_refused_naming_the_file(brk, n, gz, cut):
    pixels, lab = np.zeros((n, 3, 2), np.uint8), np.arange(n, dtype=np.uint8)
    with scratch() as root:
        images, labels_file = _write_idx(root, "train", pixels, lab, gz, gz)
        raw = gzip.decompress(images.read_bytes()) if gz else images.read_bytes()
        bad, where, classes = None, [str(images)], None
        if brk == "magic":
            bad = struct.pack(">I", 0x801) + raw[4:]
        elif brk == "short-header":
            bad = raw[: 4 + cut % 12]
        elif brk == "short-body":
            bad = raw[:-1]
        elif brk == "long-body":
            bad = raw + b"\x00"
        elif brk == "dims-overflow":  # 2**22 * 2**22 * 2**20 = 2**64: wraps to 0 in a 64-bit product
            bad = struct.pack(">IIII", 0x803, 1 << 22, 1 << 22, 1 << 20)
        elif brk == "zero-size":
            bad = struct.pack(">IIII", 0x803, n, 0, 2)
        elif brk == "label-out-of-range":
            classes, where = [f"c{i}" for i in range(n - 1)], [str(labels_file), f"item {n - 1}", "out of range"]
        elif brk == "count-mismatch":
            bad, where = _idx_bytes(np.zeros((n + 1, 3, 2), np.uint8), 0x803), [str(images), "images but"]
        elif brk == "no-labels-file":
            labels_file.unlink()
            where = [str(root), IDX_LABELS["train"]]
        if brk in ("gz-corrupt", "gz-truncated"):  # the images as .gz, their deflate stream broken or cut
            images.unlink()
            images = root / (IDX_FILES["train"] + ".gz")
            body = bytearray(gzip.compress(raw, mtime=0))
            if brk == "gz-corrupt":
                body[10:-8] = bytes(b ^ 0x5A for b in body[10:-8])
            else:
                del body[10 + cut % (len(body) - 10) :]
            images.write_bytes(bytes(body))
            where = [str(images), "not a readable gzip file"]
        elif bad is not None:
            images.write_bytes(gzip.compress(bad, mtime=0) if gz else bad)
        _refused(lambda: _read_all(root, classes=classes), *where)


# --------------------------------------------------------------------------- image folder


@st.composite
def folder_sources(draw):
    classes = draw(st.lists(st.one_of(names(), st.integers(0, 40).map(str)), min_size=1, max_size=3, unique=True))
    splits = draw(st.one_of(st.none(), st.lists(st.sampled_from(SPLITS), min_size=1, max_size=3, unique=True)))
    files = []
    for split in splits or [None]:
        for cls in classes:
            for rel in draw(st.lists(rel_paths(noisy=False), max_size=3, unique=True)):
                files.append((split, cls, rel, draw(st.booleans()) and draw(st.booleans())))  # rare: hidden
    return {"splits": splits, "classes": classes, "files": files, "link": draw(st.booleans())}


@ROUND_TRIP
@given(source=folder_sources(), data=st.data())
def test_image_folder_round_trip(source, data):
    limit = data.draw(st.one_of(st.none(), st.integers(1, 3)), label="limit_per_split")
    with scratch() as root:
        written: dict[tuple, tuple[str, str, Path]] = {}  # parts under the split folder -> (split, class, file)
        for split, cls, rel, hidden in source["files"]:
            parts = (cls, *rel.split("/"))
            if hidden:  # a hidden file or folder (.DS_Store, .ipynb_checkpoints/) is not an item
                parts = (cls, "." + parts[1], *parts[2:])
            target = (root / split if split else root).joinpath(*parts)
            key = (split or "", *parts)
            if any(k[: len(key)] == key or key[: len(k)] == k for k in written):
                continue  # the same path as a file and as a folder: keep the first
            _write(target, b"")
            written[key] = (split or "train", cls, target)
        for split in source["splits"] or [None]:
            for cls in source["classes"]:  # every class folder exists, with files or not
                (root / split / cls if split else root / cls).mkdir(parents=True, exist_ok=True)
            _write(root / split / "notes.txt" if split else root / "README.txt", "not an item")
        visible = {k: v for k, v in written.items() if not any(p.startswith(".") for p in k)}
        if source["link"] and visible:  # a symlink to an image inside the root: an item, its path the target
            k, (split, cls, target) = next(iter(visible.items()))
            target.with_name("~link" + target.suffix).symlink_to(target)  # "~": a name names() never makes
            visible[(*k[:-1], "~link" + target.suffix)] = (split, cls, target)
        order = {s: i for i, s in enumerate(["", *SPLITS])}
        expected = [(split, "/".join(p for p in k if p), cls, target.resolve())
                    for k, (split, cls, target) in sorted(visible.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:]))]
        classes = _given_classes(data, source["classes"])
        ds, items = _read_all(root, format="image-folder", classes=classes, limit_per_split=limit)
        want = _limited(expected, limit)
        assert [(i.split, i.source_key, i.label, i.path) for i in items] == want
        assert ds.classes == (classes if classes is not None else _sorted_classes(source["classes"]))


# --------------------------------------------------------------------------- COCO

COCO_STEMS = {"instances_val2017": "val", "train": "train", "annotations": "train", "coco_test": "test"}


@st.composite
def coco_sources(draw, min_images: int = 0):
    """A COCO document: categories with unique ids and names, images, annotations with finite boxes."""
    n_cats = draw(st.integers(1, 4))
    cat_ids = draw(st.lists(st.integers(-1000, 10**12), min_size=n_cats, max_size=n_cats, unique=True))
    cat_names = draw(st.lists(st.one_of(labels(), labels().map(lambda s: f" {s} ")), min_size=n_cats,
                              max_size=n_cats, unique=True))  # names are kept as written, spaces too
    placed = draw(st.booleans())  # the files exist under images/ (looked up there), or nowhere
    n_images = draw(st.integers(min_images, 4))
    image_ids = draw(st.lists(st.one_of(st.integers(-10, 10**12), labels()), min_size=n_images,
                              max_size=n_images, unique=True))
    files = [draw(rel_paths(noisy=not placed)) for _ in image_ids]
    assume(not placed or all(f.split("/")[0] != "images" for f in files))
    anns = draw(st.lists(st.tuples(st.integers(0, max(n_images - 1, 0)), st.integers(0, n_cats - 1),
                                   st.lists(finite(), min_size=4, max_size=4)), min_size=min_images,
                          max_size=8 if n_images else 0))
    return {"cats": list(zip(cat_ids, cat_names)), "images": list(zip(image_ids, files)), "anns": anns,
            "placed": placed, "stem": draw(st.sampled_from(sorted(COCO_STEMS))),
            "in_annotations": draw(st.booleans()), "cat_order": draw(st.permutations(range(n_cats)))}


def _coco_doc(src) -> dict:
    cats = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in src["cats"]]
    return {
        "info": {"description": "fuzz"}, "licenses": [],
        "images": [{"id": iid, "file_name": fn, "width": 0, "height": 0} for iid, fn in src["images"]],
        "annotations": [{"id": n + 1, "image_id": src["images"][i][0], "category_id": src["cats"][c][0],
                         "bbox": bbox, "area": 1.0, "iscrowd": n % 2, "segmentation": []}
                        for n, (i, c, bbox) in enumerate(src["anns"])],
        "categories": [cats[i] for i in src["cat_order"]],
    }


def _coco_file(root: Path, src) -> Path:
    return root / ("annotations" if src["in_annotations"] else "") / f"{src['stem']}.json"


@ROUND_TRIP
@given(src=coco_sources(), data=st.data())
def test_coco_round_trip(src, data):
    style = data.draw(st.fixed_dictionaries({"encoding": st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
                                             "ensure_ascii": st.booleans(), "indent": st.sampled_from([None, 2])}),
                      label="style")
    by_id = sorted(src["cats"])
    names_ = [name for _, name in by_id]
    classes = data.draw(st.sampled_from([None, names_]), label="classes")
    with scratch() as root:
        f = _coco_file(root, src)
        text = json.dumps(_coco_doc(src), ensure_ascii=style["ensure_ascii"], indent=style["indent"])
        _write(f, text.encode(style["encoding"]))
        if src["placed"]:
            for _, fn in src["images"]:
                _write(root / "images" / fn, b"")
        ds, items = _read_all(f, format=data.draw(st.sampled_from(["coco", "auto"]), label="format"),
                              classes=classes)
        assert (ds.task, ds.format, ds.classes, ds.category_map) == ("detection", "coco", names_, dict(by_id))
        boxes = {i: [] for i in range(len(src["images"]))}
        for i, c, (x, y, w, h) in src["anns"]:
            x, y, w, h = float(x), float(y), float(w), float(h)
            boxes[i].append(Box(src["cats"][c][1], x, y, x + w, y + h))
        prefix = "images/" if src["placed"] else ""
        want = [(COCO_STEMS[src["stem"]], prefix + key_of(fn), boxes[i]) for i, (_, fn) in enumerate(src["images"])]
        assert [(i.split, i.source_key, i.boxes) for i in items] == want
        assert [i.path for i in items] == [root / key for _, key, _ in want]


COCO_BREAKS = {  # break: (the element it is in, what the message says)
    "bbox-nan": ("annotations", "NaN"), "bbox-infinity": ("annotations", "Infinity"),
    "bbox-short": ("annotations", "bbox"), "bbox-text": ("annotations", "bbox"), "bbox-bool": ("annotations", "bbox"),
    "bbox-null": ("annotations", "bbox"), "bbox-400-digits": ("annotations", "bbox"),
    "bbox-5000-digits": ("", "4300 digits"), "bbox-1e400": ("annotations", "bbox"),
    "bbox-overflow": ("annotations", "overflows"), "category-unknown": ("annotations", "unknown category_id"),
    "category-text": ("annotations", "unknown category_id"), "category-float": ("annotations", "unknown category_id"),
    "image-unknown": ("annotations", "not an id in images"), "image-true": ("annotations", "not an id in images"),
    "image-missing": ("annotations", "not an id in images"), "annotation-not-object": ("annotations", "an object"),
    "file-missing": ("images", "file_name"), "file-empty": ("images", "empty image path"),
    "file-absolute": ("images", "absolute"), "file-escape": ("images", "outside the source root"),
    "file-nul": ("images", "NUL"), "file-surrogate": ("images", "not UTF-8"), "file-long": ("images", "looked up"),
    "image-id-float": ("images", "id"), "image-id-bool": ("images", "id"), "image-id-twice": ("images", "twice"),
    "category-id-twice": ("categories", "appears twice"), "category-name-twice": ("categories", "two ids"),
    "category-name-blank": ("categories", "non-empty name"), "category-id-text": ("categories", "integer id"),
    "no-categories": ("", "categories is empty"), "top-level-list": ("", "not a COCO detection file"),
    "no-annotations-key": ("", "not a COCO detection file"), "truncated": ("", "invalid JSON"),
    "deep-nesting": ("", "unreadable JSON"), "latin-1": ("", "not UTF-8"), "classes-differ": ("", "categories by id"),
}
_RAW = "@@raw@@"  # a JSON string replaced by raw text json.dumps cannot write


def _break_coco(doc: dict, brk: str, k: int) -> tuple[str | bytes, str]:
    """The document text with `brk`, and the element path the message must name ("" for the file)."""
    anns, images, cats = doc["annotations"], doc["images"], doc["categories"]
    section = COCO_BREAKS[brk][0]
    k %= max(len(doc[section]), 1) if section else 1
    raw = None
    a, im, cat = ((xs[k % len(xs)] if xs else {}) for xs in (anns, images, cats))
    value = {"bbox-nan": [0, 0, float("nan"), 1], "bbox-infinity": [0, float("inf"), 1, 1], "bbox-short": [0, 1, 2],
             "bbox-text": [0, 0, "5", 5], "bbox-bool": [0, 0, True, 1], "bbox-null": None,
             "bbox-overflow": [1e308, 0, 1.7e308, 1]}
    if brk in value:
        a["bbox"] = value[brk]
    elif brk in ("bbox-400-digits", "bbox-5000-digits", "bbox-1e400"):
        a["bbox"], raw = _RAW, {"bbox-400-digits": "[0, 0, 1" + "0" * 400 + ", 1]", "bbox-1e400": "[0, 0, 1e400, 1]",
                                "bbox-5000-digits": "[0, 0, 1" + "0" * 5000 + ", 1]"}[brk]
    elif brk.startswith("category-") and section == "annotations":
        a["category_id"] = {"category-unknown": max(c["id"] for c in cats) + 1, "category-text": str(cats[0]["id"]),
                            "category-float": float(cats[0]["id"]) + 0.5}[brk]
    elif brk == "image-unknown":
        a["image_id"] = "no such image"
    elif brk == "image-true":  # True == 1 in Python: it must not pass as image id 1
        for j, image in enumerate(images):
            image["id"] = 1 if j == 0 else f"image {j}"
        for other in anns:
            other["image_id"] = 1 if other is not a else True
    elif brk == "image-missing":
        del a["image_id"]
    elif brk == "annotation-not-object":
        anns[k] = [a.get("image_id"), a.get("bbox")]
    elif brk == "file-missing":
        del im["file_name"]
    elif brk.startswith("file-"):
        im["file_name"] = {"file-empty": " ", "file-absolute": "/etc/passwd", "file-escape": "../../x.png",
                           "file-nul": "a\x00.png", "file-surrogate": "\ud800.png",
                           "file-long": "a" * 300 + ".png"}[brk]
    elif brk in ("image-id-float", "image-id-bool"):
        im["id"] = 1.5 if brk == "image-id-float" else False
    elif brk == "image-id-twice":
        images.append({**im, "file_name": "twin.png"})
        k = len(images) - 1
    elif brk == "category-id-twice":
        cats.append({"id": cat["id"], "name": cat["name"] + " again"})
        k = len(cats) - 1
    elif brk == "category-name-twice":
        cats.append({"id": max(c["id"] for c in cats) + 1, "name": cat["name"]})
        k = len(cats) - 1
    elif brk == "category-name-blank":
        cat["name"] = "  "
    elif brk == "category-id-text":
        cat["id"] = str(cat["id"])
    elif brk == "no-categories":
        doc["categories"], doc["annotations"] = [], []
    elif brk == "top-level-list":
        return json.dumps([doc]), ""
    elif brk == "no-annotations-key":
        del doc["annotations"]
    elif brk == "deep-nesting":
        doc["info"], raw = _RAW, "[" * 100_000 + "]" * 100_000
    text = json.dumps(doc, allow_nan=True)
    text = text.replace(json.dumps(_RAW), raw) if raw else text
    if brk == "truncated":
        return text[: len(text) * (k % 7 + 1) // 8], ""  # any proper prefix of an object is invalid
    if brk == "latin-1":
        return text.replace("{", '{"note": "caf\u00e9", ', 1).encode("latin-1", "replace"), ""
    return text, f"{section}[{k}]" if section else ""


@PER_RULE
@given(src=coco_sources(min_images=1), k=st.integers(0, 7))
@pytest.mark.parametrize("brk", sorted(COCO_BREAKS))
def test_coco_with_one_rule_broken_is_refused_naming_file_and_element(brk, src, k):
    doc = _coco_doc(src)
    text, element = _break_coco(doc, brk, k)
    with scratch() as base:
        root = base / "src"
        f = _write(_coco_file(root, src), text.encode() if isinstance(text, str) else text)
        _write(base / "x.png", b"")
        classes = ["surely", "not", "these"] if brk == "classes-differ" else None
        _refused(lambda: read_source(f, classes=classes), str(f), element, COCO_BREAKS[brk][1])


# --------------------------------------------------------------------------- Pascal VOC


def _coord_text(draw) -> str:
    v = draw(finite(-1e4, 1e5))
    style = draw(st.sampled_from(["repr", "int", "fixed", "padded"]))
    return {"repr": repr(v), "int": str(int(v)), "fixed": f"{v:.3f}", "padded": f"\n   {v!r}  "}[style]


@st.composite
def voc_objects(draw):
    return {"name": draw(labels()), "coords": [_coord_text(draw) for _ in range(4)],
            "cdata": draw(st.booleans()), "extras": draw(st.booleans())}


@st.composite
def voc_sources(draw, min_objects: int = 0, layouts=("voc", "voc-lists", "flat")):
    # a stem is one word: the split lists are whitespace-separated
    stems = draw(st.lists(names().filter(lambda s: " " not in s), min_size=1, max_size=4, unique=True))
    layout = draw(st.sampled_from(layouts))
    anns = {stem: {"filename": draw(rel_paths()), "objects": draw(st.lists(voc_objects(), min_size=min_objects,
                                                                              max_size=4)),
                   "encoding": draw(st.sampled_from(["utf-8", "utf-8-decl", "utf-16", "latin-1"])),
                   "extras": draw(st.booleans())} for stem in stems}
    splits = {stem: draw(st.sampled_from(SPLITS)) for stem in stems} if layout == "voc-lists" else {}
    return {"anns": anns, "layout": layout, "splits": splits, "order": draw(st.permutations(stems)),
            "listing": draw(st.fixed_dictionaries({"bom": st.booleans(), "crlf": st.booleans(),
                                                   "column": st.booleans(), "blank": st.booleans()}))}


def _voc_xml(ann, *, head: str = "", body_extra: str = "") -> bytes:
    def name_xml(obj) -> str:
        n = obj["name"]
        return f"<![CDATA[ {n} ]]>" if obj["cdata"] and "]]>" not in n else f"  {escape(n)} "

    objects = "".join(
        f"<object><name>{name_xml(o)}</name>"
        + ("<pose>Unspecified</pose><truncated>0</truncated><difficult>1</difficult>" if o["extras"] else "")
        + "<bndbox>" + "".join(f"<{t}>{c}</{t}>" for t, c in zip(("xmin", "ymin", "xmax", "ymax"), o["coords"]))
        + "</bndbox></object>\n" for o in ann["objects"])
    extras = ann["extras"]
    body = (f"<annotation>{'<folder>VOC2012</folder><!-- by hand -->' if extras else ''}"
            f"<filename>{escape(ann['filename'])}</filename>"
            f"{'<size><width>0</width><height>0</height><depth>3</depth></size>' if extras else ''}"
            f"{objects}{body_extra}</annotation>\n")
    encoding = ann["encoding"]
    if encoding == "latin-1":
        try:
            return (f'<?xml version="1.0" encoding="ISO-8859-1"?>\n{head}' + body).encode("latin-1")
        except UnicodeEncodeError:
            encoding = "utf-8-decl"
    if encoding == "utf-8":
        return (head + body).encode()
    codec = "utf-16" if encoding == "utf-16" else "utf-8"
    return (f'<?xml version="1.0" encoding="{codec.upper()}"?>\n{head}' + body).encode(codec)


def _voc_layout(root: Path, src) -> tuple[Path, Path, str, dict[str, Path]]:
    """Write the source; return (xml folder, listing folder, image prefix, stem -> listing file)."""
    flat = src["layout"] == "flat"
    xml_dir = root if flat else root / "Annotations"
    xml_dir.mkdir(parents=True, exist_ok=True)
    if not flat:
        (root / "JPEGImages").mkdir()
    lists: dict[str, Path] = {}
    style = src["listing"]
    for split in SPLITS:
        listed = [s for s in src["order"] if src["splits"].get(s) == split]
        if listed:
            nl = "\r\n" if style["crlf"] else "\n"
            text = nl.join(f"{s}  1" if style["column"] else s for s in listed) + nl + (nl if style["blank"] else "")
            f = _write(root / "ImageSets" / "Main" / f"{split}.txt", text.encode("utf-8-sig" if style["bom"] else "utf-8"))
            lists.update({s: f for s in listed})
    return xml_dir, root / "ImageSets" / "Main", "" if flat else "JPEGImages/", lists


def _voc_expected(src, prefix: str, stems: list[str]) -> list[tuple]:
    return [(src["splits"].get(stem, "train"), key_of(prefix + src["anns"][stem]["filename"]),
             [Box(o["name"], float(o["coords"][0]) - 1, float(o["coords"][1]) - 1, float(o["coords"][2]),
                  float(o["coords"][3])) for o in src["anns"][stem]["objects"]]) for stem in stems]


@ROUND_TRIP
@given(src=voc_sources(), data=st.data())
def test_voc_round_trip(src, data):
    single = data.draw(st.booleans(), label="read one xml file")
    with scratch() as root:
        xml_dir, _, prefix, _ = _voc_layout(root, src)
        for stem, ann in src["anns"].items():
            _write(xml_dir / f"{stem}.xml", _voc_xml(ann))
        if single:
            stems = [src["order"][0]]
            src = {**src, "splits": {}}  # a single file is a train item
        elif src["splits"]:
            stems = [s for split in SPLITS for s in src["order"] if src["splits"][s] == split]
        else:
            stems = sorted(src["anns"], key=lambda s: f"{s}.xml")
        want = _voc_expected(src, prefix, stems)
        found = [b.label for _, _, boxes in want for b in boxes]
        classes = _given_classes(data, found)
        ds, items = _read_all(xml_dir / f"{stems[0]}.xml" if single else root, format="voc", classes=classes)
        assert (ds.task, ds.format) == ("detection", "voc")
        assert [(i.split, i.source_key, i.boxes) for i in items] == want
        assert [i.path for i in items] == [root / key for _, key, _ in want]
        assert ds.classes == (classes if classes is not None else _sorted_classes(found))


_LOL = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
VOC_BREAKS = {  # break: (element the message names, with {k} the object, or "" for the file; what it says)
    "billion-laughs": ("", "DTD"), "external-entity": ("", "DTD"), "doctype-system": ("", "DTD"),
    "parameter-entity": ("", "DTD"), "truncated": ("", "malformed XML"), "mismatched-tag": ("", "malformed XML"),
    "latin-1-undeclared": ("", "malformed XML"), "empty-file": ("", "malformed XML"),
    "root-element": ("", "expected <annotation>"), "no-filename": ("<annotation/filename>", "missing"),
    "no-name": ("<annotation/object[{k}]/name>", "missing"), "empty-xmin": ("object[{k}]/bndbox/xmin", "missing"),
    "no-bndbox": ("object[{k}]/bndbox/", "missing"), "coord-not-finite": ("object[{k}]/bndbox/ymax", "not a finite"),
    "filename-absolute": ("<annotation/filename>", "absolute"),
    "filename-escape": ("<annotation/filename>", "outside the source root"),
    "filename-long": ("<annotation/filename>", "looked up"),
    "name-not-in-classes": ("<annotation/object[{k}]/name>", "not in ingest.source.classes"),
    "listing-latin-1": ("line {n}", "not UTF-8"), "listing-path": ("line {n}", "plain file stem"),
    "listing-unknown": ("line {n}", "no annotation file"), "listing-long": ("line {n}", "looked up"),
    "xml-symlink-outside": ("line {n}", "outside the source root"),
}


@PER_RULE
@given(src=voc_sources(min_objects=1, layouts=("voc-lists",)), data=st.data())
@pytest.mark.parametrize("brk", sorted(VOC_BREAKS))
def test_voc_with_one_rule_broken_is_refused_naming_file_and_element(brk, src, data):
    stem = data.draw(st.sampled_from(src["order"]), label="broken file")
    ann = src["anns"][stem]
    k = data.draw(st.integers(0, len(ann["objects"]) - 1), label="broken object")
    objects = [dict(o) for o in ann["objects"]]
    ann = {**ann, "objects": objects}
    head = body_extra = ""
    classes = None
    with scratch() as base:
        root = base / "src"
        secret = _write(base / "secret.txt", "TOP-SECRET-42")
        xml_dir, _, _, lists = _voc_layout(root, src)
        for other, a in src["anns"].items():
            if other != stem:
                _write(xml_dir / f"{other}.xml", _voc_xml(a))
        xml = xml_dir / f"{stem}.xml"
        element, says = VOC_BREAKS[brk]
        listing = lists[stem]
        n = [ln.split()[0] if ln.split() else "" for ln in listing.read_text(encoding="utf-8-sig").splitlines()
             ].index(stem) + 1
        if brk == "billion-laughs":
            head, objects[k]["name"] = f'<!DOCTYPE annotation [<!ENTITY lol0 "lol">{_LOL}]>', "&lol9;"
        elif brk == "external-entity":
            head = f'<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{secret}">]>'
            body_extra = "<note>&xxe;</note>"
        elif brk == "doctype-system":
            head = f'<!DOCTYPE annotation SYSTEM "file://{secret}">'
        elif brk == "parameter-entity":
            head = f'<!DOCTYPE annotation [<!ENTITY % p SYSTEM "file://{secret}"> %p;]>'
        elif brk == "no-name":
            objects[k]["name"] = " "
        elif brk in ("empty-xmin", "coord-not-finite"):
            i = 0 if brk == "empty-xmin" else 3
            objects[k]["coords"] = [*objects[k]["coords"][:i], data.draw(st.sampled_from(
                [""] if i == 0 else ["nan", "inf", "-Infinity", "1e999", "abc", "1,5", "0x10"]), label="coord"),
                *objects[k]["coords"][i + 1:]]
        elif brk.startswith("filename-"):
            ann["filename"] = {"filename-absolute": "/etc/passwd", "filename-escape": "../../secret.txt",
                               "filename-long": "b" * 300 + ".png"}[brk]
        elif brk == "name-not-in-classes":
            found = [o["name"] for s in src["anns"] for o in (objects if s == stem else src["anns"][s]["objects"])]
            objects[k]["name"] = "zebra-not-a-class"
            classes = list(dict.fromkeys(found))
            first = [o["name"] for o in objects].index("zebra-not-a-class")
            element = f"<annotation/object[{first + 1}]/name>"
        content = _voc_xml(ann, head=head, body_extra=body_extra)
        if brk in ("no-filename", "no-bndbox"):
            content = _voc_xml({**ann, "encoding": "utf-8"}).decode()
            if brk == "no-filename":
                content = content.replace(f"<filename>{escape(ann['filename'])}</filename>", "", 1)
            else:
                start, end = [m.span() for m in re.finditer(r"<bndbox>.*?</bndbox>", content, re.DOTALL)][k]
                content = content[:start] + content[end:]
            content = content.encode()
        elif brk == "truncated":
            content = content[: len(content) * (k % 3 + 1) // 4]
        elif brk == "mismatched-tag":
            content = _voc_xml({**ann, "encoding": "utf-8"}).replace(b"</filename>", b"</file>", 1)
        elif brk == "latin-1-undeclared":
            content = _voc_xml({**ann, "encoding": "utf-8", "filename": "caf\u00e9.png"}).decode().encode("latin-1",
                                                                                                      "replace")
        elif brk == "empty-file":
            content = b""
        elif brk == "root-element":
            content = _voc_xml({**ann, "encoding": "utf-8"}).replace(b"annotation>", b"annotations>")
        elif brk.startswith("listing-"):
            lines = listing.read_text(encoding="utf-8-sig").splitlines()
            if brk == "listing-latin-1":  # an editor saved the list in latin-1: the first bad byte is on line n
                lines = [ln.encode("ascii", "replace").decode() for ln in lines]
            lines[n - 1] = {"listing-latin-1": "caf\u00e9", "listing-path": "../" + stem, "listing-long": "c" * 300,
                            "listing-unknown": stem + "~missing"}[brk]
            listing.write_bytes("\n".join(lines).encode("latin-1" if brk == "listing-latin-1" else "utf-8"))
        _write(xml, content)
        if brk == "xml-symlink-outside":
            moved = _write(base / "elsewhere.xml", xml.read_bytes())
            xml.unlink()
            xml.symlink_to(moved)
        named = listing if brk.startswith("listing-") or brk == "xml-symlink-outside" else xml
        where = [str(named), element.format(k=k + 1, n=n), says]
        msg = _refused(lambda: read_source(root, format="voc", classes=classes), *where)
        assert "TOP-SECRET-42" not in msg


# --------------------------------------------------------------------------- YOLO

YOLO_SUFFIXES = (".png", ".jpg", ".bmp", ".gif", ".PNG")


def _yolo_row(draw, n_classes: int) -> tuple[str, tuple]:
    """One label line as written, and (class, cx, cy, w, h) as the numbers it holds."""
    cls = draw(st.integers(0, n_classes - 1))
    values = [draw(st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.sampled_from([0, 1, 0.5])))
              for _ in range(4)]
    fmt = draw(st.sampled_from(["repr", "fixed", "sci"]))
    texts = [repr(v) if fmt == "repr" else f"{v:.6f}" if fmt == "fixed" else f"{v:e}" for v in values]
    cls_text = draw(st.sampled_from([str(cls), f"{cls}.0", f"{cls}e0"]))
    sep = draw(st.sampled_from([" ", "  ", "\t"]))
    return sep.join([cls_text, *texts]), (cls, *(float(t) for t in texts))


@st.composite
def yolo_sources(draw):
    names_ = draw(st.lists(labels(), min_size=1, max_size=5, unique=True))
    layout = draw(st.sampled_from(["flat", "splits", "nested"]))
    splits = draw(st.lists(st.sampled_from(SPLITS), min_size=1, max_size=3, unique=True)) if layout == "splits" \
        else [None]
    images = []
    for split in splits:
        stems = draw(st.lists(names(), max_size=3, unique=True))
        for i, stem in enumerate(stems):
            kind = draw(st.sampled_from(["rows", "rows", "empty", "none"]))
            rows = [_yolo_row(draw, len(names_)) for _ in range(draw(st.integers(1, 3)))] if kind == "rows" else []
            sub = draw(names()) if layout == "nested" and draw(st.booleans()) else None
            images.append({"split": split, "stem": stem, "sub": sub, "kind": kind, "rows": rows,
                           "suffix": draw(st.sampled_from(YOLO_SUFFIXES)),
                           "size": (draw(st.integers(1, 40)), draw(st.integers(1, 40))), "orphan": False})
        if draw(st.booleans()):  # a label file whose image is gone
            images.append({"split": split, "stem": "~orphan", "sub": None, "kind": "rows", "orphan": True,
                           "rows": [_yolo_row(draw, len(names_))], "suffix": "", "size": None})
    return {"names": names_, "layout": layout, "images": images,
            "names_file": draw(st.sampled_from(["classes.txt", "obj.names", "labels/classes.txt", "data.yaml",
                                                "data.yml", "data.yaml-dict", "none"])),
            "text": draw(st.fixed_dictionaries({"crlf": st.booleans(), "bom": st.booleans(), "blank": st.booleans(),
                                                "unicode": st.booleans()}))}


def _yolo_write(root: Path, src) -> list[tuple]:
    """Write the source; return the expected items (split, key, boxes) in the order the reader yields them."""
    style = src["text"]
    nl = "\r\n" if style["crlf"] else "\n"
    enc = "utf-8-sig" if style["bom"] else "utf-8"
    names_, kind = src["names"], src["names_file"]
    if kind.startswith("data.y"):
        names_yaml = dict(enumerate(names_)) if kind.endswith("-dict") else names_
        text = yaml.safe_dump({"path": ".", "train": "images/train", "nc": len(names_), "names": names_yaml},
                              allow_unicode=style["unicode"])
        _write(root / kind.removesuffix("-dict"), text.encode(enc))
    elif kind != "none":
        _write(root / kind, (nl.join(names_) + nl + (nl if style["blank"] else "")).encode(enc))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    per_split: dict[str, list] = {}
    for im in src["images"]:
        folder = Path(*[p for p in (im["split"], im["sub"]) if p])
        label_file = root / "labels" / folder / f"{im['stem']}.txt"
        if im["kind"] != "none":
            lines = [text for text, _ in im["rows"]]
            if style["blank"]:
                lines.insert(len(lines) // 2, "   ")
            _write(label_file, (nl.join(lines) + (nl if lines else "")).encode(enc))
        boxes = []
        if not im["orphan"]:
            image = root / "images" / folder / f"{im['stem']}{im['suffix']}"
            _save_image(image, im["size"])
            w, h = im["size"]
            for _, (c, cx, cy, bw, bh) in im["rows"]:
                boxes.append(Box(names_[c], (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
            key = image.relative_to(root).as_posix()
        else:
            key = label_file.relative_to(root).as_posix()
            boxes = []
        per_split.setdefault("~orphans" if im["orphan"] else im["split"] or "train", []).append(
            (tuple(key.split("/")), key, boxes))
    # images split by split, each in path order; then every label file without an image, in path order, in the
    # split its folder names
    images = [(split, key, boxes) for split in SPLITS for _, key, boxes in sorted(per_split.get(split, []))]
    return images + [(parts[1] if parts[1] in SPLITS else "train", key, boxes)
                     for parts, key, boxes in sorted(per_split.get("~orphans", []))]


@ROUND_TRIP
@given(src=yolo_sources(), data=st.data())
def test_yolo_round_trip(src, data):
    classes = src["names"] if src["names_file"] == "none" else data.draw(st.sampled_from([None, src["names"]]))
    with scratch() as root:
        want = _yolo_write(root, src)
        ds, items = _read_all(root, format=data.draw(st.sampled_from(["yolo", "auto"]), label="format"),
                              classes=classes)
        assert (ds.task, ds.format, ds.classes) == ("detection", "yolo", src["names"])
        assert ds.category_map == dict(enumerate(src["names"]))
        assert [(i.split, i.source_key, i.boxes) for i in items] == want
        assert [i.path.relative_to(root).as_posix() for i in items if not i.source_key.startswith("labels/")] == \
            [key for _, key, _ in want if not key.startswith("labels/")]


_ALIAS_BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
YOLO_BREAKS = {  # break: (the file it is in: label, names or root; where in it; what the message says)
    "fields-4": ("label", "line {n}", "fields, expected 5"), "fields-6": ("label", "line {n}", "fields, expected 5"),
    "not-a-number": ("label", "line {n}", "must be numbers"), "class-fraction": ("label", "line {n}", "not an integer"),
    "class-too-big": ("label", "line {n}", "out of range"), "class-negative": ("label", "line {n}", "out of range"),
    "coord-nan": ("label", "line {n}", "finite"), "coord-inf": ("label", "line {n}", "finite"),
    "overflow": ("label", "line {n}", "overflows"), "label-latin-1": ("label", "line {n}", "not UTF-8"),
    "label-utf-16": ("label", "line 1", "UTF-16"), "label-is-folder": ("label", "", "cannot read"),
    "label-symlink-outside": ("label", "", "outside the source root"),
    "names-latin-1": ("names", "line {m1}", "not UTF-8"), "names-blank-line": ("names", "line {m1}", "empty class"),
    "names-twice": ("names", "", "appears twice"), "names-empty-file": ("names", "line 1", "empty class name"),
    "yaml-invalid": ("yaml", "", "not a YAML mapping"), "yaml-list": ("yaml", "", "not a YAML mapping"),
    "yaml-no-names": ("yaml", "", "names: missing"), "yaml-keys-gap": ("yaml", "", "are not 0.."),
    "yaml-keys-mixed": ("yaml", "", "are not 0.."), "yaml-nested": ("yaml", "names[{m}]", "is list"),
    "yaml-bool": ("yaml", "names[0]", "is bool"), "yaml-null": ("yaml", "names[{m}]", "is NoneType"),
    "yaml-empty-name": ("yaml", "names[{m}]", "is empty"),
    "yaml-alias-bomb": ("yaml", "names[0]", "is list"), "yaml-bad-date": ("yaml", "", "not a YAML mapping"),
    "no-names-file": ("root", "", "no class-names file"), "classes-differ": ("names", "", "ingest.source.classes"),
    "names-files-differ": ("yaml", "", "differ from"),
}


@PER_RULE
@given(names_=st.lists(labels().filter(lambda s: s.isascii()), min_size=2, max_size=4, unique=True),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)), data=st.data())
@pytest.mark.parametrize("brk", sorted(YOLO_BREAKS))
def test_yolo_with_one_rule_broken_is_refused_naming_file_and_line(brk, names_, size, data):
    rows = [_yolo_row(data.draw, len(names_))[0] for _ in range(data.draw(st.integers(1, 4), label="rows"))]
    k = data.draw(st.integers(0, len(rows) - 1), label="broken row")
    m = data.draw(st.integers(1, len(names_) - 1), label="broken name")  # 0-based name index, never the first
    kind, element, says = YOLO_BREAKS[brk]
    parts = rows[k].split()
    row_break = {"fields-4": parts[:4], "fields-6": [*parts, "0.1"], "not-a-number": [parts[0], "abc", *parts[2:]],
                 "class-fraction": ["1.5", *parts[1:]], "class-too-big": [str(len(names_)), *parts[1:]],
                 "class-negative": ["-1", *parts[1:]], "coord-nan": [*parts[:3], "nan", parts[4]],
                 "coord-inf": [parts[0], "inf", *parts[2:]], "overflow": [parts[0], "1.7e308", parts[2], "1e308", parts[4]],
                 "label-latin-1": [*parts[:4], "0.5 caf\u00e9"]}
    if brk in row_break:
        rows[k] = " ".join(row_break[brk])
    names_text = "\n".join(names_) + "\n"
    yaml_text = None
    if brk == "names-latin-1":
        names_text = "\n".join("caf\u00e9" if i == m else n for i, n in enumerate(names_)) + "\n"
    elif brk == "names-blank-line":
        names_text = "\n".join([*names_[:m], "", *names_[m:]]) + "\n"
    elif brk == "names-twice":
        names_text = "\n".join([*names_, names_[0]]) + "\n"
    elif brk == "names-empty-file":
        names_text = ""
    elif kind == "yaml":
        yaml_text = {
            "yaml-invalid": "names: [a, b\n", "yaml-list": f"- {names_[0]!r}\n", "yaml-no-names": "nc: 2\n",
            "yaml-keys-gap": "names: {0: a, 2: b}\n", "yaml-keys-mixed": "names: {0: a, b: c}\n",
            "yaml-nested": f"names: [{', '.join(['a'] * m)}, [b, c]]\n", "yaml-bool": "names: [yes, no]\n",
            "yaml-null": f"names: [{', '.join(['a' + str(i) for i in range(m)])}, null]\n",
            "yaml-empty-name": f"names: [{', '.join(['a' + str(i) for i in range(m)])}, '']\n",
            "yaml-alias-bomb": f"l0: &l0 [x]\n{_ALIAS_BOMB}names: [*l8]\n", "yaml-bad-date": "names: [2001-13-45]\n",
            "names-files-differ": "names:\n" + "".join(f"- {json.dumps(n)}\n" for n in reversed(names_)),
        }[brk]
    with scratch() as base:
        root = base / "src"
        _save_image(root / "images" / "a.png", size)
        label = _write(root / "labels" / "a.txt", ("\n".join(rows) + "\n").encode(
            "latin-1" if brk == "label-latin-1" else "utf-16" if brk == "label-utf-16" else "utf-8"))
        names_file = root / "classes.txt"
        if brk != "no-names-file" and (kind != "yaml" or brk == "names-files-differ"):
            _write(names_file, names_text.encode("latin-1" if brk == "names-latin-1" else "utf-8"))
        if yaml_text is not None:
            names_file = _write(root / "data.yaml", yaml_text)
        if brk == "label-is-folder":
            label.unlink()
            label.mkdir()
        elif brk == "label-symlink-outside":
            outside = _write(base / "outside.txt", "0 0.5 0.5 0.1 0.1\n")
            label.unlink()
            label.symlink_to(outside)
        classes = list(reversed(names_)) if brk == "classes-differ" else None
        named = {"label": label, "names": names_file, "yaml": names_file, "root": root}[kind]
        _refused(lambda: _read_all(root, classes=classes), str(named), element.format(n=k + 1, m=m, m1=m + 1), says)


# --------------------------------------------------------------------------- any byte of any label file


def _tpl_table(root: Path, fmt: str) -> tuple[Path, dict]:
    rows = [("img/a.png", "cat", "train"), ("b.png", "dog", "val"), ("sub/c.png", "cat", "test")]
    if fmt == "csv":
        f = _write(root / "labels.csv", _csv_bytes(["path", "label", "split"], [list(r) for r in rows]))
    else:
        f = root / "labels.parquet"
        root.mkdir(parents=True)
        pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(["path", "label", "split"])}), f)
    return f, {"format": fmt}


def _tpl_coco(root: Path) -> tuple[Path, dict]:
    doc = {"images": [{"id": 1, "file_name": "a.png"}, {"id": "b", "file_name": "sub/b.png"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1.5, 2, 30, 40.25]},
                           {"id": 2, "image_id": "b", "category_id": 7, "bbox": [0, 0, 8, 6]}],
           "categories": [{"id": 3, "name": "ant"}, {"id": 7, "name": "bee"}]}
    return _write(root / "annotations" / "instances_train.json", json.dumps(doc, indent=1)), {"format": "coco"}


def _tpl_voc(root: Path, which: str) -> tuple[Path, dict]:
    ann = {"filename": "a.png", "encoding": "utf-8", "extras": True,
           "objects": [{"name": "Tree", "coords": ["203", "67", "227", "90"], "cdata": False, "extras": True}]}
    _write(root / "Annotations" / "a.xml", _voc_xml(ann))
    _write(root / "Annotations" / "b.xml", _voc_xml({**ann, "filename": "b.png"}))
    (root / "JPEGImages").mkdir()
    listing = _write(root / "ImageSets" / "Main" / "train.txt", "a\nb\n")
    return (listing if which == "listing" else root / "Annotations" / "a.xml"), {"format": "voc"}


def _tpl_yolo(root: Path, which: str) -> tuple[Path, dict]:
    _save_image(root / "images" / "a.png", (8, 6))
    label = _write(root / "labels" / "a.txt", "1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n")
    if which == "yaml":
        return _write(root / "data.yaml", "path: .\nnames:\n  0: ant\n  1: bee\n"), {"format": "yolo"}
    names_file = _write(root / "classes.txt", "ant\nbee\n")
    return (names_file if which == "names" else label), {"format": "yolo"}


def _tpl_idx(root: Path, which: str) -> tuple[Path, dict]:
    root.mkdir(parents=True)
    images, labels_file = _write_idx(root, "train", np.arange(48, dtype=np.uint8).reshape(3, 4, 4),
                                     np.array([0, 2, 1], np.uint8), gz_images=which == "images-gz",
                                     gz_labels=which == "labels-gz")
    return (labels_file if which.startswith("labels") else images), {"format": "idx"}


TEMPLATES = {
    "csv": lambda r: _tpl_table(r, "csv"), "parquet": lambda r: _tpl_table(r, "parquet"), "coco": _tpl_coco,
    "voc-xml": lambda r: _tpl_voc(r, "xml"), "voc-listing": lambda r: _tpl_voc(r, "listing"),
    "yolo-txt": lambda r: _tpl_yolo(r, "txt"), "yolo-classes-txt": lambda r: _tpl_yolo(r, "names"),
    "yolo-data-yaml": lambda r: _tpl_yolo(r, "yaml"), "idx-images": lambda r: _tpl_idx(r, "images"),
    "idx-images-gz": lambda r: _tpl_idx(r, "images-gz"), "idx-labels-gz": lambda r: _tpl_idx(r, "labels-gz"),
}
LABEL_MARKERS = (b"\n", b",", b'"bbox": [', b'"file_name"', b"<bndbox>", b"<filename>", b"names", b"\x08\x03")


def _mutated_label_file(fmt: str, edits) -> None:
    with scratch() as base:
        root = base / "src"
        f, kw = TEMPLATES[fmt](root)
        f.write_bytes(apply_edits(f.read_bytes(), edits))
        try:
            _, items = _read_all(root, **kw)
        except SourceError as e:
            event("refused with SourceError")
            assert str(root) in str(e), f"SourceError {e} names no file of the source"
        else:
            event("read")
            _assert_inside(items, root)


@FAST
@given(edits=byte_edits(LABEL_MARKERS))
@pytest.mark.parametrize("fmt", sorted(TEMPLATES))
def test_mutated_label_file_is_read_or_refused(fmt, edits):
    _mutated_label_file(fmt, edits)


# --------------------------------------------------------------------------- no image path leaves the root

# Tokens an attacker joins into an image path: separators, dot-dot, a drive, NUL, symlinks (in/ stays
# inside the root, out/ and images/ lead out of it), encodings that are not dot-dot (%2e, U+2025).
ESCAPE_TOKENS = ["a", "b.png", "/", "..", ".", "\\", "in", "out", "images", "C:", "~", " ", "\x00", "%2e", "\u2025",
                 "//", "../"]


@FAST
@given(parts=st.lists(st.sampled_from(ESCAPE_TOKENS), min_size=1, max_size=8), fmt=st.sampled_from(["csv", "coco"]))
@example(parts=["images", "/", "b.png"], fmt="coco")  # COCO looks names up in images/: a symlink out of the root
def test_no_image_path_leaves_the_source_root(parts, fmt):
    rel = "".join(parts)
    with scratch() as base:
        root, outside = base / "src", base / "outside"
        for name in ("b.png", "a"):
            _write(outside / name, b"secret")
            _write(root / "sub" / name, b"inside")
        (root / "in").symlink_to(root / "sub")
        (root / "out").symlink_to(outside)
        (root / "images").symlink_to(outside)
        if fmt == "csv":
            f = _write(root / "labels.csv", _csv_bytes(["path", "label"], [[rel, "cat"]]))
        else:
            doc = {"images": [{"id": 1, "file_name": rel}], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
            f = _write(root / "instances.json", json.dumps(doc))
        try:
            _, items = _read_all(f)
        except SourceError as e:
            event("refused")
            assert str(f) in str(e)
        else:
            event("read")
            (item,) = items
            assert item.path.resolve().is_relative_to(root), (rel, item.path)
            assert not os.path.isabs(item.source_key) and ".." not in item.source_key.split("/"), item.source_key
            assert (root / item.source_key).resolve() == item.path.resolve()  # the key names the file read


# --------------------------------------------------------------------------- archives

CAPS = ArchiveParams()
ARCHIVE_KINDS = {"zip": "a.zip", "tar": "a.tar", "tar.gz": "a.tar.gz", "tar.bz2": "a.tar.bz2", "tar.xz": "a.tar.xz"}


@st.composite
def archive_members(draw):
    paths = draw(st.lists(st.lists(names(), min_size=1, max_size=3).map("/".join), min_size=1, max_size=5,
                          unique=True))
    # a path that is also a folder of another would be refused as a duplicate: keep the first of such
    kept = [p for i, p in enumerate(paths)
            if not any(q.startswith(p + "/") or p.startswith(q + "/") for q in paths[:i])]
    return {p: draw(st.binary(max_size=200)) for p in kept}


def _archive_bytes(kind: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w" + (":" + kind.split(".")[1] if "." in kind else "")) as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@ROUND_TRIP
@given(members=archive_members(), kind=st.sampled_from(sorted(ARCHIVE_KINDS)))
def test_archive_round_trip(members, kind):
    with scratch() as base:
        archive = _write(base / ARCHIVE_KINDS[kind], _archive_bytes(kind, members))
        top = extract_to_staging(archive, base / "staging", caps=CAPS)
        staging = (base / "staging").resolve()
        assert _tree(staging) == members
        tops = {p.split("/")[0] for p in members}
        assert top.resolve() == (staging / tops.pop() if len(tops) == 1 and any("/" in p for p in members)
                                 else staging)


@FAST
@given(members=archive_members(), edits=byte_edits((b"PK\x01\x02", b"PK\x03\x04", b"ustar", b"\x1f\x8b")))
@pytest.mark.parametrize("kind", sorted(ARCHIVE_KINDS))
def test_mutated_archive_extracts_inside_staging_or_is_refused(kind, members, edits):
    with scratch() as base:
        archive = _write(base / ARCHIVE_KINDS[kind], apply_edits(_archive_bytes(kind, members), edits))
        staging = base / "staging"
        try:
            extract_to_staging(archive, staging, caps=CAPS)
        except ArchiveError as e:
            event("refused")
            assert str(archive) in str(e)
            assert not staging.exists(), "a refused archive leaves no staging folder"
        else:
            event("extracted")
            for p in staging.rglob("*"):
                assert not p.is_symlink() and p.resolve().is_relative_to(staging.resolve()), p
        assert {p.name for p in base.iterdir()} <= {archive.name, "staging"}, "nothing written beside staging"


# --------------------------------------------------------------------------- regressions found by fuzzing
# Each failure the properties above found, pinned as a plain case (most are also a rule of a *_broken test).
# Old behaviour in the comment; now each is refused with SourceError / ArchiveError naming file and row,
# or (the last cases) read correctly.


def _yolo_root(root: Path, *, names_file: tuple[str, bytes] = ("classes.txt", b"ant\nbee\n"),
               label: bytes = b"1 0.5 0.5 0.5 0.5\n") -> Path:
    _save_image(root / "images" / "a.png", (8, 6))
    _write(root / "labels" / "a.txt", label)
    _write(root / names_file[0], names_file[1])
    return root


def _zip_with(root: Path, mutate) -> Path:
    raw = bytearray(_archive_bytes("zip", {"a/b.png": b"x" * 300, "a/c.png": b"y" * 10}))
    mutate(raw)
    return _write(root / "a.zip", bytes(raw))


def _flag_utf8_name(raw: bytearray) -> None:
    at = raw.find(b"PK\x01\x02")  # central directory: set the UTF-8 flag, break the name's bytes
    raw[at + 8] |= 0x08
    raw[at + 46] = 0xFF


def _forge_version(raw: bytearray) -> None:
    raw[raw.find(b"PK\x01\x02") + 6] = 127  # "needs zip version 12.7 to extract"


def _corrupt_deflate(raw: bytearray) -> None:
    at = raw.find(b"PK\x03\x04") + 30 + len("a/b.png")
    raw[at : at + 4] = b"\xff\xff\xff\xff"


REFUSED = {  # case: (build the source under root -> the file named, what the message says[, read_source options])
    # old: OSError ENAMETOOLONG from Path.is_symlink
    "csv-path-too-long": (lambda r: _write(r / "l.csv", "path,label\n" + "a" * 300 + ".png,cat\n"), "line 2"),
    # old: accepted; the NUL made the gate's read raise ValueError, crashing check_many
    "csv-path-nul": (lambda r: _write(r / "l.csv", "path,label\na\x00.png,cat\n"), "line 2"),
    # old: "not UTF-8 text" without the line
    "csv-latin-1-line": (lambda r: _write(r / "l.csv", "path,label\na.png,cat\nb.png,caf\xe9\n".encode("latin-1")),
                         "line 3"),
    # old: accepted as a source key; ingest then failed to encode the key (UnicodeEncodeError)
    "coco-surrogate-file-name": (lambda r: _write(r / "c.json", '{"images": [{"id": 1, "file_name": "\\ud800.png"}],'
                                                  ' "annotations": [], "categories": [{"id": 1, "name": "x"}]}'),
                                 "images[0]"),
    # old: RecursionError
    "coco-deep-nesting": (lambda r: _write(r / "c.json", "[" * 100_000 + "]" * 100_000), "unreadable JSON"),
    # old: OverflowError from math.isfinite(10**400)
    "coco-400-digit-int": (lambda r: _write(r / "c.json", '{"images": [{"id": 1, "file_name": "a.png"}], '
                                            '"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1'
                                            + "0" * 400 + ', 1]}], "categories": [{"id": 1, "name": "x"}]}'),
                           "annotations[0]"),
    # old: inf box accepted
    "coco-box-overflow": (lambda r: _write(r / "c.json", '{"images": [{"id": 1, "file_name": "a.png"}], '
                                           '"annotations": [{"image_id": 1, "category_id": 1, "bbox": [1e308, 0, '
                                           '1.7e308, 1]}], "categories": [{"id": 1, "name": "x"}]}'), "overflows"),
    # old: ArrowInvalid "Multiple matches for FieldRef.Name(label)"
    "parquet-duplicate-column": (lambda r: _parquet_file(r, pa.Table.from_arrays(
        [pa.array(["a.png"]), pa.array(["x"]), pa.array(["y"])], names=["path", "label", "label"])), "twice"),
    # old: UnicodeDecodeError from to_pydict
    "parquet-invalid-utf8": (lambda r: _parquet_file(r, pa.table({"path": ["a.png"], "label": ["dogs"]}),
                                                     patch=(b"dogs", b"d\xffgs")), "unreadable parquet"),
    # old: UnicodeDecodeError
    "voc-listing-latin-1": (lambda r: (_tpl_voc(r, "xml"), _write(r / "ImageSets" / "Main" / "train.txt",
                                                                  b"a\ncaf\xe9\n"))[1], "line 2"),
    # old: IsADirectoryError from the XML parser (and from format detection, which now skips such folders)
    "voc-xml-is-a-folder": (lambda r: _voc_with_a_folder_named_xml(r), "cannot read", {"format": "voc"}),
    # old: OSError ENAMETOOLONG
    "voc-listing-long-id": (lambda r: (_tpl_voc(r, "xml"), _write(r / "ImageSets" / "Main" / "train.txt",
                                                                  "a\n" + "c" * 300 + "\n"))[1], "line 2"),
    # old: UnicodeDecodeError
    "yolo-classes-latin-1": (lambda r: _yolo_root(r, names_file=("classes.txt", b"ant\ncaf\xe9\n")) / "classes.txt",
                             "line 2"),
    # old: TypeError from sorted() of int and str keys
    "yolo-yaml-mixed-keys": (lambda r: _yolo_root(r, names_file=("data.yaml", b"names: {0: a, b: c}\n")) / "data.yaml",
                             "are not 0..1"),
    # old: ValueError ("month must be in 1..12") from YAML's date constructor
    "yolo-yaml-bad-date": (lambda r: _yolo_root(r, names_file=("data.yaml", b"names: [2001-13-45]\n")) / "data.yaml",
                           "not a YAML mapping"),
    # old: RecursionError
    "yolo-yaml-deep": (lambda r: _yolo_root(r, names_file=("data.yaml", b"names: " + b"[" * 5000 + b"]" * 5000))
                       / "data.yaml", "not a YAML mapping"),
    # old: class names "['a', 'b']", "True", "None" (str() of whatever YAML read); str() of an alias bomb never ends
    "yolo-yaml-not-names": (lambda r: _yolo_root(r, names_file=("data.yaml", b"names: [[a, b], yes, null]\n"))
                            / "data.yaml", "names[0] is list"),
    # old: IsADirectoryError
    "yolo-label-is-a-folder": (lambda r: (_yolo_root(r), (r / "labels" / "a.txt").unlink(),
                                          (r / "labels" / "a.txt" / "x").mkdir(parents=True))[0] / "labels" / "a.txt",
                               "cannot read"),
    # old: a box at x = inf
    "yolo-box-overflow": (lambda r: _yolo_root(r, label=b"0 1.7e308 0.5 1e308 0.5\n") / "labels" / "a.txt",
                          "line 1"),
    # old: yielded with a source key holding a lone surrogate, which ingest cannot encode (UnicodeEncodeError)
    "yolo-orphan-non-utf8-name": (lambda r: _bytes_named(_yolo_root(r) / "labels", b"caf\xe9.txt"), "not UTF-8"),
    "image-folder-non-utf8-name": (lambda r: _bytes_named(r / "cat", b"caf\xe9.png"), "not UTF-8"),
}


def _voc_with_a_folder_named_xml(root: Path) -> Path:
    _tpl_voc(root, "xml")
    shutil.rmtree(root / "ImageSets")  # no split lists: every Annotations/*.xml is read
    return _write(root / "Annotations" / "c.xml" / "x", b"").parent


def _parquet_file(root: Path, table, patch: tuple[bytes, bytes] | None = None) -> Path:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")
    return _write(root / "l.parquet", buf.getvalue().replace(*patch) if patch else buf.getvalue())


def _bytes_named(folder: Path, name: bytes) -> Path:
    """A file whose name is not UTF-8 (a latin-1 name copied from an old disk); Python sees lone surrogates."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(b"0 0.5 0.5 0.1 0.1\n")
    return folder / os.fsdecode(name)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_regressions_found_by_fuzzing_are_refused(case):
    build, says, *options = REFUSED[case]
    with scratch() as base:
        root = base / "src"
        root.mkdir()
        named = build(root)
        target = named if named.suffix in (".csv", ".json", ".parquet") else root
        _refused(lambda: _read_all(target, **(options[0] if options else {})), str(named), says)


ARCHIVE_REGRESSIONS = {  # old exception type -> now ArchiveError
    "truncated-tar-gz": (lambda r: _write(r / "a.tar.gz", _archive_bytes("tar.gz", {"a": b"x" * 999})[:20]),
                         "not a readable"),                                  # EOFError from tarfile.is_tarfile
    "zip-name-not-utf8": (lambda r: _zip_with(r, _flag_utf8_name), "unreadable archive"),  # UnicodeDecodeError
    "zip-forged-version": (lambda r: _zip_with(r, _forge_version), "unreadable archive"),  # NotImplementedError
    "zip-corrupt-deflate": (lambda r: _zip_with(r, _corrupt_deflate), "a/b.png"),         # zlib.error
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_REGRESSIONS))
def test_regressions_found_by_fuzzing_archives(case):
    build, says = ARCHIVE_REGRESSIONS[case]
    with scratch() as base:
        archive = build(base)
        with pytest.raises(ArchiveError, match=re.escape(says)) as info:
            extract_to_staging(archive, base / "staging", caps=CAPS)
        assert str(archive) in str(info.value) and not (base / "staging").exists()


def test_regressions_found_by_fuzzing_are_read():
    with scratch() as root:
        # "²" is a digit int() refuses: labels sort as text (old: ValueError from int("²"))
        _write(root / "t" / "l.csv", "path,label\na.png,²\nb.png,1\n")
        assert read_source(root / "t" / "l.csv").classes == ["1", "²"]
        # A BOM (Notepad's UTF-8) opens classes.txt and a label file (old: class "\ufeffant"; "fields must be numbers")
        _yolo_root(root / "y", names_file=("classes.txt", b"\xef\xbb\xbfant\nbee\n"), label=b"\xef\xbb\xbf1 .5 .5 .5 .5\n")
        ds, items = _read_all(root / "y")
        assert ds.classes == ["ant", "bee"] and items[0].boxes == [Box("bee", 2.0, 1.5, 6.0, 4.5)]
        # Label files in a split folder images/ lacks are counted as missing images (old: silently dropped)
        _save_image(root / "s" / "images" / "train" / "a.png", (8, 6))
        _write(root / "s" / "classes.txt", "ant\n")
        _write(root / "s" / "labels" / "val" / "b.txt", "0 0.5 0.5 0.1 0.1\n")
        _, items = _read_all(root / "s")
        assert [(i.split, i.source_key, i.boxes) for i in items] == [("train", "images/train/a.png", []),
                                                                     ("val", "labels/val/b.txt", [])]


# --------------------------------------------------------------------------- long runs (-m slow)


@pytest.mark.slow
@SLOW
@given(table=tables(), fmt=st.sampled_from(["csv", "parquet"]), data=st.data())
def test_table_round_trip_long(table, fmt, data):
    _table_round_trip(table, fmt, data)


@pytest.mark.slow
@SLOW
@given(source=idx_sources(), data=st.data())
def test_idx_round_trip_long(source, data):
    test_idx_round_trip.hypothesis.inner_test(source=source, data=data)


@pytest.mark.slow
@SLOW
@given(source=folder_sources(), data=st.data())
def test_image_folder_round_trip_long(source, data):
    test_image_folder_round_trip.hypothesis.inner_test(source=source, data=data)


@pytest.mark.slow
@SLOW
@given(src=coco_sources(), data=st.data())
def test_coco_round_trip_long(src, data):
    test_coco_round_trip.hypothesis.inner_test(src=src, data=data)


@pytest.mark.slow
@SLOW
@given(src=voc_sources(), data=st.data())
def test_voc_round_trip_long(src, data):
    test_voc_round_trip.hypothesis.inner_test(src=src, data=data)


@pytest.mark.slow
@SLOW
@given(src=yolo_sources(), data=st.data())
def test_yolo_round_trip_long(src, data):
    test_yolo_round_trip.hypothesis.inner_test(src=src, data=data)


@pytest.mark.slow
@SLOW
@given(edits=byte_edits(LABEL_MARKERS), fmt=st.sampled_from(sorted(TEMPLATES)))
def test_mutated_label_file_long(fmt, edits):
    _mutated_label_file(fmt, edits)


@pytest.mark.slow
@SLOW
@given(parts=st.lists(st.sampled_from(ESCAPE_TOKENS), min_size=1, max_size=12), fmt=st.sampled_from(["csv", "coco"]))
def test_no_image_path_leaves_the_source_root_long(parts, fmt):
    test_no_image_path_leaves_the_source_root.hypothesis.inner_test(parts=parts, fmt=fmt)


@pytest.mark.slow
@SLOW
@given(members=archive_members(), edits=byte_edits((b"PK\x01\x02", b"PK\x03\x04", b"ustar", b"\x1f\x8b")),
       kind=st.sampled_from(sorted(ARCHIVE_KINDS)))
def test_mutated_archive_long(kind, members, edits):
    test_mutated_archive_extracts_inside_staging_or_is_refused.hypothesis.inner_test(kind=kind, members=members,
                                                                                     edits=edits)
