"""Stage evaluate: test-split metrics with intervals, calibration, plots, a model card and a
self-contained HTML report that compares the run with the previous one.

Inputs:  data/train/ (model.pt, model.json), data/curate/ (manifest, curation.json), images.
Outputs: reports/metrics.json                 headline metrics for `dvc metrics show/diff`
         reports/evaluate/metrics.json        everything: per class, confusion, calibration, intervals
         reports/evaluate/index.html          one offline page: plots embedded, strings escaped
         reports/evaluate/model_card.md       the model card (tasks.model_card)
         reports/evaluate/lineage.json        what the model was made from (tasks.lineage)
         reports/evaluate/plots/*.csv         data for `dvc plots show/diff` (dvc.yaml plots:)
         reports/evaluate/*.png               the plots, also embedded in the page
         reports/runs/<run>/                  the page, card and metrics kept per run (persisted)
         reports/history.jsonl                one line per evaluated run (persisted): the comparison
Params:  `evaluate:` section.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks import evaluate_report as er
from tasks import safe_csv
from tasks.data import build_eval_transform, image_channels, label_indices, load_images
from tasks.io import Staged, atomic_write_bytes, atomic_write_json, atomic_write_text
from tasks.lineage import compare, flatten, lineage, read_history, with_run
from tasks.metrics import (
    bootstrap_intervals,
    calibration,
    classification_metrics,
    confident_mistakes,
    softmax,
    top_k_accuracy,
)
from tasks.model_card import model_card
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
    probs = softmax(logits.numpy().astype(np.float64))
    y_pred = probs.argmax(1)
    metrics = classification_metrics(y_true, y_pred, classes)
    metrics.update(
        top_k=min(params.top_k, len(classes)), top_k_accuracy=top_k_accuracy(y_true, probs, params.top_k),
        calibration=calibration(y_true, probs, params.calibration_bins),
        intervals=bootstrap_intervals(y_true, y_pred, len(classes), n=params.bootstrap, ci=params.ci),
        intervals_level=params.ci, bootstrap_resamples=params.bootstrap,
    )
    metrics["ece"] = metrics["calibration"]["ece"]
    metrics.update(n_test=len(rows), dataset_version=version, seconds=round(time.perf_counter() - t0, 2))
    lin = lineage(meta, Path(curate_dir), n_test=len(rows))
    mistakes = [{"index": i, "path": str(rows["path"][i]), "true": classes[y_true[i]], "pred": classes[y_pred[i]],
                 "confidence": float(probs[i, y_pred[i]])} for i in confident_mistakes(y_true, probs, params.gallery)]
    metrics["confident_mistakes"] = mistakes
    write_outputs(metrics, lin, meta, classes, mistakes, images_root=Path(images_root), report_dir=Path(report_dir),
                  metrics_path=Path(metrics_path), y_true=y_true, y_pred=y_pred)
    return EvaluateResult(metrics["accuracy"], metrics["macro_f1"], len(rows), version, str(metrics_path),
                          str(Path(report_dir) / "index.html"))


HEADLINE = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
            ("top_k_accuracy", "top-{k} accuracy"), ("ece", "calibration error (ECE)"))


def _plot_data(report_dir: Path, metrics: dict, classes: list[str], y_true, y_pred, history: list[dict]) -> None:
    """CSV files for `dvc plots`: per-image (actual, predicted), reliability bins, per-class scores, history.
    Class names are data: a name starting with = + - @ is written quoted (tasks.safe_csv)."""
    def write(name: str, header: list[str], rows) -> None:
        buf = io.StringIO()
        w = safe_csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        atomic_write_text(report_dir / "plots" / name, buf.getvalue())

    write("confusion.csv", ["actual", "predicted"], ((classes[t], classes[p]) for t, p in zip(y_true, y_pred)))
    write("calibration.csv", ["confidence", "accuracy", "count"],
          ((round(b["confidence"], 6), round(b["accuracy"], 6), b["count"])
           for b in metrics["calibration"]["bins"] if b["count"]))
    write("per_class.csv", ["class", "precision", "recall", "f1", "support"],
          ((n, round(c["precision"], 6), round(c["recall"], 6), round(c["f1"], 6), c["support"])
           for n, c in metrics["per_class"].items()))
    write("history.csv", ["epoch", "train_loss", "val_accuracy"],
          ((h["epoch"], h["train_loss"], h.get("val_accuracy", "")) for h in history))


def write_outputs(metrics: dict, lin: dict, meta: dict, classes: list[str], mistakes: list[dict], *,
                  images_root: Path, report_dir: Path, metrics_path: Path, y_true, y_pred) -> None:
    history_path = report_dir.parent / "history.jsonl"
    headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "top_k_accuracy", "ece",
                                        "n_test")}
    entry = {"lineage": lin, "metrics": headline}
    comparison = compare(entry, read_history(history_path))
    metrics["comparison"] = comparison
    plots = {"confusion": er.confusion_png(metrics["confusion_matrix"], classes),
             "reliability": er.reliability_png(metrics["calibration"]),
             "history": er.history_png(meta.get("history", []))}
    gallery = [{**m, "uri": er.data_uri(er.thumbnail_png(images_root / m["path"]))} for m in mistakes]
    headline_cards = [(key, label.format(k=metrics["top_k"])) for key, label in HEADLINE]
    html = er.render_report(metrics=metrics, lineage=lin, comparison=comparison, headline=headline_cards,
                            plots={k: er.data_uri(v) for k, v in plots.items()}, gallery=gallery,
                            history=meta.get("history", []), history_path=str(history_path),
                            train_params_flat=flatten(lin["train_params"]))
    card = model_card(metrics, lin, classes)
    # Everything is written before anything is replaced: a full disk leaves the previous report,
    # its run copy, the headline and the history as they were (tasks.io.Staged).
    with Staged() as out:
        folder = out.folder(report_dir)
        for name, png in plots.items():
            if png:
                atomic_write_bytes(folder / f"{name}.png", png)
        _plot_data(folder, metrics, classes, y_true, y_pred, meta.get("history", []))
        atomic_write_json(folder / "metrics.json", metrics)
        atomic_write_json(folder / "lineage.json", lin)
        atomic_write_text(folder / "model_card.md", card)
        atomic_write_text(folder / "index.html", html)
        kept = out.folder(report_dir.parent / "runs" / lin["run"])  # reports/runs/<run>/ of each model
        for name in ("index.html", "model_card.md", "metrics.json", "lineage.json"):
            shutil.copyfile(folder / name, kept / name)
        out.file(metrics_path, _json_bytes(headline))
        out.file(history_path, with_run(history_path, entry).encode())


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def evaluate_detector(model_dir: Path, curate_dir: Path, *, report_dir: Path, metrics_path: Path,
                      num_threads: int = 2) -> dict:
    """A detection version: COCO-style mAP of the Faster R-CNN on the test tiles
    (tasks.detection.evaluate_detection), per-class AP and PR curves on an offline page,
    headline numbers into `metrics_path`."""
    from tasks.detection import evaluate_detection
    from tasks.detection_metrics import pr_curves_png
    from tasks.io import read_json
    from tasks.lineage import code_version

    torch.set_num_threads(num_threads)
    metrics = evaluate_detection(model_dir, curate_dir, "test")
    report_dir = Path(report_dir)
    png = pr_curves_png(metrics["pr_curves"])
    page = er.render("evaluate_detection.html.j2", m=metrics, pr_uri=er.data_uri(png), code=code_version(),
                     model_sha=read_json(Path(model_dir) / "model.json").get("model_sha256", ""))
    headline = {k: metrics[k] for k in ("map", "map_50", "n_images") if k in metrics}
    with Staged() as out:
        folder = out.folder(report_dir)
        if png:
            atomic_write_bytes(folder / "pr_curves.png", png)
        atomic_write_json(folder / "metrics.json", metrics)
        atomic_write_text(folder / "index.html", page)
        out.file(metrics_path, _json_bytes(headline))
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
