"""Stage curate: mark exact duplicates and train/test leakage; load the version into FiftyOne.

Inputs:  data/ingest/ (`paths.data`/ingest): manifest.parquet, classes.json, version.json.
Outputs: data/curate/ (`paths.data`/curate)
    manifest.parquet   the ingest manifest plus `excluded` (bool) and `exclusion_reason`
                       (null when kept); `path` stays relative to the ingest folder
    curation.json      version, images_root (the ingest folder), counts, FiftyOne dataset name
    and, with `curate.fiftyone`, the persistent FiftyOne dataset `{dataset_prefix}-{version}`
    (tags: split, duplicate, leak; saved views duplicates, leaky).
Params:  `curate:` section.

Rows are marked, never dropped: training skips `excluded` rows, and the App shows why.
The test split is never modified, so a test set stays comparable across curation settings.

    python -m tasks.curate [-S-style overrides: curate.fiftyone=false]
    python -m tasks.curate app [--port 5151] [--version vXXXXXXXXXXXX]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tasks import curate_fiftyone
from tasks.io import MANIFEST_SCHEMA, atomic_write_json, load_table, read_json, save_table
from tasks.params import CurateParams, Params, ParamsError, load_params

HELD_OUT = "test"  # the split that is never modified and that others must not leak into
TAG_DUPLICATE = "duplicate"
TAG_LEAK = "leak"
LEAK_REASON = f"leak:{HELD_OUT}"
DUPLICATE_PREFIX = "duplicate-of:"
SAVED_VIEWS = {"duplicates": TAG_DUPLICATE, "leaky": TAG_LEAK}
CURATED_SCHEMA = MANIFEST_SCHEMA.append(pa.field("excluded", pa.bool_())).append(
    pa.field("exclusion_reason", pa.string())
)


class CurateError(ValueError):
    """The curate stage's inputs are missing or malformed."""


@dataclass(frozen=True)
class CurateResult:
    version: str
    dataset_name: str | None
    n_samples: int
    n_excluded: int
    reasons: dict[str, int]  # reason kind (duplicate, leak) -> rows excluded for it
    manifest: str
    fiftyone: dict | None = field(default=None, compare=False)  # sync report (action, seconds)


# --------------------------------------------------------------------------- pure logic


def _check_manifest(df: pd.DataFrame) -> None:
    missing = [c for c in ("sample_id", "content_hash", "split") if c not in df.columns]
    if missing:
        raise CurateError(f"manifest lacks columns {missing}; expected the schema in tasks.io")
    for col in ("sample_id", "content_hash", "split"):
        if df[col].isna().any():
            raise CurateError(f"manifest column {col!r} has {int(df[col].isna().sum())} nulls")
    repeated = df.loc[df["sample_id"].duplicated(), "sample_id"]
    if len(repeated):
        raise CurateError(f"manifest sample_id must be unique; repeated: {repeated.unique().tolist()[:5]}")


def find_exclusions(manifest: pa.Table | pd.DataFrame, *, exclude_duplicates: bool,
                    exclude_leakage: bool) -> pd.DataFrame:
    """Mark exact duplicates within a split and train/val copies of test images.

    Args:
        manifest: ingest manifest (sample_id, content_hash, split, ...), table or DataFrame.
        exclude_duplicates: exclude all but the first copy (by sample_id) of a content_hash
            within a split, reason `duplicate-of:<kept sample_id>`.
        exclude_leakage: exclude train/val rows whose content_hash occurs in test,
            reason `leak:test` (wins over a duplicate reason: every copy leaks).
    Returns: the manifest (same row order) plus `excluded`, `exclusion_reason` (None when kept)
        and `tags`: facts found (duplicate, leak) whether or not they were excluded; test
        rows may be tagged but are never excluded.
    """
    df = manifest.to_pandas() if isinstance(manifest, pa.Table) else manifest.reset_index(drop=True)
    df = df.copy()
    _check_manifest(df)
    # "First" follows sample_id, not row order, so the kept copy is the same however rows
    # were produced; the Series aligns back onto df's index.
    first = df.sort_values("sample_id").groupby(["split", "content_hash"])["sample_id"].transform("first")
    first = first.reindex(df.index)
    is_duplicate = df["sample_id"] != first
    not_held_out = df["split"] != HELD_OUT
    held_out_hashes = df.loc[~not_held_out, "content_hash"].unique()
    is_leak = not_held_out & df["content_hash"].isin(held_out_hashes)

    reason = pd.Series([None] * len(df), index=df.index, dtype=object)
    if exclude_duplicates:
        mark = is_duplicate & not_held_out
        reason[mark] = [DUPLICATE_PREFIX + s for s in first[mark]]
    if exclude_leakage:
        reason[is_leak] = LEAK_REASON
    df["excluded"] = reason.notna()
    df["exclusion_reason"] = reason
    df["tags"] = [[t for t, on in ((TAG_DUPLICATE, d), (TAG_LEAK, k)) if on]
                  for d, k in zip(is_duplicate, is_leak)]
    return df


def reason_counts(curated: pd.DataFrame) -> dict[str, int]:
    """Excluded rows per reason kind: {"duplicate": n, "leak": m}."""
    counts = {TAG_DUPLICATE: 0, TAG_LEAK: 0}
    for reason in curated["exclusion_reason"].dropna():
        kind = TAG_DUPLICATE if reason.startswith(DUPLICATE_PREFIX) else reason.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def dataset_name(prefix: str, version: str) -> str:
    return f"{prefix}-{version}"


# --------------------------------------------------------------------------- FiftyOne


def sync_fiftyone(manifest_df: pd.DataFrame, *, images_root: Path, dataset_name: str,
                  classes: list[str]) -> dict:
    """Load curated rows into the persistent FiftyOne dataset `dataset_name`, idempotently.

    Fields: absolute filepath, ground_truth (Classification), split (also a tag), sample_id,
    content_hash, excluded, exclusion_reason; tags duplicate/leak; saved views duplicates
    and leaky. An existing dataset with exactly these sample_ids is updated in place (or
    left alone when identical); any other is deleted and rebuilt. No retries here.
    Returns: {"dataset", "action" (created | rebuilt | updated | unchanged), "n_samples", "seconds"}.
    """
    managed = {TAG_DUPLICATE, TAG_LEAK, *manifest_df["split"].unique()}
    return curate_fiftyone.sync(manifest_df, images_root=images_root, dataset_name=dataset_name,
                                classes=classes, saved_views=SAVED_VIEWS, managed_tags=managed)


# --------------------------------------------------------------------------- the stage


def _read_input(path: Path, reader):
    if not path.is_file():
        raise CurateError(f"{path}: not found; run the ingest stage first (python -m tasks.ingest)")
    return reader(path)


def curate(ingest_dir: Path, *, params: CurateParams, out_dir: Path) -> CurateResult:
    """Curate the dataset version in `ingest_dir` into `out_dir` (files replaced atomically).

    FiftyOne is synced before the outputs are written, so a finished curation.json means
    the dataset exists. Raises CurateError for missing or malformed inputs.
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    manifest = _read_input(ingest_dir / "manifest.parquet", load_table)
    classes = _read_input(ingest_dir / "classes.json", read_json)
    version = _read_input(ingest_dir / "version.json", read_json)["version"]

    curated = find_exclusions(manifest, exclude_duplicates=params.exclude_duplicates,
                              exclude_leakage=params.exclude_leakage)
    name, report = None, None
    if params.fiftyone:
        name = dataset_name(params.dataset_prefix, version)
        report = sync_fiftyone(curated, images_root=ingest_dir, dataset_name=name, classes=classes)

    table = pa.Table.from_pandas(curated.drop(columns="tags"), schema=CURATED_SCHEMA, preserve_index=False)
    save_table(table, out_dir / "manifest.parquet")
    reasons = reason_counts(curated)
    n_excluded = int(curated["excluded"].sum())
    kept = curated.loc[~curated["excluded"], "split"].value_counts()
    atomic_write_json(out_dir / "curation.json", {
        "version": version,
        "images_root": str(ingest_dir),
        "n_samples": len(curated),
        "n_excluded": n_excluded,
        "reasons": reasons,
        "kept_per_split": {s: int(n) for s, n in sorted(kept.items())},
        "exclude_duplicates": params.exclude_duplicates,
        "exclude_leakage": params.exclude_leakage,
        "dataset_name": name,
    })
    return CurateResult(version=version, dataset_name=name, n_samples=len(curated), n_excluded=n_excluded,
                        reasons=reasons, manifest=str(out_dir / "manifest.parquet"), fiftyone=report)


def run(params: Params) -> CurateResult:
    """Run the stage from a loaded `Params` (the door used by dvc, flows and the CLI)."""
    data = Path(params.paths.data)
    return curate(data / "ingest", params=params.curate, out_dir=data / "curate")


def launch_app(version: str | None = None, *, port: int = 5151, address: str = "127.0.0.1",
               params: Params | None = None) -> None:
    """Serve the FiftyOne App for a version's dataset (default: data/ingest's) until Ctrl-C."""
    params = params or load_params()
    if version is None:
        version = _read_input(Path(params.paths.data) / "ingest" / "version.json", read_json)["version"]
    name = dataset_name(params.curate.dataset_prefix, version)
    curate_fiftyone.serve_app(name, port=port, address=address)


def _parse_app_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.curate app",
                                     description="Open the FiftyOne App on a dataset version (loopback only).")
    parser.add_argument("--port", type=int, default=5151)
    parser.add_argument("--version", default=None, help="dataset version (default: data/ingest/version.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment

    configure_environment()
    argv = list(argv or [])
    try:
        if argv[:1] == ["app"]:
            args = _parse_app_args(argv[1:])
            launch_app(args.version, port=args.port)
            return 0
        result = run(load_params(overrides=argv))
    except (CurateError, ParamsError, curate_fiftyone.FiftyOneSyncError) as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2
    sync = result.fiftyone
    where = f"FiftyOne {result.dataset_name} ({sync['action']}, {sync['seconds']} s)" if sync else "FiftyOne off"
    print(f"curated {result.version}: {result.n_samples} samples, {result.n_excluded} excluded "
          f"{result.reasons}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
