"""The run summary printed at the end of a pipeline run and published as a Prefect artifact.

Reads only finished outputs: the dataset version, the headline metrics and the report path.
"""

from __future__ import annotations

from pathlib import Path

from tasks.io import read_json
from tasks.params import load_params


def _facts(root: Path | str) -> dict:
    root = Path(root)
    params = load_params(root / "params.yaml")
    data, reports = root / params.paths.data, root / params.paths.reports
    version = read_json(data / "ingest" / "version.json") if (data / "ingest" / "version.json").is_file() else {}
    metrics = read_json(reports / "metrics.json") if (reports / "metrics.json").is_file() else {}
    model = read_json(data / "train" / "model.json") if (data / "train" / "model.json").is_file() else {}
    curation = read_json(data / "curate" / "curation.json") if (data / "curate" / "curation.json").is_file() else {}
    review = read_json(data / "review" / "review.json") if (data / "review" / "review.json").is_file() else {}
    return {
        "version": version.get("version", "(not ingested)"),
        "n_images": version.get("n_images"),
        "n_quarantined": version.get("n_quarantined"),
        "metrics": metrics,
        "model": model.get("spec", {}).get("arch"),
        "report": reports / "evaluate" / "index.html",
        "curation": curation,
        "review": review,
    }


def summary_text(root: Path | str = ".") -> str:
    f = _facts(root)
    m = f["metrics"]
    lines = [f"dataset version : {f['version']} ({f['n_images']} images, {f['n_quarantined']} quarantined)"]
    c = f["curation"]
    if c.get("curated_version"):
        lines.append(f"curated version : {c['curated_version']} ({c['n_excluded']} excluded {c['reasons']}, "
                     f"{c.get('n_relabeled', 0)} relabeled)")
    if c.get("dataset_name"):
        views = "near-duplicates, leaky, likely-mislabeled" if f["review"] else "near-duplicates, leaky"
        lines.append(f"FiftyOne        : {c['dataset_name']} (views {views}; `pixelops app`)")
    if m:
        lines.append(f"test accuracy   : {m['accuracy']:.4f}   macro F1: {m['macro_f1']:.4f}   "
                     f"({m['n_test']} test images, model {f['model']})")
    lines.append(f"report          : {f['report'].resolve()}")
    return "\n".join(lines)


def summary_markdown(root: Path | str = ".") -> str:
    f = _facts(root)
    m = f["metrics"]
    rows = [f"| dataset version | `{f['version']}` |", f"| images | {f['n_images']} |"]
    if m:
        rows += [f"| test accuracy | {m['accuracy']:.4f} |", f"| macro F1 | {m['macro_f1']:.4f} |",
                 f"| test images | {m['n_test']} |"]
    rows.append(f"| report | `{f['report'].resolve()}` |")
    return "# PixelOps run\n\n| | |\n|---|---|\n" + "\n".join(rows) + "\n"
