"""The validate gate on a detection version of `size` boxes (1,000,000 by default): the stage's
GX path against the same checks written directly in pandas, in the same run.

Data (written once into a temp folder, not timed): `size` boxes on size/10 images (640x480 to
1024x768, train/val/test 80/10/10, 10 classes), boxes drawn at random inside their image. Two
versions: `clean`, and `defects` with known numbers of planted defects for every box rule
(out of bounds, sub-pixel, swapped corners, xywh, unknown label, null coordinate, orphan box,
one image with 1,500 boxes) and a few image-table ones (leaked content, oversized images).

Each (path, version) runs in its own fresh Python process, twice; the faster run counts:
  gx      tasks.validate.validate(...): GX Core 1.x on the flat tables, summary.json + index.html
  pandas  the same rules as boolean masks over the same tables, counts + 5 example rows each,
          summary.json only
Per run: import time (pandas alone vs the stage with GX), load + validate time, and peak
memory as the process's peak resident set (resource.getrusage ru_maxrss, which counts pyarrow
buffers that tracemalloc cannot see), also above the RSS right after imports. The two paths must
agree on every expectation's unexpected count, or the benchmark fails.
Ratios: gx / pandas for validation time, whole-process time, peak RSS and peak RSS above imports.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = [f"class{i}" for i in range(10)]
REPEATS = 2


# --------------------------------------------------------------------------- data


def _write_version(dest: Path, n_boxes: int, *, defects: bool, seed: int = 0) -> dict:
    """A detection version (manifest, annotations, classes, version.json); returns planted counts."""
    import pyarrow as pa

    from tasks.io import ANNOTATION_SCHEMA, MANIFEST_SCHEMA, save_table

    if defects and n_boxes < 20_000:
        raise ValueError(f"size {n_boxes}: the defects version plants 10,500 bad boxes; use at least 20000")
    rng = np.random.default_rng(seed)
    n_images = max(10, n_boxes // 10)
    sizes = np.array([(640, 480), (800, 600), (1024, 768)])[rng.integers(0, 3, n_images)]
    width, height = sizes[:, 0].astype("int32"), sizes[:, 1].astype("int32")
    split = np.array(["train", "val", "test"])[rng.choice(3, n_images, p=[0.8, 0.1, 0.1])]
    sample_id = np.array([f"{i:024x}" for i in range(n_images)], dtype=object)
    content_hash = np.array([f"{i:064x}" for i in range(n_images)], dtype=object)

    image = np.sort(rng.integers(0, n_images, n_boxes))
    iw, ih = width[image].astype("float64"), height[image].astype("float64")
    x1 = np.floor(rng.uniform(0, iw - 24))
    y1 = np.floor(rng.uniform(0, ih - 24))
    x2 = x1 + np.floor(rng.uniform(4, np.minimum(200, iw - x1)))
    y2 = y1 + np.floor(rng.uniform(4, np.minimum(200, ih - y1)))
    label = np.array(CLASSES, dtype=object)[rng.integers(0, len(CLASSES), n_boxes)]
    box_sid = sample_id[image].copy()
    y1_null = np.zeros(n_boxes, dtype=bool)
    planted = {}
    if defects:
        rows = rng.permutation(n_boxes)
        take = iter(np.split(rows[:9000], np.cumsum([1000, 1000, 1000, 2000, 500, 500, 500]))[:-1])
        r = next(take)
        x2[r] += iw[r]                                         # out of bounds
        r = next(take)
        x2[r] = x1[r] + 0.5                                    # sub-pixel width
        r = next(take)
        x1[r], x2[r] = x2[r].copy(), x1[r].copy()              # swapped corners
        r = next(take)
        x2[r] -= x1[r]                                         # xywh
        y2[r] -= y1[r]
        label[next(take)] = "unknown"                          # not in the class map
        y1_null[next(take)] = True                             # null coordinate
        box_sid[next(take)] = "no-such-image"                  # orphan box
        box_sid[rows[9000:10500]] = sample_id[0]               # one image with 1,500 boxes
        train = np.flatnonzero(split == "train")
        content_hash[train[:50]] = content_hash[np.flatnonzero(split == "test")[:50]]  # leaked content
        width[train[100:120]] = 5000                           # oversized images
        planted = {"boxes": 10500, "images": 70}

    manifest = pa.table({
        "sample_id": sample_id, "content_hash": content_hash,
        "path": [f"images/{h[:2]}/{h}.png" for h in content_hash], "label": pa.nulls(n_images, pa.string()),
        "split": split, "width": width, "height": height, "mode": np.full(n_images, "RGB", dtype=object),
        "exif_orientation": np.ones(n_images, dtype="int8"), "source_key": [f"img{i:07d}.jpg" for i in range(n_images)],
    }, schema=MANIFEST_SCHEMA)
    ann = pa.table({"sample_id": box_sid, "label": label, "x1": x1, "y1": pa.array(y1, mask=y1_null),
                    "x2": x2, "y2": y2}, schema=ANNOTATION_SCHEMA)
    dest.mkdir(parents=True)
    save_table(manifest, dest / "manifest.parquet")
    save_table(ann, dest / "annotations.parquet")
    (dest / "classes.json").write_text(json.dumps(CLASSES))
    (dest / "version.json").write_text(json.dumps({"version": dest.name, "task": "detection"}))
    return {"images": n_images, "boxes": n_boxes, "planted": planted}


# --------------------------------------------------------------------------- the two paths


def _gx_path(data: Path, p, report: Path) -> dict[str, int]:
    from tasks.validate import validate

    result = validate(data / "manifest.parquet", classes=json.loads((data / "classes.json").read_text()),
                      params=p, report_dir=report, version=data.name, task="detection",
                      annotations_path=data / "annotations.parquet")
    return {e["name"]: e["unexpected_count"] for e in result.expectations}


def _pandas_path(data: Path, p, report: Path) -> dict[str, int]:
    """The stage's rules for detection, written directly as pandas masks."""
    import pandas as pd

    images = pd.read_parquet(data / "manifest.parquet")
    ann = pd.read_parquet(data / "annotations.parquet")
    classes = json.loads((data / "classes.json").read_text())
    out: dict[str, dict] = {}

    def record(name: str, frame, *masks) -> None:  # a second call for a name adds to its count
        hit = masks[0] if len(masks) == 1 else np.logical_or.reduce([m.to_numpy() for m in masks])
        entry = out.setdefault(name, {"unexpected_count": 0, "examples": []})
        entry["unexpected_count"] += int(sum(int(m.sum()) for m in masks))
        entry["examples"] += frame.loc[hit].head(5 - len(entry["examples"])).astype(str).to_dict("records")

    # the images table
    record("no_nulls", images, *[images[c].isna() for c in images.columns if c != "label"])
    record("no_nulls", ann, *[ann[c].isna() for c in ann.columns])
    record("unique_sample_id", images, images["sample_id"].duplicated(keep=False) & images["sample_id"].notna())
    record("split_allowed", images, images["split"].notna() & ~images["split"].isin(p.allowed_splits))
    record("image_size_in_bounds", images, ~images["width"].between(p.min_width, p.max_width) & images["width"].notna(),
           ~images["height"].between(p.min_height, p.max_height) & images["height"].notna())
    leak = images.groupby("content_hash")["split"].transform("nunique") > 1
    record("no_cross_split_content", images, leak)
    counts = images["split"].value_counts()
    splits = [*p.allowed_splits, *sorted(set(counts.index) - set(p.allowed_splits))]
    shares = pd.DataFrame({"split": splits, "fraction": [counts.get(s, 0) / max(len(images), 1) for s in splits]})
    lo = shares["split"].map(lambda s: p.split_fraction.get(s, (0.0, 1.0))[0])
    hi = shares["split"].map(lambda s: p.split_fraction.get(s, (0.0, 1.0))[1])
    record("split_fraction_in_bounds", shares, shares["fraction"] < lo, shares["fraction"] > hi)

    # boxes joined to their image
    first = images.drop_duplicates("sample_id")[["sample_id", "width", "height", "split", "source_key"]]
    boxes = ann.merge(first, on="sample_id", how="left", indicator=True)
    record("label_in_class_map", boxes, boxes["label"].notna() & ~boxes["label"].isin(classes))
    record("box_image_in_manifest", boxes, boxes["_merge"] == "left_only")
    w, h = (boxes["x2"] - boxes["x1"]).abs(), (boxes["y2"] - boxes["y1"]).abs()
    W, H = boxes["width"].astype("float64"), boxes["height"].astype("float64")
    overhang = pd.concat([-boxes.x1, -boxes.y1, -boxes.x2, -boxes.y2, boxes.x1 - W, boxes.x2 - W,
                          boxes.y1 - H, boxes.y2 - H], axis=1).max(axis=1, skipna=False)
    record("box_inside_image", boxes, overhang > p.box_tolerance)
    record("box_positive_size", boxes, np.minimum(w, h) < p.min_box_side)
    record("box_coords_ordered", boxes, np.minimum(boxes.x2 - boxes.x1, boxes.y2 - boxes.y1) <= 0)
    area = w * h / (W * H)
    record("box_area_in_bounds", boxes, (area < p.min_box_area) | (area > p.max_box_area))
    t = p.box_tolerance
    xywh = (((boxes.x2 <= boxes.x1) | (boxes.y2 <= boxes.y1)) & (boxes.x2 > 0) & (boxes.y2 > 0)
            & (boxes.x1 >= -t) & (boxes.y1 >= -t) & (boxes.x1 + boxes.x2 <= W + t) & (boxes.y1 + boxes.y2 <= H + t))
    record("box_not_xywh", boxes, xywh & boxes[["x1", "y1", "x2", "y2"]].notna().all(axis=1) & W.notna())
    per_image = images["sample_id"].map(ann["sample_id"].value_counts()).fillna(0)
    record("max_boxes_per_image", images, per_image > p.max_boxes_per_image)

    # class shape, counted in boxes per allowed split present
    present = [s for s in p.allowed_splits if s in set(images["split"])] or list(p.allowed_splits)
    grid = pd.MultiIndex.from_product([present, classes], names=["split", "label"])
    per_class = boxes.groupby(["split", "label"]).size().reindex(grid, fill_value=0).rename("count").reset_index()
    record("min_per_class", per_class, per_class["count"] < p.min_per_class)
    nonzero = per_class[per_class["count"] > 0].groupby("split")["count"]
    ratio = (nonzero.max() / nonzero.min()).reset_index(name="imbalance")
    record("class_imbalance", ratio, ratio["imbalance"] > p.max_class_imbalance)

    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.json").write_text(json.dumps(out, indent=2, default=str))
    return {k: v["unexpected_count"] for k, v in out.items()}


def _child(path: str, data: str) -> None:
    """One measured run in this (fresh) process; prints its figures as JSON."""
    t0 = time.perf_counter()
    import pandas  # noqa: F401  (both paths need it; the GX path also imports the stage and GX)

    if path == "gx":
        import great_expectations  # noqa: F401

        import tasks.validate  # noqa: F401
    from tasks.params import load_params

    p = load_params().validate_
    imported = time.perf_counter()
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-validate-report-") as report:
        counts = (_gx_path if path == "gx" else _pandas_path)(Path(data), p, Path(report))
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"import_s": imported - t0, "validate_s": done - imported, "process_s": done - t0,
                      "peak_rss_mb": peak / 1024, "peak_rss_above_imports_mb": (peak - rss_imports) / 1024,
                      "unexpected": counts}))


def _measure(path: str, data: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    runs = []
    for _ in range(REPEATS):
        proc = subprocess.run([sys.executable, "-m", "bench.validate", path, str(data)], env=env, check=False,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{path} run on {data} failed: {proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["validate_s"])
    return {**best, "validate_s_all": [round(r["validate_s"], 3) for r in runs]}


def run(size: int | None = None) -> dict:
    n = size or 1_000_000
    out: dict = {"boxes": n, "repeats": REPEATS, "memory": "peak RSS of each run's own process (ru_maxrss)",
                 "versions": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-validate-") as tmp:
        for version in ("clean", "defects"):
            data = Path(tmp) / version
            info = _write_version(data, n, defects=version == "defects")
            gx, pd_ = _measure("gx", data), _measure("pandas", data)
            differ = {k: (v, pd_["unexpected"].get(k)) for k, v in gx["unexpected"].items()
                      if v != pd_["unexpected"].get(k)}
            if differ:
                raise RuntimeError(f"{version}: GX and pandas disagree (gx, pandas): {differ}")
            out["versions"][version] = {**info, "gx": gx, "pandas": pd_}
            for key, what in (("validate_s", "validation time"), ("process_s", "process time incl. imports"),
                              ("peak_rss_mb", "peak RSS"), ("peak_rss_above_imports_mb", "peak RSS above imports")):
                out["ratios"][f"{version}: gx / pandas {what}"] = gx[key] / pd_[key]
    return out


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
