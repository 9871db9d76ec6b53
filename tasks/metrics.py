"""Classification metrics from labels and predicted probabilities: plain numpy, no plotting.

Conventions (those of scikit-learn, which the tests check against hand-computed values):
- a class never predicted has precision 0, a class absent from the labels recall 0;
  macro averages and balanced accuracy run over the classes present in the labels;
- expected calibration error uses `bins` equal-width bins of the top-1 probability,
  bin i holding confidences in (i/bins, (i+1)/bins], the first also holding 0;
- bootstrap intervals are percentile intervals over test-set resamples with replacement,
  seeded, so the same predictions always give the same interval.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """k×k counts, rows true, columns predicted."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    k = len(cm)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return precision, recall, f1, support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro F1, balanced accuracy, per-class precision/recall/F1/support, the
    confusion matrix as counts and row-normalized (each true class's row sums to 1)."""
    cm = confusion_matrix(y_true, y_pred, len(classes))
    precision, recall, f1, support = _per_class(cm)
    present = support > 0
    return {
        "accuracy": float(np.trace(cm) / max(1, cm.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": (cm / np.maximum(cm.sum(1, keepdims=True), 1)).round(6).tolist(),
    }


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the k highest scores (ties: lower index first)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(1).mean())


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int) -> dict:
    """Expected and maximum calibration error of the top-1 probability, and the reliability bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    # (i/bins, (i+1)/bins]: ceil puts a confidence exactly on an edge in the lower bin
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    n = len(conf)
    out, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        mask = idx == b
        count = int(mask.sum())
        entry = {"lo": b / bins, "hi": (b + 1) / bins, "count": count}
        if count:
            acc, mean_conf = float(correct[mask].mean()), float(conf[mask].mean())
            gap = abs(acc - mean_conf)
            ece += count / n * gap
            mce = max(mce, gap)
            entry.update(accuracy=acc, confidence=mean_conf)
        out.append(entry)
    return {"ece": float(ece), "mce": float(mce), "bins": out}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, k: int, *, n: int, ci: float,
                        seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals of accuracy, macro F1 and balanced accuracy over `n` resamples."""
    if n <= 0 or len(y_true) == 0:
        return {}
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    stats = {"accuracy": [], "macro_f1": [], "balanced_accuracy": []}
    codes = y_true * k + y_pred
    for start in range(0, n, 100):  # chunks keep the index matrix small (100 × N)
        draws = rng.integers(0, len(codes), size=(min(100, n - start), len(codes)))
        for row in draws:
            cm = np.bincount(codes[row], minlength=k * k).reshape(k, k)
            _, recall, f1, support = _per_class(cm)
            present = support > 0
            stats["accuracy"].append(np.trace(cm) / cm.sum())
            stats["macro_f1"].append(f1[present].mean())
            stats["balanced_accuracy"].append(recall[present].mean())
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    return {name: [float(v) for v in np.percentile(values, q)] for name, values in stats.items()}


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int) -> list[int]:
    """Indices of the `n` wrong predictions made with the highest confidence, most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != np.asarray(y_true))
    order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:n]]
