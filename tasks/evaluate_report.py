"""The evaluation report: plots as PNG bytes, mistake thumbnails, and one self-contained HTML page.

Every plot and thumbnail is embedded as a data: URI and the page loads nothing else, so it
renders offline and can be mailed as one file. Jinja autoescaping is on: class names, paths
and params are data, and a class called `<script>` shows as text.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from tasks.gate import load_canonical


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def confusion_png(cm: list[list[int]], classes: list[str]) -> bytes:
    """Counts beside the row-normalized matrix (each true class's recall on the diagonal)."""
    plt = _plt()
    arr = np.asarray(cm)
    norm = arr / np.maximum(arr.sum(1, keepdims=True), 1)
    k = len(classes)
    # Class names are data: matplotlib reads text between two $ as math (a class named $\bad$
    # fails the stage); an escaped \$ is drawn as a plain $.
    classes = [str(c).replace("$", r"\$") for c in classes]
    side = max(5.0, 0.45 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), dpi=90)
    for ax, values, title in ((axes[0], arr, "counts"), (axes[1], norm, "row-normalized")):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 25:  # beyond that the numbers are unreadable; the colours still tell
            for i in range(k):
                for j in range(k):
                    text = str(values[i, j]) if values is arr else f"{values[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _png(fig)


def reliability_png(cal: dict) -> bytes:
    """Accuracy against mean confidence per bin, with the share of samples per bin below."""
    plt = _plt()
    bins = cal["bins"]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 5.5), dpi=90, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="#888", label="perfect calibration")
    acc = [b.get("accuracy", 0.0) for b in bins]
    ax.bar(centers, acc, width=width * 0.95, color="#4c78a8", label="accuracy in bin")
    filled = [b for b in bins if b["count"]]
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="#e45756",
            ms=3, label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {cal['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=7)
    total = max(1, sum(b["count"] for b in bins))
    axc.bar(centers, [b["count"] / total for b in bins], width=width * 0.95, color="#72b7b2")
    axc.set_ylabel("share")
    axc.set_xlabel("top-1 confidence")
    axc.set_xlim(0, 1)
    fig.tight_layout()
    return _png(fig)


def history_png(history: list[dict]) -> bytes | None:
    """Train loss and val accuracy per epoch, or None without a history."""
    if not history:
        return None
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="#4c78a8", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    val = [(h["epoch"], h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "s-", color="#f58518", label="val accuracy")
        ax2.set_ylabel("val accuracy")
    fig.tight_layout()
    return _png(fig)


def thumbnail_png(path: Path, size: int = 96) -> bytes:
    """The image as the gate decodes it, scaled to `size` px on its long side (nearest for small ones)."""
    from PIL import Image

    img = load_canonical(Path(path).read_bytes(), mode="RGB")
    scale = size / max(img.size)
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else ""


def render(template: str, **context) -> str:
    """The page from the Jinja template `template` beside this module (evaluate_report.html.j2,
    evaluate_detection.html.j2). Autoescaped: every value in `context` is text, never markup."""
    from jinja2 import Environment, StrictUndefined

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.2f}%"
    env.filters["signed"] = lambda v: "" if v is None else f"{v:+.4f}"
    return env.from_string(Path(__file__).with_name(template).read_text()).render(**context)


def render_report(**context) -> str:
    """The classification page; `context` holds metrics, lineage, comparison, plots (data URIs)
    and the gallery."""
    return render("evaluate_report.html.j2", **context)
