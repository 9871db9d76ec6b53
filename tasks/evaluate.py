"""Stage evaluate: test-split metrics, a confusion matrix and a self-contained HTML report.

Inputs:  data/train/ (model.pt, model.json), data/curate/ (manifest, curation.json), images.
Outputs: reports/metrics.json                 headline metrics for `dvc metrics show`
         reports/evaluate/metrics.json        full metrics (per class, confusion matrix)
         reports/evaluate/confusion_matrix.png
         reports/evaluate/index.html          one offline page: plots embedded, strings escaped
Params:  `evaluate:` section.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.data import build_eval_transform, image_channels, label_indices, load_images
from tasks.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from tasks.params import EvaluateParams, Params
from tasks.train import load_trained, load_training_rows, predict_logits


@dataclass(frozen=True)
class EvaluateResult:
    accuracy: float
    macro_f1: float
    n_test: int
    dataset_version: str
    metrics_path: str
    report_path: str


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix."""
    k = len(classes)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    # A class never predicted (or absent) has precision (recall) 0 by convention, as sklearn's zero_division=0.
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


def confusion_png(cm: list[list[int]], classes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps the import cheap
    import matplotlib.pyplot as plt

    arr = np.asarray(cm)
    norm = arr / np.maximum(arr.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(arr[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PixelOps evaluation {{ version }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.big{font-size:2rem;font-weight:600;margin-right:2rem}.muted{color:#666}
</style></head><body>
<h1>Evaluation on the test split</h1>
<p><span class="big">accuracy {{ "%.4f"|format(m.accuracy) }}</span>
<span class="big">macro F1 {{ "%.4f"|format(m.macro_f1) }}</span></p>
<p class="muted">{{ n_test }} test images · dataset version <code>{{ version }}</code> ·
model <code>{{ arch }}</code> ({{ weights }}) · {{ image_size }} px · model sha256 <code>{{ model_sha[:16] }}</code></p>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for name, c in m.per_class.items() %}<tr><td>{{ name }}</td><td>{{ "%.3f"|format(c.precision) }}</td>
<td>{{ "%.3f"|format(c.recall) }}</td><td>{{ "%.3f"|format(c.f1) }}</td><td>{{ c.support }}</td></tr>
{% endfor %}</table>
<h2>Confusion matrix</h2>
<img alt="confusion matrix (row-normalized colour, counts in cells)" src="data:image/png;base64,{{ cm_png }}">
<h2>Training</h2>
<table><tr><th>epoch</th><th>train loss</th><th>val accuracy</th><th>seconds</th></tr>
{% for h in history %}<tr><td>{{ h.epoch }}</td><td>{{ "%.4f"|format(h.train_loss) }}</td>
<td>{{ "%.4f"|format(h.val_accuracy) if h.val_accuracy is defined else "" }}</td><td>{{ h.seconds }}</td></tr>
{% endfor %}</table>
</body></html>
"""


def render_report(metrics: dict, meta: dict, cm_png: bytes) -> str:
    from jinja2 import Environment

    env = Environment(autoescape=True)  # class names and paths are data: always escaped
    spec = meta["spec"]
    return env.from_string(_REPORT).render(
        m=metrics, version=meta["dataset_version"], n_test=metrics["n_test"], arch=spec["arch"],
        weights=spec.get("weights") or "from scratch", image_size=spec["image_size"],
        model_sha=meta.get("model_sha256", ""), history=meta.get("history", []),
        cm_png=base64.b64encode(cm_png).decode())


def evaluate(model_dir: Path, curate_dir: Path, *, params: EvaluateParams, report_dir: Path,
             metrics_path: Path, num_threads: int = 2) -> EvaluateResult:
    """Score the model in `model_dir` on the test split of the curated version."""
    torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    model, spec, meta = load_trained(Path(model_dir))
    rows, classes, version, images_root = load_training_rows(Path(curate_dir))
    if version != meta["dataset_version"]:
        raise ValueError(f"{model_dir}: model was trained on {meta['dataset_version']}, curated data is {version}")
    rows = rows[rows["split"] == "test"].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{curate_dir}/manifest.parquet: no test rows to evaluate on")
    images = load_images(rows, images_root, size=spec.image_size, channels=image_channels(rows))
    y_true = label_indices(rows, classes).numpy()
    logits = predict_logits(model, images, build_eval_transform(mean=spec.mean, std=spec.std),
                            batch_size=params.batch_size, device=torch.device("cpu"),
                            channels_last=False, bf16=False)
    metrics = classification_metrics(y_true, logits.argmax(1).numpy(), classes)
    metrics.update(n_test=len(rows), dataset_version=version, seconds=round(time.perf_counter() - t0, 2))

    report_dir = Path(report_dir)
    png = confusion_png(metrics["confusion_matrix"], classes)
    atomic_write_bytes(report_dir / "confusion_matrix.png", png)
    atomic_write_json(report_dir / "metrics.json", metrics)
    atomic_write_text(report_dir / "index.html", render_report(metrics, meta, png))
    headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "n_test")}
    atomic_write_json(metrics_path, headline)
    return EvaluateResult(metrics["accuracy"], metrics["macro_f1"], len(rows), version, str(metrics_path),
                          str(report_dir / "index.html"))


def evaluate_detector(model_dir: Path, curate_dir: Path, *, report_dir: Path, metrics_path: Path,
                      num_threads: int = 2) -> dict:
    """A detection version: COCO-style mAP of the Faster R-CNN on the test tiles
    (tasks.detection.evaluate_detection), headline numbers into `metrics_path`."""
    from tasks.detection import evaluate_detection

    torch.set_num_threads(num_threads)
    metrics = evaluate_detection(model_dir, curate_dir, "test")
    atomic_write_json(Path(report_dir) / "metrics.json", metrics)
    headline = {k: metrics[k] for k in ("map", "map_50", "n_images") if k in metrics}
    atomic_write_json(metrics_path, headline)
    return metrics


def run(params: Params):
    from tasks.train import dataset_task

    data = params.paths.data
    kwargs = {"report_dir": params.paths.reports / "evaluate", "metrics_path": params.paths.reports / "metrics.json",
              "num_threads": params.train.num_threads}
    if dataset_task(data / "curate") == "detection":
        return evaluate_detector(data / "train", data / "curate", **kwargs)
    return evaluate(data / "train", data / "curate", params=params.evaluate, **kwargs)


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    r = run(load_params(overrides=argv or []))
    if isinstance(r, dict):  # detection
        print(f"test mAP {r['map']:.4f}, mAP@.50 {r['map_50']:.4f} on {r['n_images']} images of {r['dataset_version']}")
    else:
        print(f"test accuracy {r.accuracy:.4f}, macro F1 {r.macro_f1:.4f} on {r.n_test} images "
              f"of {r.dataset_version} → {r.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
