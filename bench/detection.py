"""Faster R-CNN on real tree crowns: training tiles/s and held-out mAP after a fixed short schedule.

Data (written under `out`, not timed): a NEON aerial scene shipped in the deepforest package
(files only, never imported), 2019_YELL_2_541000_4977000_image_crop (1249×1035 px, 279 crowns),
cut in two, written as a Pascal VOC source whose ImageSets/Main lists make the splits (a
spatial hold-out: the test strip's pixels are never trained on):
  train  the left 849 px (the crowns centred in it, clipped to it) and one 64-px image without
         boxes (a background image)
  test   the right 400 px
It is ingested and curated (FiftyOne off) like any dataset version, then trained with the
`train.detection` defaults except a short schedule sized for 43 training tiles: tile_size 200,
batch_size 2, lr 0.04, `size` epochs (default 5); one thread (on a shared 2-core machine two
threads were measured slower than one). tests/test_detection.py trains the same way. Baseline, measured in the same run: the same detector before training
(its new heads random, the backbone ImageNet), on the same test tiles.
Figures: training tiles/s, inference tiles/s, mAP@[.50:.95] and mAP@.50 trained and untrained.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
import xml.etree.ElementTree as ET  # building documents only; parsing goes through defusedxml
from pathlib import Path

from defusedxml.ElementTree import parse as defused_parse
from PIL import Image

SCENE = "2019_YELL_2_541000_4977000_image_crop"
# name -> (split, (x0, y0, x1, y1) in SCENE)
CROPS = {"yell_left": ("train", (0, 0, 849, 1035)), "yell_right": ("test", (849, 0, 1249, 1035))}


def deepforest_dir() -> Path:
    return Path(importlib.util.find_spec("deepforest").submodule_search_locations[0]) / "data"


def _voc_xml(filename: str, size: tuple[int, int], boxes: list[tuple[float, float, float, float]]) -> str:
    """A minimal VOC annotation; `boxes` are continuous xyxy, written 1-based (xmin = x1 + 1)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = filename
    s = ET.SubElement(ann, "size")
    for tag, v in (("width", size[0]), ("height", size[1]), ("depth", 3)):
        ET.SubElement(s, tag).text = str(v)
    for x1, y1, x2, y2 in boxes:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = "Tree"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = f"{v:g}"
    return ET.tostring(ann, encoding="unicode")


def _voc_boxes(xml: Path) -> list[tuple[float, float, float, float]]:
    root = defused_parse(xml).getroot()
    return [tuple(float(o.find(f"bndbox/{t}").text) - (1 if t in ("xmin", "ymin") else 0)
                  for t in ("xmin", "ymin", "xmax", "ymax")) for o in root.iter("object")]


def _write_crop(dest: Path, name: str, scene: Image.Image, boxes: list, crop: tuple[int, int, int, int]) -> int:
    """Save `crop` of `scene` as name.png + name.xml with the crowns centred in it (clipped)."""
    x0, y0, x1, y1 = crop
    inside = [(max(a, x0) - x0, max(b, y0) - y0, min(c, x1) - x0, min(d, y1) - y0) for a, b, c, d in boxes
              if x0 <= (a + c) / 2 < x1 and y0 <= (b + d) / 2 < y1]
    scene.crop(crop).save(dest / f"{name}.png")
    (dest / f"{name}.xml").write_text(_voc_xml(f"{name}.png", (x1 - x0, y1 - y0), inside))
    return len(inside)


def deepforest_source(dest: Path) -> Path:
    """The VOC source described in the module docstring, written into `dest` (created)."""
    data = deepforest_dir()
    dest.mkdir(parents=True)
    scene, boxes = Image.open(data / f"{SCENE}.png").convert("RGB"), _voc_boxes(data / f"{SCENE}.xml")
    for name, (_, crop) in CROPS.items():
        _write_crop(dest, name, scene, boxes, crop)
    Image.new("RGB", (64, 64)).save(dest / "background.png")
    (dest / "background.xml").write_text(_voc_xml("background.png", (64, 64), []))
    lists = dest / "ImageSets" / "Main"
    lists.mkdir(parents=True)
    for split in ("train", "test"):
        names = [n for n, (s, _) in CROPS.items() if s == split] + (["background"] if split == "train" else [])
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return dest


def prepare(work: Path) -> Path:
    """Ingest and curate the source into `work`; returns the curate folder."""
    from tasks.curate import curate
    from tasks.ingest import ingest
    from tasks.params import CurateParams, IngestParams, SourceParams

    source = SourceParams(path=deepforest_source(work / "voc"), format="voc")
    ingest(source, out_dir=work / "ingest", params=IngestParams(source=source, workers=1))
    curate(work / "ingest", params=CurateParams(fiftyone=False), out_dir=work / "curate",
           curation_dir=work / "curation", cache_dir=work / "cache")
    return work / "curate"


def untrained_scores(curate_dir: Path, params, *, seed: int = 0) -> dict:
    """Test-tile metrics of the detector as built (the baseline), seeded like training."""
    import torch

    from tasks import detection as det
    from tasks import detection_data as dd

    p = params.detection
    rows, classes, info = dd.load_version(curate_dir)
    data = dd.split_dataset(rows, "test", Path(info["images_root"]), classes, tile_size=p.tile_size,
                            overlap=p.tile_overlap, min_visible=p.min_visible, transform=dd.build_eval_transform())
    torch.manual_seed(seed)
    model, _ = det.build_detector(p.arch, len(classes), weights=p.weights, image_size=p.tile_size,
                                  trainable_backbone_layers=p.trainable_backbone_layers, score_threshold=p.score_threshold)
    return dd.score_tiles(model, data, classes, device=torch.device("cpu"))


def run(size: int | None = None, out: Path = Path("reports/bench/detection")) -> dict:
    """Train for `size` epochs (default 5) on the deepforest tiles; figures and ratios, files under `out`."""
    import torch

    from tasks.detection import train_detection
    from tasks.params import DetectionParams, TrainParams

    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    curate_dir = prepare(work)
    params = TrainParams(device="cpu", num_threads=1, resume=False,
                         detection=DetectionParams(tile_size=200, batch_size=2, lr=0.04, epochs=size or 5))
    torch.set_num_threads(params.num_threads)
    before = untrained_scores(curate_dir, params)
    t0 = time.perf_counter()
    result = train_detection(curate_dir, params=params, out_dir=work / "train", seed=0)
    wall = time.perf_counter() - t0
    after = result.test
    keys = ("map", "map_50")
    return {
        "epochs": params.detection.epochs, "tile_size": params.detection.tile_size, "threads": params.num_threads,
        "arch": params.detection.arch, "test_tiles": after["n_tiles"], "test_boxes": after["n_boxes"],
        "train_tiles_per_second": result.images_per_second,
        "inference_tiles_per_second": after["tiles_per_second"],
        "train_seconds": round(wall, 1),
        "untrained": {k: before[k] for k in keys}, "trained": {k: after[k] for k in keys},
        "ratios": {"map_50 trained / untrained": after["map_50"] / max(before["map_50"], 1e-4),
                   "map trained / untrained": after["map"] / max(before["map"], 1e-4),
                   "inference / training tiles/s": after["tiles_per_second"] / max(result.images_per_second, 1e-9)},
    }
