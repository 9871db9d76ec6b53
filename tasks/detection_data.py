"""Detection data: curated rows and their boxes cut into fixed-size tiles, as a torch Dataset.

Inputs:  curated manifest rows (sample_id, path, split, width, height, exif_orientation; `path`
         relative to the images root, the ingest folder named in curation.json), the ingest
         folder's annotations.parquet (one row per box: sample_id, label, x1, y1, x2, y2 in
         absolute pixels of the image as stored) and classes.json.
Outputs: `Tile`s (a window of one image plus its boxes in tile coordinates) and `TileDataset`
         items: (tv_tensors.Image, {"boxes": tv_tensors.BoundingBoxes XYXY, "labels": int64}),
         labels 1-based (0 is Faster R-CNN's background); `score_tiles`: COCO-style metrics of a
         detector on a TileDataset (tasks.detection_metrics: torchmetrics on the pycocotools backend).
Params:  `train.detection` tile_size, tile_overlap, min_visible (tasks.params.DetectionParams).

Tiling: aerial images are far larger than what a detector sees at native resolution (tree
crowns are 10-100 px), and downscaling a 2,000 px scene to 400 px would shrink a crown below
the backbone's stride. So each image is cut into tile_size×tile_size windows that overlap by
`tile_overlap` (the last window is aligned to the image's edge, so every pixel is covered);
an image (or an edge) smaller than tile_size is one window, zero-padded at the bottom/right to
tile_size, so every tile has the same shape and the detector never rescales it. A box cut by a
window is clipped to it and kept when at least `min_visible` of its area lies inside (a crown
cut in half still teaches the model; a sliver does not). Images without boxes give tiles with
empty targets: background the model learns from.

Pixels come from `gate.load_canonical` (the project's decode and EXIF policy), so boxes are
mapped with `gate.orient_box` first. Decoded images are held in memory as uint8 (like
tasks.data.load_images): about 3 bytes per pixel of the split.

Augmentation is torchvision.transforms.v2 (box-aware flips, a small colour jitter); it draws from
torch's global RNG, so `TileDataset` seeds that RNG per item from (epoch seed, index) inside
`torch.random.fork_rng`: an item's augmentation depends only on the seed, never on the order
or process that asks for it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.gate import load_canonical, orient_box
from tasks.io import load_table, read_json

MIN_BOX_SIDE = 1.0  # px: a clipped box thinner than this is no object (and breaks the box coder)


@dataclass(frozen=True)
class Tile:
    """One window of one image: (x0, y0, x1, y1) in the oriented image, boxes in tile pixels."""

    sample_id: str
    window: tuple[int, int, int, int]
    boxes: np.ndarray   # (n, 4) float32 xyxy, relative to the window's top-left corner
    labels: np.ndarray  # (n,) int64, 1-based class indices


# --------------------------------------------------------------------------- tiling (pure)


def _starts(length: int, tile_size: int, overlap: float) -> list[int]:
    """Window starts along one axis: a regular stride, the last window flush with the edge."""
    if length <= tile_size:
        return [0]
    stride = max(1, round(tile_size * (1 - overlap)))
    starts = list(range(0, length - tile_size, stride))
    return starts + [length - tile_size]


def tile_windows(width: int, height: int, *, tile_size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) windows covering a width×height image, row by row.

    Windows are tile_size wide except along an axis shorter than tile_size, where the one
    window is the whole axis (the tile is padded later).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be at least 1 px")
    if tile_size < 1 or not 0 <= overlap < 1:
        raise ValueError(f"tile_size={tile_size}, overlap={overlap}: need tile_size >= 1 and 0 <= overlap < 1")
    xs, ys = _starts(width, tile_size, overlap), _starts(height, tile_size, overlap)
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in ys for x in xs]


def clip_boxes(boxes: np.ndarray, window: tuple[int, int, int, int], *,
               min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes cut to `window`, in window coordinates, and the mask of input boxes kept.

    A box is kept when (area inside the window) / (its area) >= min_visible and the clipped
    box is at least MIN_BOX_SIDE on both sides.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = window
    clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1),
                        boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        visible = np.where(area > 0, cw * ch / area, 0.0)
    keep = (visible >= min_visible) & (cw >= MIN_BOX_SIDE) & (ch >= MIN_BOX_SIDE)
    shifted = clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)
    return shifted.astype(np.float32), keep


def tile_image(sample_id: str, width: int, height: int, boxes: np.ndarray, labels: np.ndarray, *,
               tile_size: int, overlap: float, min_visible: float) -> list[Tile]:
    """Every tile of one (oriented) image with the boxes each keeps."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    tiles = []
    for window in tile_windows(width, height, tile_size=tile_size, overlap=overlap):
        kept, mask = clip_boxes(boxes, window, min_visible=min_visible)
        tiles.append(Tile(sample_id, window, kept, labels[mask]))
    return tiles


# --------------------------------------------------------------------------- reading a version


def load_boxes(images_root: Path, rows: pd.DataFrame, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sample_id -> (boxes (n, 4) xyxy in the oriented image, labels (n,) 1-based) for `rows`.

    Boxes are read from `images_root`/annotations.parquet (the ingest folder; curate marks
    images, it does not copy boxes) and mapped with `gate.orient_box`, because
    `load_canonical` returns the image as displayed. Rows without boxes map to empty arrays.
    Raises ValueError naming a box label that is not in `classes`.
    """
    ann = load_table(Path(images_root) / "annotations.parquet").to_pandas().dropna(subset=["x1"])
    ann = ann[ann["sample_id"].isin(set(rows["sample_id"]))]
    index = {name: i + 1 for i, name in enumerate(classes)}  # 0 is the background class
    unknown = sorted(set(ann["label"]) - set(index))
    if unknown:
        raise ValueError(f"{images_root}/annotations.parquet: box labels {unknown[:5]} not in classes.json {classes}")
    facts = rows.set_index("sample_id")[["width", "height", "exif_orientation"]]
    grouped = {sid: g for sid, g in ann.groupby("sample_id", sort=False)}
    out = {}
    for sid, (w, h, orientation) in facts.iterrows():
        g = grouped.get(sid)
        if g is None:
            out[sid] = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
            continue
        o = 1 if pd.isna(orientation) else int(orientation)
        boxes = [orient_box(b, width=int(w), height=int(h), orientation=o)
                 for b in g[["x1", "y1", "x2", "y2"]].itertuples(index=False, name=None)]
        out[sid] = (np.asarray(boxes, np.float32), np.asarray([index[x] for x in g["label"]], np.int64))
    return out


def displayed_size(row) -> tuple[int, int]:
    """(width, height) as load_canonical returns the image (orientations 5..8 swap the sides)."""
    o = 1 if pd.isna(row.exif_orientation) else int(row.exif_orientation)
    return (int(row.height), int(row.width)) if o in (5, 6, 7, 8) else (int(row.width), int(row.height))


def build_tiles(rows: pd.DataFrame, boxes: dict[str, tuple[np.ndarray, np.ndarray]], *, tile_size: int,
                overlap: float, min_visible: float) -> list[Tile]:
    """The tiles of every row, in row order (each image's tiles row by row)."""
    tiles = []
    for row in rows.itertuples(index=False):
        w, h = displayed_size(row)
        b, labels = boxes[row.sample_id]
        tiles += tile_image(row.sample_id, w, h, b, labels, tile_size=tile_size, overlap=overlap,
                            min_visible=min_visible)
    return tiles


def load_rgb(images_root: Path, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    """sample_id -> uint8 (3, H, W) tensor, decoded once by the gate's policy (RGB: the
    ImageNet backbones want three channels; L images have their channel copied)."""
    out = {}
    for sid, rel in zip(rows["sample_id"], rows["path"]):
        arr = np.asarray(load_canonical((Path(images_root) / rel).read_bytes(), mode="RGB"))
        out[sid] = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return out


# --------------------------------------------------------------------------- dataset and transforms


def crop_tile(image: torch.Tensor, window: tuple[int, int, int, int], tile_size: int) -> torch.Tensor:
    """The window's pixels, zero-padded at the bottom/right to tile_size×tile_size."""
    x0, y0, x1, y1 = window
    crop = image[:, y0:y1, x0:x1]
    pad_w, pad_h = tile_size - crop.shape[2], tile_size - crop.shape[1]
    return F.pad(crop, (0, pad_w, 0, pad_h)) if pad_w or pad_h else crop.contiguous()


def _item_seed(epoch_seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{epoch_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TileDataset(torch.utils.data.Dataset):
    """Tiles as (tv_tensors.Image, target) pairs, transformed by a v2 transform.

    images: sample_id -> uint8 (3, H, W) (from `load_rgb`). transform: a v2 transform taking
    (image, target) (from `build_train_transform` / `build_eval_transform`). Call
    `set_epoch_seed(s)` before each epoch: item i of that epoch is augmented from (s, i).
    """

    def __init__(self, tiles: list[Tile], images: dict[str, torch.Tensor], *, tile_size: int, transform):
        self.tiles, self.images, self.tile_size, self.transform = tiles, images, tile_size, transform
        self.epoch_seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = int(seed)

    def __len__(self) -> int:
        return len(self.tiles)

    def raw(self, i: int) -> tuple[tv_tensors.Image, dict]:
        """Item i before the transform: uint8 pixels and the tile's boxes."""
        t = self.tiles[i]
        size = (self.tile_size, self.tile_size)
        image = tv_tensors.Image(crop_tile(self.images[t.sample_id], t.window, self.tile_size))
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(t.boxes).reshape(-1, 4), format="XYXY", canvas_size=size)
        return image, {"boxes": boxes, "labels": torch.from_numpy(t.labels)}

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        image, target = self.raw(i)
        with torch.random.fork_rng(devices=[]):  # v2 draws from the global RNG; keep ours out of it
            torch.manual_seed(_item_seed(self.epoch_seed, i))
            return self.transform(image, target)


def batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    """Index lists of `batch_size` over 0..n-1, in `order` when given."""
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size].tolist()


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists, as torchvision's detection models take them (targets differ in box count)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_train_transform(*, flip_p: float = 0.5, jitter: float = 0.1) -> v2.Compose:
    """Box-aware train preset: horizontal and vertical flips (an aerial view has no up), a small
    brightness/contrast/saturation jitter (sun and season), then float in [0, 1].

    Flips keep every box inside the tile, so no box is lost or needs sanitizing. The detector
    normalizes with ImageNet statistics itself (GeneralizedRCNNTransform).
    """
    if not 0 <= flip_p <= 1 or not 0 <= jitter < 1:
        raise ValueError(f"flip_p={flip_p}, jitter={jitter}: need 0 <= flip_p <= 1 and 0 <= jitter < 1")
    steps = [v2.RandomHorizontalFlip(flip_p), v2.RandomVerticalFlip(flip_p)]
    if jitter:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def build_eval_transform() -> v2.Compose:
    """Deterministic eval preset: uint8 -> float in [0, 1], boxes untouched."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


# --------------------------------------------------------------------------- a curated version


def load_version(curate_dir: Path) -> tuple[pd.DataFrame, list[str], dict]:
    """Kept rows of a curated detection version, its classes and its curation.json.

    Raises ValueError when the ingest version it names (curation.json "images_root") is not detection.
    """
    info = read_json(Path(curate_dir) / "curation.json")
    root = Path(info["images_root"])
    task = read_json(root / "version.json").get("task")
    if task != "detection":
        raise ValueError(f"{root}/version.json: task is {task!r}; detection training needs a detection version")
    df = load_table(Path(curate_dir) / "manifest.parquet").to_pandas()
    kept = df[~df["excluded"]] if "excluded" in df else df
    return kept.reset_index(drop=True), list(read_json(root / "classes.json")), info


def split_dataset(rows: pd.DataFrame, split: str, images_root: Path, classes: list[str], *, tile_size: int,
                  overlap: float, min_visible: float, transform) -> TileDataset | None:
    """The tiles of one split as a TileDataset (its images decoded now); None when the split has no rows."""
    part = rows[rows["split"] == split].reset_index(drop=True)
    if part.empty:
        return None
    tiles = build_tiles(part, load_boxes(images_root, part, classes), tile_size=tile_size, overlap=overlap,
                        min_visible=min_visible)
    return TileDataset(tiles, load_rgb(images_root, part), tile_size=tile_size, transform=transform)


# --------------------------------------------------------------------------- tile metrics


@torch.no_grad()
def score_tiles(model: torch.nn.Module, dataset: TileDataset, classes: list[str], *, device: torch.device,
                batch_size: int = 4, bf16: bool = False) -> dict:
    """COCO-style metrics of `model` on every tile of `dataset`, and inference tiles/s.

    Returns tasks.detection_metrics.coco_metrics' dict (map, map_50, map_75, mar_100,
    per_class_ap, per_class_ap_50, pr_curves) plus "n_tiles", "n_boxes", "tiles_per_second".
    """
    from tasks.detection_metrics import coco_metrics

    model.eval()
    seconds, n_boxes, all_preds, all_targets = 0.0, 0, [], []
    for idx in batches(len(dataset), batch_size):
        images, targets = collate([dataset[i] for i in idx])
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            preds = model([im.to(device) for im in images])
        all_preds += [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in p.items()} for p in preds]
        seconds += time.perf_counter() - t0
        all_targets += [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
        n_boxes += sum(len(t["labels"]) for t in targets)
    return {**coco_metrics(all_preds, all_targets, classes), "n_tiles": len(dataset), "n_boxes": n_boxes,
            "tiles_per_second": round(len(dataset) / max(seconds, 1e-9), 2)}
