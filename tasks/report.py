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
    full = reports / "evaluate" / "metrics.json"
    evaluation = read_json(full) if full.is_file() else {}
    model = read_json(data / "train" / "model.json") if (data / "train" / "model.json").is_file() else {}
    curation = read_json(data / "curate" / "curation.json") if (data / "curate" / "curation.json").is_file() else {}
    review = read_json(data / "review" / "review.json") if (data / "review" / "review.json").is_file() else {}
    export = read_json(data / "export" / "export.json") if (data / "export" / "export.json").is_file() else {}
    return {
        "version": version.get("version", "(not ingested)"),
        "n_images": version.get("n_images"),
        "n_quarantined": version.get("n_quarantined"),
        "metrics": metrics,
        "model": model.get("spec", {}).get("arch"),
        "report": reports / "evaluate" / "index.html",
        "model_card": reports / "evaluate" / "model_card.md",
        "evaluation": evaluation,
        "curation": curation,
        "review": review,
        "export": export,
        "export_dir": data / "export",
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
    if f["model_card"].is_file():
        lines.append(f"model card      : {f['model_card'].resolve()}")
    ex = f["export"]
    if ex.get("artifacts"):
        q = ex.get("int8") or {}
        int8 = f", int8 accuracy {q['accuracy_delta']:+.4f}" if q else ""
        lines.append(f"export          : {', '.join(ex['artifacts'])}{int8} → {f['export_dir'].resolve()}")
    return "\n".join(lines)


def _ci(evaluation: dict, name: str) -> str:
    ci = evaluation.get("intervals", {}).get(name)
    return f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def summary_markdown(root: Path | str = ".") -> str:
    """The flow run's summary artifact: headline numbers with intervals, lineage, what changed."""
    f = _facts(root)
    m, ev = f["metrics"], f["evaluation"]
    rows = [f"| dataset version | `{f['version']}` |", f"| images | {f['n_images']} |"]
    if m.get("accuracy") is not None:
        rows += [f"| test accuracy | {m['accuracy']:.4f}{_ci(ev, 'accuracy')} |",
                 f"| macro F1 | {m['macro_f1']:.4f}{_ci(ev, 'macro_f1')} |",
                 f"| test images | {m['n_test']} |"]
        if m.get("ece") is not None:
            rows.append(f"| calibration error (ECE) | {m['ece']:.4f} |")
    elif m.get("map") is not None:
        rows += [f"| test mAP@[.50:.95] | {m['map']:.4f} |", f"| test mAP@.50 | {m['map_50']:.4f} |"]
    cmp = ev.get("comparison")
    if cmp:
        delta = cmp["metrics"].get("accuracy", {}).get("delta")
        changed = ", ".join(f"`{k}`" for k in cmp["params_changed"]) or "none"
        rows += [f"| previous run | `{cmp['previous_run']}` |",
                 f"| data changed | {'yes' if cmp['data']['changed'] else 'no'} |",
                 f"| params changed | {changed} |"]
        if delta is not None:
            rows.append(f"| accuracy change | {delta:+.4f} |")
    rows.append(f"| report | `{f['report'].resolve()}` |")
    if f["model_card"].is_file():
        rows.append(f"| model card | `{f['model_card'].resolve()}` |")
    return "# PixelOps run\n\n| | |\n|---|---|\n" + "\n".join(rows) + "\n"


def per_class_table(root: Path | str = ".") -> list[dict]:
    """Rows of the per-class table artifact: the evaluation's per-class scores (classification)
    or per-class AP (detection); empty before any evaluation."""
    ev = _facts(root)["evaluation"]
    if "per_class" in ev:
        return [{"class": name, "precision": round(c["precision"], 4), "recall": round(c["recall"], 4),
                 "f1": round(c["f1"], 4), "support": c["support"]} for name, c in ev["per_class"].items()]
    return [{"class": name, "ap": ap} for name, ap in ev.get("per_class_ap", {}).items()]


def report_uri(root: Path | str = ".") -> str | None:
    """file:// URI of the evaluation page, for the flow run's link artifact; None before evaluate."""
    page = _facts(root)["report"]
    return page.resolve().as_uri() if page.is_file() else None
