"""Curation decisions: tags from the App (or rules) -> a curation file -> a new dataset version.

A decision is one row: sample_id, action (exclude | relabel), label (the new label for a
relabel), reason, source (`rule:<name>` or `curator:<who>`). Curators' decisions live in
`paths.curation/<version>.csv`, written from FiftyOne tags by `pixelops curate pull` and
tracked in git, so `dvc repro` reproduces a curation without the database. Rule decisions
are recomputed by the curate stage. Applying all of them to the parent version's manifest
gives the curated version: rows are marked excluded, never dropped; relabels keep the
original label in `label_original`.

Tags read from the App:
    exclude                 exclude the sample (reason: the tag; source: curator)
    relabel:<class>         relabel to <class>
    relabel                 relabel to the sample's `corrected_label` field (Classification or str)

Cells are written through tasks.safe_csv (a label or id starting with = + - @ gets a leading
quote, so a spreadsheet shows it as text) and `read_decisions` removes that quote again: a
class called `=SUM(1)` is written `'=SUM(1)` and read back as `=SUM(1)`.
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import io
from pathlib import Path

import pandas as pd

from tasks import safe_csv
from tasks.io import atomic_write_text

DECISION_COLUMNS = ("sample_id", "action", "label", "reason", "source")
ACTIONS = ("exclude", "relabel")
TAG_EXCLUDE = "exclude"
TAG_RELABEL = "relabel"
CORRECTED_FIELD = "corrected_label"


class CurationError(ValueError):
    """A decisions file or a tag that cannot be applied; the message names file, row and rule."""


def decisions_path(curation_dir: Path, version: str) -> Path:
    return Path(curation_dir) / f"{version}.csv"


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in DECISION_COLUMNS})


def read_decisions(path: Path, *, classes: list[str], sample_ids: set[str]) -> pd.DataFrame:
    """The curators' decisions in `path` (empty when absent), checked row by row."""
    path = Path(path)
    if not path.is_file():
        return empty()
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != DECISION_COLUMNS:
            raise CurationError(f"{path}: header must be {','.join(DECISION_COLUMNS)}, got {reader.fieldnames}")
        # Undo what to_csv's safe_csv.cell added, before any check sees the value.
        rows = [{k: safe_csv.restore(v) for k, v in r.items()} for r in reader]
    seen = set()
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        if row["sample_id"] not in sample_ids:
            raise CurationError(f"{where}: sample_id {row['sample_id']!r} is not in this dataset version")
        if row["action"] not in ACTIONS:
            raise CurationError(f"{where}: action {row['action']!r} is not one of {ACTIONS}")
        if row["action"] == "relabel" and row["label"] not in classes:
            raise CurationError(f"{where}: relabel to {row['label']!r}, which is not a class ({classes})")
        if (row["sample_id"], row["action"]) in seen:
            raise CurationError(f"{where}: a second {row['action']} decision for {row['sample_id']}")
        seen.add((row["sample_id"], row["action"]))
    df = pd.DataFrame(rows, columns=list(DECISION_COLUMNS)) if rows else empty()
    return df.replace({"": None})


def to_csv(decisions: pd.DataFrame) -> str:
    """The decisions as CSV text, sorted, string cells neutralized (tasks.safe_csv; read_decisions undoes it)."""
    buf = io.StringIO()
    ordered = decisions.sort_values(["sample_id", "action"]).reindex(columns=list(DECISION_COLUMNS))
    ordered.map(safe_csv.cell).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def write_decisions(path: Path, decisions: pd.DataFrame) -> None:
    atomic_write_text(path, to_csv(decisions))


def _corrected(value) -> str | None:
    if value is None:
        return None
    return getattr(value, "label", value)


def decisions_from_tags(dataset, *, classes: list[str], who: str | None = None) -> pd.DataFrame:
    """Curators' decisions from the dataset's tags (see the module doc), sorted by sample_id."""
    who = who or getpass.getuser()
    fields = ["sample_id", "tags"]
    has_corrected = CORRECTED_FIELD in dataset.get_field_schema()
    values = dataset.values(fields + ([CORRECTED_FIELD] if has_corrected else []))
    corrected = values[2] if has_corrected else [None] * len(values[0])
    rows = []
    for sid, tags, fixed in zip(values[0], values[1], corrected):
        tags = tags or []
        if TAG_EXCLUDE in tags:
            rows.append((sid, "exclude", None, "tagged exclude in FiftyOne", f"curator:{who}"))
        targets = [t.split(":", 1)[1] for t in tags if t.startswith(TAG_RELABEL + ":")]
        if TAG_RELABEL in tags or _corrected(fixed) is not None and not targets:
            if _corrected(fixed) is None:
                raise CurationError(f"sample {sid}: tagged {TAG_RELABEL!r} without a {CORRECTED_FIELD} "
                                    f"field; tag it relabel:<class> instead")
            targets.append(_corrected(fixed))
        if len(set(targets)) > 1:
            raise CurationError(f"sample {sid}: conflicting relabels {sorted(set(targets))}")
        if targets:
            if targets[0] not in classes:
                raise CurationError(f"sample {sid}: relabel to {targets[0]!r}, which is not a class ({classes})")
            rows.append((sid, "relabel", targets[0], "relabeled in FiftyOne", f"curator:{who}"))
    return pd.DataFrame(rows, columns=list(DECISION_COLUMNS)) if rows else empty()


def apply(curated: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """The manifest with decisions applied: excluded/exclusion_reason and label (+ label_original).

    A curator's exclusion does not override a rule's reason already set; the test split
    is excluded only by a curator, never by a rule (rules never see it).
    """
    out = curated.copy()
    out["label_original"] = None
    index = {sid: i for i, sid in enumerate(out["sample_id"])}
    for row in decisions.itertuples(index=False):
        i = out.index[index[row.sample_id]]
        if row.action == "exclude" and not out.at[i, "excluded"]:
            out.at[i, "excluded"] = True
            out.at[i, "exclusion_reason"] = f"{row.source}: {row.reason}"
        elif row.action == "relabel" and out.at[i, "label"] != row.label:
            out.at[i, "label_original"] = out.at[i, "label"]
            out.at[i, "label"] = row.label
    return out


def curated_version(parent: str, decisions: pd.DataFrame, rules: dict) -> tuple[str, str]:
    """(id, curation sha256): the new version is named by its parent and what was applied."""
    digest = hashlib.sha256((parent + "\n" + repr(sorted(rules.items())) + "\n" + to_csv(decisions)).encode())
    curation_sha = digest.hexdigest()
    return "c" + curation_sha[:12], curation_sha
