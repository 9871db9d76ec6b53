"""Detection mAP of tasks.detection_metrics equals pycocotools' COCOeval run directly on the same boxes."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.detection_metrics import coco_metrics, pr_curves_png

CLASSES = ["tree", "<b>car</b>"]


def _scene(seed: int = 0, n_images: int = 6):
    """Ground truth boxes and noisy detections: jittered true boxes, misses, false positives."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n_images):
        n = int(rng.integers(2, 8))
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(15, 90, (n, 2))
        gt = np.hstack([xy, xy + wh]).astype(np.float32)
        labels = rng.integers(1, len(CLASSES) + 1, n)
        keep = rng.random(n) > 0.2  # some objects are missed
        jitter = rng.normal(0, 6, (n, 4)).astype(np.float32)
        det = (gt + jitter)[keep]
        det_labels = labels[keep].copy()
        flip = rng.random(len(det_labels)) < 0.1  # some get the wrong class
        det_labels[flip] = len(CLASSES) + 1 - det_labels[flip]
        fp_xy = rng.uniform(0, 300, (3, 2))
        fp = np.hstack([fp_xy, fp_xy + rng.uniform(15, 60, (3, 2))]).astype(np.float32)
        boxes = np.vstack([det, fp])
        scores = np.concatenate([rng.uniform(0.4, 1.0, len(det)), rng.uniform(0.05, 0.7, 3)]).astype(np.float32)
        preds.append({"boxes": boxes, "scores": scores,
                      "labels": np.concatenate([det_labels, rng.integers(1, len(CLASSES) + 1, 3)]).astype(np.int64)})
        targets.append({"boxes": gt, "labels": labels.astype(np.int64)})
    return preds, targets


def _xywh(b) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def _pycocotools(preds, targets):
    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets), start=1):
        images.append({"id": i, "width": 400, "height": 400})
        for b, lab in zip(t["boxes"], t["labels"]):
            box = _xywh(b)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            dets.append({"image_id": i, "category_id": int(lab), "bbox": _xywh(b), "score": float(s)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_map_equals_pycocotools_on_the_same_predictions():
    preds, targets = _scene()
    ours = coco_metrics(preds, targets, CLASSES)
    ev = _pycocotools(preds, targets)
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-4)
    assert ours["map_50"] == pytest.approx(ev.stats[1], abs=1e-4)
    assert ours["map_75"] == pytest.approx(ev.stats[2], abs=1e-4)
    assert ours["mar_100"] == pytest.approx(ev.stats[8], abs=1e-4)
    assert 0.2 < ours["map_50"] < 0.99  # a scene with real misses and false positives, not a trivial one
    for k, name in enumerate(CLASSES):
        p = ev.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class_ap"][name] == pytest.approx(p[p > -1].mean(), abs=1e-4)
        curve = ev.eval["precision"][0, :, k, 0, -1]
        assert ours["pr_curves"]["precision"][name] == pytest.approx(np.where(curve > -1, curve, 0), abs=1e-4)
        assert ours["per_class_ap_50"][name] == pytest.approx(curve[curve > -1].mean(), abs=1e-4)


def test_perfect_detections_score_one_and_a_class_without_boxes_is_none():
    _, targets = _scene(seed=1)
    only_tree = [{"boxes": t["boxes"][t["labels"] == 1], "labels": t["labels"][t["labels"] == 1]} for t in targets]
    perfect = [{**t, "scores": np.ones(len(t["labels"]), dtype=np.float32)} for t in only_tree]
    out = coco_metrics(perfect, only_tree, CLASSES)
    assert out["map"] == pytest.approx(1.0) and out["per_class_ap"]["tree"] == pytest.approx(1.0)
    assert out["per_class_ap"]["<b>car</b>"] is None and out["pr_curves"]["precision"]["<b>car</b>"] is None
    png = pr_curves_png(out["pr_curves"])
    assert png[:4] == b"\x89PNG"
