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
from pathlib import Path

import pandas as pd

from tasks.env import configure_environment

# Scalar sample fields written from the manifest; the FiftyOne field type by name.
SCALAR_FIELDS = {
    "split": "StringField",
    "sample_id": "StringField",
    "content_hash": "StringField",
    "excluded": "BooleanField",
    "exclusion_reason": "StringField",
}
REQUIRED_COLUMNS = ("path", "label", "tags", *SCALAR_FIELDS)
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class FiftyOneSyncError(RuntimeError):
    """FiftyOne's database or a dataset is not what the curate stage expects."""


def import_fiftyone():
    """Configure the environment, import FiftyOne, and check which database it reached."""
    configure_environment()
    import fiftyone as fo

    _check_database(fo)
    return fo


def _check_database(fo) -> None:
    """Refuse to write into a database other than FIFTYONE_DATABASE_DIR's.

    FiftyOne's bundled service attaches to any running FiftyOne mongod of this user,
    whatever its --dbpath, so with the App open on the project database a test run
    (or a run with another FIFTYONE_DATABASE_DIR) would silently write there.
    """
    if fo.config.database_uri:  # a server the user runs: where it lives is theirs to decide
        return
    from fiftyone.core.odm import get_db_client

    opts = get_db_client().admin.command("getCmdLineOpts")["parsed"]
    actual = opts.get("storage", {}).get("dbPath", "")
    wanted = fo.config.database_dir
    if os.path.realpath(actual) != os.path.realpath(wanted):
        raise FiftyOneSyncError(
            f"FiftyOne attached to a running database at {actual}, but FIFTYONE_DATABASE_DIR is "
            f"{wanted}: FiftyOne reuses any running FiftyOne mongod of this user. Stop the other "
            "process (see `pgrep -a mongod`) and retry."
        )
    # mongod >= 3.6 listens on localhost only unless given --bind_ip; FiftyOne passes none.
    bind = opts.get("net", {}).get("bindIp", "localhost")
    exposed = [ip for ip in bind.split(",") if ip.strip() not in LOOPBACK]
    if exposed:
        raise FiftyOneSyncError(f"FiftyOne's mongod listens on {bind}; expected loopback only")


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
    rows = pd.DataFrame({
        "filepath": [os.path.join(root, p) for p in manifest_df["path"]],
        "label": _missing_to_none(manifest_df["label"]),
        # The split is also a tag so the App's sidebar filters by it in one click.
        "tags": [[s, *t] for s, t in zip(manifest_df["split"], manifest_df["tags"])],
        **{f: _missing_to_none(manifest_df[f]) for f in SCALAR_FIELDS},
    }, dtype=object)
    rows["excluded"] = [bool(v) for v in rows["excluded"]]
    rows = rows.set_index("sample_id", drop=False)
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
    if all(f in schema for f in (*SCALAR_FIELDS, "ground_truth")):
        ids = dataset.values("sample_id")
        if len(ids) == len(rows) and set(ids) == set(rows.index):
            return dataset, False
    dataset.delete()
    return None, True


def _create(fo, name: str, rows: pd.DataFrame):
    # Persistent from the start: a load that dies half-way leaves a dataset whose ids do
    # not match, which the next run deletes and rebuilds.
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_sample_field("ground_truth", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    for field, kind in SCALAR_FIELDS.items():
        dataset.add_sample_field(field, getattr(fo, kind))
    columns = [rows[f].tolist() for f in SCALAR_FIELDS]
    samples = (
        fo.Sample(filepath=fp, tags=tags, ground_truth=fo.Classification(label=label),
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
    current = dataset.values(["id", "sample_id", "ground_truth.label", *fields])
    fo_ids, sample_ids, labels = current[0], current[1], current[2]
    want = rows.loc[sample_ids]
    changed = False
    for field, have in zip(fields, current[3:]):
        wanted = want[field].tolist()
        if field == "tags":
            # Keep tags a curator added in the App; only the stage's own tags are rewritten.
            wanted = [[t for t in h or [] if t not in managed_tags] + w for h, w in zip(have, wanted)]
        diff = {i: w for i, h, w in zip(fo_ids, have, wanted) if h != w}
        if diff:
            dataset.set_values(field, diff, key_field="id", progress=False)
            changed = True
    diff = {i: fo.Classification(label=w) for i, h, w in zip(fo_ids, labels, want["label"]) if h != w}
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
         saved_views: dict[str, str], managed_tags: set[str]) -> dict:
    """Make the persistent dataset `dataset_name` hold exactly the manifest's samples.

    Args:
        manifest_df: curated rows (see REQUIRED_COLUMNS); `path` relative to images_root.
        saved_views: view name -> sample tag it matches, saved on the dataset.
        managed_tags: tags the stage owns; others (a curator's) survive an update.
    Returns: {"dataset", "action" (created | rebuilt | updated | unchanged), "n_samples", "seconds"}.
    """
    start = time.perf_counter()
    fo = import_fiftyone()
    rows = expected_rows(manifest_df, images_root)
    dataset, deleted = _open_matching(fo, dataset_name, rows)
    if dataset is None:
        dataset = _create(fo, dataset_name, rows)
        action = "rebuilt" if deleted else "created"
    else:
        action = "updated" if _update(fo, dataset, rows, managed_tags) else "unchanged"
    _finish(dataset, classes, saved_views)
    return {"dataset": dataset_name, "action": action, "n_samples": len(dataset),
            "seconds": round(time.perf_counter() - start, 2)}


def serve_app(dataset_name: str, *, port: int, address: str) -> None:
    """Serve the FiftyOne App on `address:port` for one dataset until interrupted (Ctrl-C)."""
    fo = import_fiftyone()
    if dataset_name not in fo.list_datasets():
        known = [n for n in fo.list_datasets() if n.split("-")[0] == dataset_name.split("-")[0]]
        raise FiftyOneSyncError(f"no FiftyOne dataset {dataset_name!r} in {fo.config.database_dir}; "
                                f"run `python -m tasks.curate` first. Existing: {known or 'none'}")
    session = fo.launch_app(fo.load_dataset(dataset_name), remote=True, address=address, port=port)
    print(f"FiftyOne App for {dataset_name}: http://{address}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        # wait(-1): a remote App must outlive closed or reloaded browser tabs.
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
