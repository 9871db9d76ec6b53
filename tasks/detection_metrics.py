"""COCO-style detection metrics: torchmetrics' MeanAveragePrecision on the pycocotools backend.

Inputs are torchvision-style lists of dicts per image: predictions {"boxes" (N,4) XYXY absolute
pixels, "scores" (N,), "labels" (N,) int64, 1-based}, targets {"boxes", "labels"}; `classes`
names label i at classes[i - 1] (0 is Faster R-CNN's background).

Returns map (mAP@[.50:.95]), map_50, map_75, mar_100, per_class_ap (mAP@[.50:.95] per class),
per_class_ap_50, and pr_curves: per class, precision at 101 recall points (IoU .50, all areas,
100 detections), pycocotools' interpolated curve. A figure is None where pycocotools reports -1
(no ground truth and no detection for it).
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_POINTS = np.linspace(0, 1, 101)  # pycocotools' recThrs


def _defined(value: float) -> float | None:
    return round(float(value), 4) if value >= 0 else None


def coco_metrics(preds: list[dict], targets: list[dict], classes: list[str]) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools",
                                  extended_summary=True)
    metric.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds],
                  [{k: torch.as_tensor(v) for k, v in t.items()} for t in targets])
    out = metric.compute()
    ids = out["classes"].reshape(-1).tolist()
    # precision: (IoU thresholds, recall points, classes in `ids` order, areas, max-dets settings)
    precision = out["precision"].numpy()
    per_class, per_class_50, curves = ({name: None for name in classes} for _ in range(3))
    for k, class_id in enumerate(ids):
        if not 0 < class_id <= len(classes):
            continue
        name = classes[class_id - 1]
        p = precision[:, :, k, 0, -1]  # every IoU, all areas, 100 detections
        if (p > -1).any():
            per_class[name] = _defined(p[p > -1].mean())
        p50 = precision[0, :, k, 0, -1]
        if (p50 > -1).any():
            per_class_50[name] = _defined(p50[p50 > -1].mean())
            curves[name] = [round(float(v), 4) for v in np.where(p50 > -1, p50, 0.0)]
    return {**{k: _defined(float(out[k])) for k in ("map", "map_50", "map_75", "mar_100")},
            "per_class_ap": per_class, "per_class_ap_50": per_class_50,
            "pr_curves": {"recall": [round(float(r), 2) for r in RECALL_POINTS], "precision": curves}}


def pr_curves_png(curves: dict, title: str = "precision-recall at IoU .50") -> bytes | None:
    """One line per class with a curve, or None when no class has one."""
    drawn = {name: c for name, c in curves["precision"].items() if c is not None}
    if not drawn:
        return None
    from tasks.evaluate_report import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    for name, values in drawn.items():
        ax.plot(curves["recall"], values, label=str(name).replace("$", r"\$"))  # a class name is data, not math
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if len(drawn) <= 20:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
