"""What a reported model was made from, and what changed since the previous evaluated run.

lineage(): dataset and curated version, curation applied, the model file's hash and recipe,
the code version (git), all read from the outputs the stages wrote.
History: reports/history.jsonl keeps one line per evaluated run (the newest evaluation of it) (a DVC output with
`persist: true`, so `dvc repro` keeps it); compare() diffs the current run against the newest
earlier line of another run: data version, params that changed, metric deltas.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from tasks.io import read_json

HEADLINE = ("accuracy", "macro_f1", "balanced_accuracy", "top_k_accuracy", "ece")


def code_version(root: Path | str = ".") -> str:
    """`git describe --always --dirty` of the project, or "unknown" outside a git work tree."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], check=False, cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def lineage(model_meta: dict, curate_dir: Path, *, n_test: int, root: Path | str = ".") -> dict:
    curation = read_json(Path(curate_dir) / "curation.json")
    spec = model_meta["spec"]
    return {
        "run": f"{model_meta['dataset_version']}-{model_meta.get('model_sha256', '')[:10]}",
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset_version": model_meta["dataset_version"],
        "curated_version": curation.get("curated_version"),
        "curation": {k: curation.get(k) for k in ("n_excluded", "reasons", "n_relabeled", "kept_per_split",
                                                   "rules")},
        "counts": {"train": model_meta.get("n_train"), "val": model_meta.get("n_val"), "test": n_test},
        "model_sha256": model_meta.get("model_sha256"),
        "model": {"arch": spec["arch"], "weights": spec.get("weights") or "from scratch",
                  "image_size": spec["image_size"], "n_classes": spec["n_classes"],
                  "finetune": model_meta.get("finetune"), "parameters": model_meta.get("parameters")},
        "train_params": model_meta.get("train_params") or {},
        "tuned_from": model_meta.get("tuned_from"),
        "code_version": code_version(root),
    }


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} → {'a.b': 1}"""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_history(path: Path) -> list[dict]:
    """The history lines; a line that is not JSON (a crash mid-append) is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def compare(current: dict, history: list[dict]) -> dict | None:
    """The current run against the newest earlier entry of a different run, or None."""
    previous = next((h for h in reversed(history) if h["lineage"]["run"] != current["lineage"]["run"]), None)
    if previous is None:
        return None
    old, new = previous["lineage"], current["lineage"]
    p_old, p_new = flatten(old.get("train_params", {})), flatten(new.get("train_params", {}))
    changed = {k: [p_old.get(k), p_new.get(k)] for k in sorted(set(p_old) | set(p_new))
               if p_old.get(k) != p_new.get(k)}
    metrics = {}
    for k in HEADLINE:
        a, b = previous["metrics"].get(k), current["metrics"].get(k)
        if a is not None and b is not None:
            metrics[k] = {"previous": a, "current": b, "delta": b - a}
    return {
        "previous_run": old["run"], "previous_evaluated_at": old.get("evaluated_at"),
        "data": {"previous": old["dataset_version"], "current": new["dataset_version"],
                 "changed": old["dataset_version"] != new["dataset_version"]
                 or old.get("curated_version") != new.get("curated_version"),
                 "previous_curated": old.get("curated_version"), "current_curated": new.get("curated_version")},
        "code": {"previous": old.get("code_version"), "current": new.get("code_version")},
        "params_changed": changed,
        "metrics": metrics,
    }


def with_run(path: Path, entry: dict) -> str:
    """The history file's text with `entry` as the newest line, earlier lines of the same run dropped."""
    run = entry["lineage"]["run"]
    lines = [json.dumps(h, sort_keys=True) for h in read_history(path) if h["lineage"]["run"] != run]
    lines.append(json.dumps(entry, sort_keys=True))
    return "\n".join(lines) + "\n"
