"""A model card (markdown) built from the run's lineage and measured results only.

Sections after Mitchell et al., "Model Cards for Model Reporting": model details, data,
training recipe, metrics with intervals, per-class weaknesses, intended use, limitations.
Every number comes from the evaluate stage's metrics and the train stage's model.json.
"""

from __future__ import annotations

import numpy as np

# What could turn data into markup or break a table row: raw HTML, entities, links, code, emphasis
# (* _ ~), math ($: GitHub renders it), cells; a line ending (\r counts as one in CommonMark) would
# end the row or list item.
_MD_SPECIAL = str.maketrans({**{c: "\\" + c for c in "\\`*_~[]<>|&$"}, "\n": " ", "\r": " "})


def md(text: object) -> str:
    """Text safe inside markdown (and its tables): class names are data, not markup."""
    return str(text).translate(_MD_SPECIAL)


def _fmt_ci(metrics: dict, name: str) -> str:
    value = metrics[name]
    ci = metrics.get("intervals", {}).get(name)
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def top_confusions(cm: list[list[int]], classes: list[str], n: int = 5) -> list[tuple[str, str, int, float]]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    arr = np.asarray(cm)
    off = arr.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    out = []
    for flat in order:
        i, j = divmod(int(flat), len(classes))
        if off[i, j] == 0:
            break
        out.append((classes[i], classes[j], int(off[i, j]), float(off[i, j] / max(1, arr[i].sum()))))
    return out


def model_card(metrics: dict, lineage: dict, classes: list[str]) -> str:
    m, lin, model = metrics, lineage, lineage["model"]
    tp = lin.get("train_params", {})
    counts = lin["counts"]
    ci = m.get("intervals_level")
    lines = [
        f"# Model card: {md(model['arch'])} on dataset version {md(lin['dataset_version'])}",
        "",
        f"Run `{lin['run']}`, evaluated {lin['evaluated_at']}, code `{lin['code_version']}`.",
        "",
        "## Model details",
        f"- Architecture: {md(model['arch'])}, {model['n_classes']} classes, input {model['image_size']} px.",
        f"- Initialised from: {md(model['weights'])}; fine-tuning: {md(model.get('finetune'))}.",
        (f"- Parameters: {(model.get('parameters') or {}).get('total', 'n/a')} total, "
        f"{(model.get('parameters') or {}).get('trainable', 'n/a')} trained."),
        f"- Weights file sha256: `{lin['model_sha256']}`.",
        "",
        "## Data",
        f"- Dataset version **{md(lin['dataset_version'])}**, curated version {md(lin.get('curated_version'))}.",
        f"- Images: {counts.get('train')} train, {counts.get('val')} validation, {counts.get('test')} test.",
    ]
    cur = lin.get("curation") or {}
    if cur.get("n_excluded") is not None:
        lines.append(f"- Curation excluded {cur['n_excluded']} samples ({md(cur.get('reasons'))}) and "
                     f"relabeled {cur.get('n_relabeled', 0)}.")
    lines += ["", "## Training recipe"]
    keys = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "label_smoothing", "finetune", "seed")
    lines += [f"- {k}: {md(tp[k])}" for k in keys if k in tp] or [("- not recorded in model.json (trained by "
                                                                   "an older version of the train stage)")]
    if tp.get("augment"):
        lines.append(f"- augment: {md(tp['augment'])}")
    if lin.get("tuned_from"):
        lines.append(f"- Hyperparameters from the Optuna sweep: {md(lin['tuned_from'])}.")
    lines += ["", "## Metrics on the test split",
              f"Intervals: {int(100 * ci)}% percentile bootstrap over test images." if ci else "",
              "", "| metric | value |", "|---|---|",
              f"| accuracy | {_fmt_ci(m, 'accuracy')} |",
              f"| balanced accuracy | {_fmt_ci(m, 'balanced_accuracy')} |",
              f"| macro F1 | {_fmt_ci(m, 'macro_f1')} |"]
    if "top_k_accuracy" in m:
        lines.append(f"| top-{m['top_k']} accuracy | {m['top_k_accuracy']:.4f} |")
    if "calibration" in m:
        lines.append(f"| expected calibration error | {m['calibration']['ece']:.4f} |")
    worst = sorted(m["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
    lines += ["", "## Per-class weaknesses", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {md(name)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
              for name, c in worst]
    conf = top_confusions(m["confusion_matrix"], classes)
    if conf:
        lines += ["", "Most frequent confusions (true → predicted):", ""]
        lines += [f"- {md(t)} → {md(p)}: {n} images ({100 * s:.1f}% of {md(t)})" for t, p, n, s in conf]
    lines += [
        "", "## Intended use",
        (f"Classifying images like those of dataset version {md(lin['dataset_version'])} into its "
        f"{model['n_classes']} classes ({', '.join(md(c) for c in classes)}), at {model['image_size']} px."),
        "", "## Limitations",
        ("- Measured on the test split of the same collection: images from other sources, cameras or "
        "preprocessing may score lower."),
        "- The classes above are the only outputs; an image of anything else still gets one of them.",
        "- The weakest classes and confusions listed above are where errors concentrate.",
    ]
    if "calibration" in m:
        lines.append(f"- Confidence scores are off by {m['calibration']['ece']:.3f} on average (ECE); "
                     "do not read them as probabilities without checking the reliability diagram.")
    return "\n".join(lines) + "\n"
