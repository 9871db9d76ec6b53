"""FiftyOne side of stage curate: a curated manifest as a persistent FiftyOne dataset, and the App.

Generic on purpose: it loads rows (sample_id, path, label, split, content_hash, excluded,
exclusion_reason, tags) and saves tag views it is given; what counts as a duplicate or a
leak is decided in tasks.curate. `import fiftyone` happens only inside these functions,
after tasks.env.configure_environment(), so importing this module (as training processes
may, through tasks.curate) never loads FiftyOne or starts its database.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from tasks import fo_service
from tasks.params import DatabaseParams

# Scalar sample fields written from the manifest; the FiftyOne field type by name.
SCALAR_FIELDS = {
    "split": "StringField",
    "sample_id": "StringField",
    "content_hash": "StringField",
    "excluded": "BooleanField",
    "exclusion_reason": "StringField",
}
REQUIRED_COLUMNS = ("path", "label", "tags", *SCALAR_FIELDS)


class FiftyOneSyncError(RuntimeError):
    """FiftyOne's database or a dataset is not what the curate stage expects."""


def import_fiftyone(database: DatabaseParams):
    """FiftyOne, connected to the project's database service (or the user's MongoDB).

    Raises FiftyOneSyncError within `database.timeout_s` when the database is down.
    """
    try:
        return fo_service.connect(database)
    except fo_service.DatabaseUnavailable as e:
        raise FiftyOneSyncError(str(e)) from e


@contextmanager
def connected(database: DatabaseParams):
    """FiftyOne (as import_fiftyone); inside the block, a database that stops answering raises
    FiftyOneSyncError naming it and what to do, within about `database.timeout_s`."""
    fo = import_fiftyone(database)
    try:
        with fo_service.outage_errors(fo_service.spec_for(database)):
            yield fo
    except fo_service.DatabaseUnavailable as e:
        raise FiftyOneSyncError(str(e)) from e


def _missing_to_none(values) -> list:
    # Parquet nulls come back from pandas as NaN in str columns; FiftyOne wants None.
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]


def expected_rows(manifest_df: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """The sample fields to hold, one row per sample_id: absolute filepath, label, tags, scalars."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest_df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; need {list(REQUIRED_COLUMNS)} "
                         "(the output of tasks.curate.find_exclusions)")
    root = str(Path(images_root).resolve())
    # Detection: `boxes` holds each image's ((label, x, y, w, h) relative to the image), ...).
    labels = manifest_df["boxes"].tolist() if "boxes" in manifest_df else _missing_to_none(manifest_df["label"])
    rows = pd.DataFrame({
        "filepath": [os.path.join(root, p) for p in manifest_df["path"]],
        "label": labels,
        # The split is also a tag so the App's sidebar filters by it in one click.
        "tags": [[s, *t] for s, t in zip(manifest_df["split"], manifest_df["tags"])],
        **{f: _missing_to_none(manifest_df[f]) for f in SCALAR_FIELDS},
    }, dtype=object)
    rows["excluded"] = [bool(v) for v in rows["excluded"]]
    rows = rows.set_index("sample_id", drop=False)
    rows.attrs["detection"] = "boxes" in manifest_df
    if rows.index.has_duplicates or rows.index.hasnans:
        bad = rows.index[rows.index.duplicated()].unique().tolist()[:5]
        raise ValueError(f"manifest sample_id must be unique and non-null; repeated: {bad}")
    return rows


def _open_matching(fo, name: str, rows: pd.DataFrame):
    """The existing dataset if it holds exactly the expected sample_ids, else None.

    A dataset with other ids (a crash mid-load, a hand edit) is deleted: rebuilding is
    cheaper than reconciling, and deleting first means samples are never duplicated.
    Returns (dataset or None, whether one was deleted).
    """
    if name not in fo.list_datasets():
        return None, False
    dataset = fo.load_dataset(name)
    schema = dataset.get_field_schema()
    kind = "Detections" if rows.attrs.get("detection") else "Classification"
    same_kind = "ground_truth" in schema and getattr(schema["ground_truth"].document_type, "__name__", "") == kind
    if same_kind and all(f in schema for f in SCALAR_FIELDS):
        ids = dataset.values("sample_id")
        if len(ids) == len(rows) and set(ids) == set(rows.index):
            return dataset, False
    dataset.delete()
    return None, True


def _ground_truth(fo, label, detection: bool):
    if not detection:
        return fo.Classification(label=label)
    return fo.Detections(detections=[fo.Detection(label=c, bounding_box=[x, y, w, h]) for c, x, y, w, h in label])


def _signature(value, detection: bool):
    """What a ground_truth value says, comparable with expected_rows' `label`."""
    if value is None:
        return () if detection else None
    if not detection:
        return value.label
    return tuple((d.label, *(round(v, 6) for v in d.bounding_box)) for d in value.detections)


def _create(fo, name: str, rows: pd.DataFrame):
    # Persistent from the start: a load that dies half-way leaves a dataset whose ids do
    # not match, which the next run deletes and rebuilds.
    dataset = fo.Dataset(name, persistent=True)
    detection = rows.attrs.get("detection", False)
    dataset.add_sample_field("ground_truth", fo.EmbeddedDocumentField,
                             embedded_doc_type=fo.Detections if detection else fo.Classification)
    for field, kind in SCALAR_FIELDS.items():
        dataset.add_sample_field(field, getattr(fo, kind))
    columns = [rows[f].tolist() for f in SCALAR_FIELDS]
    samples = (
        fo.Sample(filepath=fp, tags=tags, ground_truth=_ground_truth(fo, label, detection),
                  **dict(zip(SCALAR_FIELDS, scalars)))
        for fp, label, tags, *scalars in zip(rows["filepath"], rows["label"], rows["tags"], *columns)
    )
    # The schema is declared above, so per-sample validation only costs time (about a
    # third of the load on 70k samples); one batched insert, never per-sample saves.
    dataset.add_samples(samples, expand_schema=False, validate=False, progress=False, num_samples=len(rows))
    return dataset


def _update(fo, dataset, rows: pd.DataFrame, managed_tags: set[str]) -> bool:
    """Set only the values that differ (batched, keyed by FiftyOne id); True if any did."""
    fields = ["filepath", "tags", *SCALAR_FIELDS]
    detection = rows.attrs.get("detection", False)
    # Classification reads only the label path: whole label objects cost 2x on 70k samples.
    gt = "ground_truth" if detection else "ground_truth.label"
    current = dataset.values(["id", "sample_id", gt, *fields])
    fo_ids, sample_ids = current[0], current[1]
    labels = [_signature(v, True) for v in current[2]] if detection else current[2]
    want = rows.loc[sample_ids]
    changed = False
    for field, have in zip(fields, current[3:]):
        wanted = want[field].tolist()
        if field == "tags":
            # Keep tags a curator added in the App; only the stage's own tags are rewritten.
            wanted = [w + [t for t in h or [] if t not in managed_tags and t not in w] for h, w in zip(have, wanted)]
            diff = {i: w for i, h, w in zip(fo_ids, have, wanted) if set(h or []) != set(w)}
        else:
            diff = {i: w for i, h, w in zip(fo_ids, have, wanted) if h != w}
        if diff:
            dataset.set_values(field, diff, key_field="id", progress=False)
            changed = True
    diff = {i: _ground_truth(fo, w, detection) for i, h, w in zip(fo_ids, labels, want["label"]) if h != w}
    if diff:
        dataset.set_values("ground_truth", diff, key_field="id", progress=False)
        changed = True
    return changed


def _finish(dataset, classes: list[str], saved_views: dict[str, str]) -> None:
    if dataset.default_classes != classes:
        dataset.default_classes = classes  # the setter saves
    for view_name, tag in saved_views.items():
        dataset.save_view(view_name, dataset.match_tags(tag), overwrite=True)
    if not dataset.persistent:
        dataset.persistent = True


def sync(manifest_df: pd.DataFrame, *, images_root: Path, dataset_name: str, classes: list[str],
         saved_views: dict[str, str], managed_tags: set[str], database: DatabaseParams,
         create_only: bool = False) -> dict:
    """Make the persistent dataset `dataset_name` hold exactly the manifest's samples.

    Args:
        manifest_df: curated rows (see REQUIRED_COLUMNS); `path` relative to images_root.
        saved_views: view name -> sample tag it matches, saved on the dataset.
        managed_tags: tags the stage owns; others (a curator's) survive an update.
        create_only: make sure the dataset holds these samples, but leave an existing
            matching one as it is (action "exists"); signals need samples before the
            final field values are known.
    Returns: {"dataset", "action" (created | rebuilt | updated | unchanged), "n_samples", "seconds"}.
    Raises FiftyOneSyncError, within about `database.timeout_s`, when the database is down or
    stops answering.
    """
    start = time.perf_counter()
    rows = expected_rows(manifest_df, images_root)
    with connected(database) as fo:
        dataset, deleted = _open_matching(fo, dataset_name, rows)
        if dataset is None:
            dataset = _create(fo, dataset_name, rows)
            action = "rebuilt" if deleted else "created"
        elif create_only:
            action = "exists"
        else:
            action = "updated" if _update(fo, dataset, rows, managed_tags) else "unchanged"
        _finish(dataset, classes, saved_views)
        n_samples = len(dataset)
    return {"dataset": dataset_name, "action": action, "n_samples": n_samples,
            "seconds": round(time.perf_counter() - start, 2)}
