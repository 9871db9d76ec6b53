"""Source readers on real files: Fashion-MNIST idx, deepforest's Pascal VOC boxes, and the same
boxes written by these tests as COCO and YOLO; rule violations name the file and the row."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.formats import detect_format, read_source
from tasks.sources import Box, SourceDataset, SourceError

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
_spec = importlib.util.find_spec("deepforest")  # data files only: never imported
DEEPFOREST = Path(_spec.submodule_search_locations[0]) / "data" if _spec else Path("/nonexistent")
VOC_BOXES = {"OSBS_029": 61, "SOAP_061": 37, "2019_YELL_2_541000_4977000_image_crop": 279,
             "2019_YELL_2_528000_4978000_image_crop2": 574}
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
needs_deepforest = pytest.mark.skipif(not DEEPFOREST.is_dir(), reason="pip install --no-deps deepforest==2.1.0")


def _place(src: Path, dst: Path) -> None:
    """Hard-link (else copy) a real file into a test layout."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def _png(path: Path, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def _assert_same_boxes(got: list[Box], want: list[Box], tol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.label == w.label
        assert max(abs(g.x1 - w.x1), abs(g.y1 - w.y1), abs(g.x2 - w.x2), abs(g.y2 - w.y2)) <= tol, (g, w)


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory) -> Path:
    """deepforest's four annotated images in a VOC layout; SOAP_061 listed as val."""
    root = tmp_path_factory.mktemp("voc")
    for stem in VOC_BOXES:
        _place(DEEPFOREST / f"{stem}.xml", root / "Annotations" / f"{stem}.xml")
        _place(DEEPFOREST / f"{stem}.png", root / "JPEGImages" / f"{stem}.png")  # OSBS_029.xml names a .tif
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("\n".join(s for s in VOC_BOXES if s != "SOAP_061") + "\n")
    (main / "val.txt").write_text("SOAP_061\n")
    return root


# --------------------------------------------------------------------------- classification


@needs_fashion
def test_idx_subset_counts_classes_splits():
    ds = read_source(FASHION, limit_per_split=20)
    items = list(ds.items)
    assert (ds.task, ds.format, ds.classes) == ("classification", "idx", [str(i) for i in range(10)])
    assert Counter(i.split for i in items) == {"train": 20, "test": 20}
    assert items[0].source_key == "train-images-idx3-ubyte[0]" and items[0].path is None
    with Image.open(io.BytesIO(items[0].data)) as img:
        assert (img.size, img.mode) == ((28, 28), "L")
    assert [i.data for i in ds.items] == [i.data for i in items]  # re-iterable, encoded deterministically
    named = read_source(FASHION, classes=FASHION_NAMES, limit_per_split=1)
    assert named.classes == FASHION_NAMES and next(iter(named.items)).label == "Ankle boot"


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_idx_label_beyond_classes_names_file_and_item(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8), 0x803)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2], np.uint8), 0x801)
    ds = read_source(tmp_path)
    assert ds.classes == ["0", "1", "2"] and [i.split for i in ds.items] == ["train"] * 3
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte: item 2: label 2 out of range"):
        read_source(tmp_path, classes=["a", "b"])


def test_image_folder_layouts_and_limit(tmp_path):
    root = tmp_path / "split"
    for rel in ("train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "val/cat/0.png", "val/dog/0.png"):
        _png(root / rel)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"x")  # hidden: not an item
    ds = read_source(root)
    assert (ds.format, ds.classes) == ("image-folder", ["cat", "dog"])
    items = list(ds.items)
    assert Counter(i.split for i in items) == {"train": 3, "val": 2}
    assert items[0].source_key == "train/cat/0.png" and items[0].label == "cat" and items[0].path.is_file()
    assert Counter(i.split for i in read_source(root, limit_per_split=1).items) == {"train": 1, "val": 1}

    flat = tmp_path / "flat"
    _png(flat / "cat" / "a.png")
    _png(flat / "dog" / "b.png")
    assert {(i.split, i.label) for i in read_source(flat).items} == {("train", "cat"), ("train", "dog")}
    with pytest.raises(SourceError, match=r"dog: class folder: label 'dog' is not in ingest.source.classes"):
        read_source(flat, classes=["cat"])

    _png(tmp_path / "outside.png")
    (root / "val" / "dog" / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(SourceError, match=r"link.png: image path .* outside the source root"):
        list(read_source(root).items)


def test_csv_and_parquet_with_and_without_split(tmp_path):
    root = tmp_path / "tab"
    for name in ("a", "b", "c"):
        _png(root / "img" / f"{name}.png")
    (root / "labels.csv").write_text("path,label\nimg/a.png,cat\nimg/b.png,dog\n\nimg/gone.png,dog\n")
    ds = read_source(root)
    items = list(ds.items)
    assert (ds.format, ds.classes) == ("csv", ["cat", "dog"]) and {i.split for i in items} == {"train"}
    # a file the label file names but that does not exist is still yielded: the gate quarantines it
    assert [i.path.exists() for i in items] == [True, True, False] and items[2].source_key == "img/gone.png"

    (root / "val.csv").write_text("label,path,split\ncat,img/a.png,test\ndog,img/c.png,\n")
    with pytest.raises(SourceError, match=r"val.csv: line 3: empty split"):
        read_source(root / "val.csv")
    (root / "val.csv").write_text("label,path\ncat,img/a.png\n")  # split from the file name
    assert [i.split for i in read_source(root / "val.csv").items] == ["val"]

    pq.write_table(pa.table({"path": ["img/a.png", "img/b.png", "img/c.png"], "label": [10, 2, 2],
                             "split": ["train", "val", "test"]}), root / "labels.parquet")
    ds = read_source(root / "labels.parquet", limit_per_split=1)
    assert (ds.format, ds.classes) == ("parquet", ["2", "10"])  # integer labels sort as numbers
    assert [(i.split, i.label) for i in ds.items] == [("train", "10"), ("val", "2"), ("test", "2")]
    pq.write_table(pa.table({"path": ["img/c.png"], "label": ["bird"]}), root / "more.parquet")
    assert [(i.split, i.label, i.path.name) for i in read_source(root / "more.parquet").items] == [
        ("train", "bird", "c.png")]


# --------------------------------------------------------------------------- detection


@needs_deepforest
def test_voc_deepforest_boxes(voc_dir):
    ds = read_source(voc_dir)
    assert (ds.task, ds.format, ds.classes) == ("detection", "voc", ["Alive", "Dead", "Tree"])
    items = {Path(i.source_key).stem: i for i in ds.items}
    assert {k: len(i.boxes) for k, i in items.items()} == VOC_BOXES
    assert {k: i.split for k, i in items.items()} == {k: "val" if k == "SOAP_061" else "train" for k in VOC_BOXES}
    assert Counter(b.label for b in items["SOAP_061"].boxes) == {"Alive": 9, "Dead": 28}
    for item in items.values():
        with Image.open(item.path) as img:
            w, h = img.size
        assert all(0 <= b.x1 <= b.x2 <= w and 0 <= b.y1 <= b.y2 <= h for b in item.boxes)
    # 1-based inclusive VOC pixels: <xmin>203 <ymin>67 <xmax>227 <ymax>90 -> xyxy (202, 66, 227, 90)
    assert items["OSBS_029"].boxes[0] == Box("Tree", 202, 66, 227, 90)
    assert items["OSBS_029"].path.name == "OSBS_029.png"  # <filename> says .tif; the one png with its stem
    flat = read_source(voc_dir / "Annotations" / "SOAP_061.xml")
    assert [len(i.boxes) for i in flat.items] == [37] and flat.classes == ["Alive", "Dead"]


def _coco_from(ds: SourceDataset, root: Path) -> dict:
    """The test's own COCO writer: category ids from the dataset's category_map."""
    ids = {name: cid for cid, name in ds.category_map.items()}
    images, anns = [], []
    for n, item in enumerate(ds.items, 1):
        images.append({"id": n, "file_name": item.path.relative_to(root.resolve()).as_posix()})
        anns += [{"id": len(anns) + 1, "image_id": n, "category_id": ids[b.label], "iscrowd": 0,
                  "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]} for b in item.boxes]
    return {"images": images, "annotations": anns,
            "categories": [{"id": cid, "name": name} for cid, name in ds.category_map.items()]}


@needs_deepforest
def test_voc_boxes_as_coco_read_back_and_round_trip(voc_dir, tmp_path):
    voc = {Path(i.source_key).stem: i for i in read_source(voc_dir).items}
    root, ids = tmp_path / "coco", {"Alive": 3, "Dead": 7, "Tree": 12}  # ids with gaps
    images, anns = [], []
    for n, (stem, item) in enumerate([*voc.items(), ("SOAP_031", None)], 1):  # SOAP_031: no annotations
        _place(DEEPFOREST / f"{stem}.png", root / "images" / f"{stem}.png")
        images.append({"id": 100 + n, "file_name": f"{stem}.png", "width": 0, "height": 0})
        anns += [{"id": len(anns) + 1, "image_id": 100 + n, "category_id": ids[b.label], "iscrowd": 0,
                  "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]} for b in (item.boxes if item else [])]
    original = {"images": images, "annotations": anns,
                "categories": [{"id": i, "name": n} for n, i in reversed(ids.items())]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(original))

    assert detect_format(root) == "coco"
    ds = read_source(root)
    assert (ds.task, ds.format, ds.classes) == ("detection", "coco", ["Alive", "Dead", "Tree"])
    assert ds.category_map == {3: "Alive", 7: "Dead", 12: "Tree"}
    got = {Path(i.source_key).stem: i for i in ds.items}
    assert {i.split for i in got.values()} == {"val"} and got["SOAP_031"].boxes == []
    for stem, item in voc.items():
        assert got[stem].path == (root / "images" / f"{stem}.png").resolve()
        _assert_same_boxes(got[stem].boxes, item.boxes, tol=1e-6)

    # COCO -> SourceDataset -> COCO: same boxes under the original category ids
    again = _coco_from(ds, root)
    assert [im["file_name"] for im in again["images"]] == [f"images/{im['file_name']}" for im in images]
    assert [a["category_id"] for a in again["annotations"]] == [a["category_id"] for a in anns]
    assert np.allclose([a["bbox"] for a in again["annotations"]], [a["bbox"] for a in anns], atol=1e-6)


@needs_deepforest
def test_voc_boxes_as_yolo_read_back(voc_dir, tmp_path):
    voc = list(read_source(voc_dir).items)
    root, names = tmp_path / "yolo", ["Tree", "Dead", "Alive"]  # order from classes.txt, not sorted
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for item in voc:
        _place(item.path, root / "images" / item.split / item.path.name)
        with Image.open(item.path) as img:
            w, h = img.size
        lines = [f"{names.index(b.label)} {(b.x1 + b.x2) / 2 / w!r} {(b.y1 + b.y2) / 2 / h!r} "
                 f"{(b.x2 - b.x1) / w!r} {(b.y2 - b.y1) / h!r}" for b in item.boxes]
        (root / "labels" / item.split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / item.split / f"{item.path.stem}.txt").write_text("\n".join(lines) + "\n")
    _place(DEEPFOREST / "SOAP_031.png", root / "images" / "train" / "SOAP_031.png")  # no txt: background
    _place(DEEPFOREST / "AWPE Pigeon Lake 2020 DJI_0005.JPG", root / "images" / "val" / "pigeon.jpg")
    (root / "labels" / "val" / "pigeon.txt").write_text("")  # empty txt: background

    assert detect_format(root) == "yolo"
    ds = read_source(root)
    assert (ds.format, ds.classes, ds.category_map) == ("yolo", names, {0: "Tree", 1: "Dead", 2: "Alive"})
    got = {i.path.stem: i for i in ds.items}
    assert got["SOAP_031"].boxes == [] and got["pigeon"].boxes == [] and got["pigeon"].split == "val"
    for item in voc:
        assert got[item.path.stem].split == item.split
        _assert_same_boxes(got[item.path.stem].boxes, item.boxes, tol=1e-6)


def test_yolo_data_yaml_names_and_orphan_label(tmp_path):
    _png(tmp_path / "images" / "train" / "x.png", size=(8, 6))
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: ant\n  1: bee\n")
    items = list(read_source(tmp_path).items)
    assert items[0].boxes == [Box("bee", 2.0, 1.5, 6.0, 4.5)]
    # a label file without an image is yielded as a missing image, for the gate to count
    assert items[1].source_key == "labels/train/ghost.txt" and not items[1].path.exists()


# --------------------------------------------------------------------------- rules


def _coco(path: Path, annotation: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [' + annotation + '], '
                    '"categories": [{"id": 3, "name": "ant"}, {"id": 7, "name": "bee"}]}')
    return path


def test_coco_nan_and_unknown_category_are_rejected(tmp_path):
    bad = _coco(tmp_path / "nan" / "instances_train.json",
                '{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, NaN, 4]}')
    with pytest.raises(SourceError, match=r"instances_train.json: annotations\[0\] \(id 5\)\.bbox\[2\]: NaN"):
        read_source(bad)
    unknown = _coco(tmp_path / "cat" / "train.json", '{"id": 9, "image_id": 1, "category_id": 4, "bbox": [0,0,1,1]}')
    with pytest.raises(SourceError, match=r"train.json: annotations\[0\] \(id 9\): unknown category_id 4; "
                                          r"category ids: 3, 7"):
        read_source(unknown.parent, format="coco")


def test_voc_entity_expansion_is_rejected(tmp_path):
    lol = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    (tmp_path / "bomb.xml").write_text(f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY lol0 "lol">{lol}]>'
                                       "<annotation><filename>a.png</filename><object><name>&lol9;</name>"
                                       "</object></annotation>")
    with pytest.raises(SourceError, match=r"bomb.xml: <!DOCTYPE annotation> declaration: DTDs and entity"):
        read_source(tmp_path, format="voc")


def test_yolo_bad_rows_are_rejected(tmp_path):
    _png(tmp_path / "images" / "x.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("ant\nbee\n")
    (tmp_path / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(SourceError, match=r"labels/x.txt: line 2: class id 5 out of range: 2 class names"):
        list(read_source(tmp_path).items)
    (tmp_path / "labels" / "x.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(SourceError, match=r"labels/x.txt: line 1: 4 fields, expected 5"):
        list(read_source(tmp_path).items)


def test_csv_paths_must_stay_inside_the_root(tmp_path):
    root = tmp_path / "src"
    _png(root / "a.png")
    _png(tmp_path / "outside.png")
    (root / "labels.csv").write_text("path,label\na.png,cat\n../outside.png,cat\n")
    with pytest.raises(SourceError, match=r"labels.csv: line 3: image path '../outside.png' resolves to .* "
                                          r"outside the source root"):
        read_source(root)
    (root / "labels.csv").write_text(f"path,label\n{tmp_path / 'outside.png'},cat\n")
    with pytest.raises(SourceError, match=r"labels.csv: line 2: image path '/.*outside.png' is absolute"):
        read_source(root)
    (root / "labels.csv").write_text("path,label\na.png\n")
    with pytest.raises(SourceError, match=r"labels.csv: line 2: 1 fields, the header has 2"):
        read_source(root)


def test_detect_format_on_each_layout_and_ambiguity(tmp_path):
    def layout(name: str, files: dict[str, str | bytes]) -> Path:
        for rel, content in files.items():
            p = tmp_path / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return tmp_path / name

    coco = '{"images": [], "annotations": [], "categories": []}'
    voc = "<annotation><filename>a.png</filename></annotation>"
    assert detect_format(layout("idx", {"train-images-idx3-ubyte.gz": b"x"})) == "idx"
    assert detect_format(layout("folder", {"cat/a.png": b"x"})) == "image-folder"
    assert detect_format(layout("csv", {"labels.csv": "path,label\n"})) == "csv"
    assert detect_format(layout("coco", {"annotations/instances_train.json": coco})) == "coco"
    assert detect_format(layout("voc", {"Annotations/a.xml": voc, "JPEGImages/a.png": b""})) == "voc"
    assert detect_format(layout("yolo", {"images/a.png": b"", "labels/a.txt": ""})) == "yolo"
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"path": ["a.png"], "label": ["x"]}), tmp_path / "pq" / "labels.parquet")
    assert detect_format(tmp_path / "pq") == "parquet"
    with pytest.raises(SourceError, match=r"ambiguous source, found coco: instances.json; voc: a.xml, b.xml; "
                                          r"set ingest.source.format to one of coco, voc"):
        detect_format(layout("both", {"instances.json": coco, "a.xml": voc, "b.xml": voc}))
    with pytest.raises(SourceError, match=r"cannot detect the format.*set ingest.source.format"):
        detect_format(layout("unknown", {"notes.txt": "hello"}))
    with pytest.raises(SourceError, match=r"unknown source format 'tfrecord'; allowed: auto, idx"):
        read_source(tmp_path / "csv", format="tfrecord")
