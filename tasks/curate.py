"""Stage curate: rules and curators' decisions applied to a dataset version, with FiftyOne signals.

Inputs:  data/ingest/ (`paths.data`/ingest): manifest.parquet, classes.json, version.json;
         `paths.curation`/<version>.csv: curators' decisions (tasks.curation), if any.
Outputs: data/curate/ (`paths.data`/curate), the curated version:
    manifest.parquet   the ingest manifest plus `excluded`, `exclusion_reason` (null when
                       kept) and `label_original` (set where relabeled); `path` stays
                       relative to the ingest folder
    curation.parquet   every decision applied: sample_id, action, label, reason, source
    signals.parquet    Brain signals per sample (with curate.signals)
    curation.json      parent version, curated version id, counts, rules, FiftyOne dataset
    plus a registry line (kind curation, parent) and, with `curate.fiftyone`, the persistent
    FiftyOne dataset `{dataset_prefix}-{version}` with tags, signal fields and saved views.
Params:  `curate:` section (and `train.model`/`train.weights`: the embedding backbone).

Rows are marked, never dropped: training skips `excluded` rows, and the App shows why.
Rules never touch the test split, so a test set stays comparable across curation settings.

    python -m tasks.curate [-S-style overrides: curate.fiftyone=false]
    python -m tasks.curate pull      (FiftyOne tags -> paths.curation/<version>.csv)
    python -m tasks.curate app [--port 5151] [--version vXXXXXXXXXXXX]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tasks import curate_fiftyone, curation
from tasks.io import MANIFEST_SCHEMA, atomic_write_json, load_table, read_json, save_table
from tasks.params import CurateParams, DatabaseParams, Params, ParamsError, TrainParams, load_params
from tasks.weights import PRETRAIN

HELD_OUT = "test"  # the split that is never modified and that others must not leak into
TAG_DUPLICATE = "duplicate"
TAG_LEAK = "leak"
LEAK_REASON = f"leak:{HELD_OUT}"
DUPLICATE_PREFIX = "duplicate-of:"
NEAR_LEAK_PREFIX = f"near-leak:{HELD_OUT}:"
# view name -> tag(s) it matches; the Brain signal views are saved by tasks.curate_signals
SAVED_VIEWS = {"duplicates": TAG_DUPLICATE, "leaky": [TAG_LEAK, "near-leak"]}
CURATED_SCHEMA = (MANIFEST_SCHEMA.append(pa.field("excluded", pa.bool_()))
                  .append(pa.field("exclusion_reason", pa.string()))
                  .append(pa.field("label_original", pa.string())))  # set where a curator relabeled


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
    curated_version: str | None = None


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
                  classes: list[str], database: DatabaseParams | None = None, create_only: bool = False) -> dict:
    """Load curated rows into the persistent FiftyOne dataset `dataset_name`, idempotently.

    Fields: absolute filepath, ground_truth (Classification), split (also a tag), sample_id,
    content_hash, excluded, exclusion_reason; tags duplicate/leak; saved views duplicates
    and leaky. An existing dataset with exactly these sample_ids is updated in place (or
    left alone when identical); any other is deleted and rebuilt. No retries here.
    Returns: {"dataset", "action" (created | rebuilt | updated | unchanged), "n_samples", "seconds"}.
    """
    managed = {TAG_DUPLICATE, TAG_LEAK, *manifest_df["split"].unique()}
    return curate_fiftyone.sync(manifest_df, images_root=images_root, dataset_name=dataset_name,
                                classes=classes, saved_views=SAVED_VIEWS, managed_tags=managed,
                                database=database or DatabaseParams(), create_only=create_only)


def embedding_backbone(params: Params) -> TrainParams:
    """`train:` as the embedding backbone: with `train.weights: pretrain`, the weights pretraining
    starts from (`pretrain.weights`), so curation never waits on the pretrain stage."""
    if params.train.weights != PRETRAIN:
        return params.train
    return params.train.model_copy(update={"weights": params.pretrain.weights})


def signal_embeddings(rows: pd.DataFrame, images_root: Path, *, version: str, n_classes: int,
                      train: TrainParams, cache_dir: Path, batch_size: int, seed: int):
    """Embeddings from the pipeline's pretrained backbone (train.model with train.weights)."""
    import torch

    from tasks.embeddings import embed
    from tasks.models import build_model

    torch.manual_seed(seed)  # the (unused) new head is random: seed it so the model hash is stable
    model, spec = build_model(train.model, n_classes, weights=train.weights, image_size=train.image_size)
    return embed(model, spec.mean, spec.std, rows, images_root, version=version, image_size=train.image_size,
                 cache_dir=cache_dir, batch_size=batch_size, arch=train.model)


def _signals(dataset_name: str, curated: pd.DataFrame, ingest_dir: Path, *, version: str, classes: list[str],
             params: CurateParams, train: TrainParams, cache_dir: Path, seed: int) -> tuple[pd.DataFrame, dict, dict]:
    from tasks import curate_signals
    from tasks.embeddings import EMBEDDING_LAYERS, reduce

    start = time.perf_counter()
    emb = signal_embeddings(curated, ingest_dir, version=version, n_classes=len(classes), train=train,
                            cache_dir=cache_dir, batch_size=params.signals.batch_size, seed=seed)
    embed_s = time.perf_counter() - start
    vectors = reduce(emb.vectors, params.signals.embedding_dim, seed=seed)
    with curate_fiftyone.connected(params.database) as fo:
        dataset = fo.load_dataset(dataset_name)
        signals = curate_signals.compute(fo, dataset, emb.sample_ids, vectors,
                                         threshold=params.signals.near_duplicate_threshold)
        curate_signals.save_views(fo, dataset)
    # Only facts that follow from the inputs: curation.json is a DVC output that training
    # depends on, so a timing here would retrain the model on every curate run.
    return signals, {"embeddings": str(emb.cache_file), "model_hash": emb.model_hash,
                     "layer": EMBEDDING_LAYERS.get(train.model), "dim": params.signals.embedding_dim,
                     "n_near_duplicates": int(signals["near_duplicate_of"].notna().sum()),
                     "n_leaking": int(signals["leaks_with"].notna().sum())}, {
                     "embeddings_cached": emb.cached, "embed_seconds": round(embed_s, 2),
                     "seconds": round(time.perf_counter() - start, 2)}


def mark_near_leaks(curated: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """Exclude train/val rows that Brain found near a test image (rule near-leak)."""
    out = curated.copy()
    leaks = dict(zip(signals["sample_id"], signals["leaks_with"]))
    for i, sid, split in zip(out.index, out["sample_id"], out["split"]):
        partner = leaks.get(sid)
        if isinstance(partner, str) and split != HELD_OUT and not out.at[i, "excluded"]:  # NaN: none
            out.at[i, "excluded"] = True
            out.at[i, "exclusion_reason"] = f"{NEAR_LEAK_PREFIX}{partner}"
    return out


# --------------------------------------------------------------------------- the stage


def _read_input(path: Path, reader):
    if not path.is_file():
        raise CurateError(f"{path}: not found; run the ingest stage first (python -m tasks.ingest)")
    return reader(path)


def _boxes(ingest_dir: Path, manifest: pa.Table) -> dict[str, tuple]:
    """sample_id -> ((label, x, y, w, h) relative to the image, ...): FiftyOne's box format."""
    ann = load_table(ingest_dir / "annotations.parquet").to_pandas().dropna(subset=["x1"])
    sizes = manifest.select(["sample_id", "width", "height"]).to_pandas().set_index("sample_id")
    ann = ann.join(sizes, on="sample_id")
    out: dict[str, list] = {}
    for r in ann.itertuples(index=False):
        box = (r.label, r.x1 / r.width, r.y1 / r.height, (r.x2 - r.x1) / r.width, (r.y2 - r.y1) / r.height)
        out.setdefault(r.sample_id, []).append((box[0], *(round(v, 6) for v in box[1:])))
    return {sid: tuple(b) for sid, b in out.items()}


def _with(df: pd.DataFrame, boxes: dict | None) -> pd.DataFrame:
    if boxes is None:
        return df
    return df.assign(boxes=[boxes.get(sid, ()) for sid in df["sample_id"]])  # () : a background image


def rule_decisions(curated: pd.DataFrame) -> pd.DataFrame:
    """The rules' exclusions as curation rows (source rule:<name>)."""
    excluded = curated[curated["exclusion_reason"].notna()]
    rows = [(sid, "exclude", None, reason, f"rule:{_rule_name(reason)}")
            for sid, reason in zip(excluded["sample_id"], excluded["exclusion_reason"])]
    return pd.DataFrame(rows, columns=list(curation.DECISION_COLUMNS)) if rows else curation.empty()


def _rule_name(reason: str) -> str:
    if reason.startswith(DUPLICATE_PREFIX):
        return "exact-duplicate"
    return "near-leak" if reason.startswith(NEAR_LEAK_PREFIX) else "exact-leak"


def curate(ingest_dir: Path, *, params: CurateParams, out_dir: Path, train: TrainParams | None = None,
           curation_dir: Path = Path("curation"), cache_dir: Path = Path(".cache"), registry: Path | None = None,
           seed: int = 0) -> CurateResult:
    """Curate the dataset version in `ingest_dir` into `out_dir` (files replaced atomically).

    Rules (exact duplicates, exact and near leakage) and the curators' decisions in
    `curation_dir/<version>.csv` are applied to the version's manifest; the result is a
    new curated version (id from parent + curation) registered in `registry`. FiftyOne is
    synced, with Brain signals, before the outputs are written, so a finished
    curation.json means the dataset exists. Raises CurateError for bad inputs.
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    manifest = _read_input(ingest_dir / "manifest.parquet", load_table)
    classes = _read_input(ingest_dir / "classes.json", read_json)
    version_info = _read_input(ingest_dir / "version.json", read_json)
    version = version_info["version"]
    train = train or TrainParams()
    boxes = _boxes(ingest_dir, manifest) if version_info.get("task") == "detection" else None

    curated = find_exclusions(manifest, exclude_duplicates=params.exclude_duplicates,
                              exclude_leakage=params.exclude_leakage)
    decisions_file = curation.decisions_path(curation_dir, version)
    user = curation.read_decisions(decisions_file, classes=classes, sample_ids=set(curated["sample_id"]))
    if boxes is not None and (user["action"] == "relabel").any():
        raise curation.CurationError(f"{decisions_file}: relabel decisions apply to classification; this "
                                     f"version is detection (boxes are edited at the source, then re-ingested)")
    name, report, signals, signal_report = None, None, None, None
    if params.fiftyone:
        name = dataset_name(params.dataset_prefix, version)
        report = sync_fiftyone(_with(curation.apply(curated, user), boxes), images_root=ingest_dir, dataset_name=name,
                               classes=classes, database=params.database, create_only=params.signals.enabled)
        if params.signals.enabled:
            signals, signal_report, timing = _signals(name, curated, ingest_dir, version=version, classes=classes,
                                                      params=params, train=train, cache_dir=cache_dir, seed=seed)
            report["signals"] = timing
            if params.exclude_near_leakage:
                curated = mark_near_leaks(curated, signals)
    decisions = pd.concat([rule_decisions(curated), user], ignore_index=True)
    final = curation.apply(curated, user)
    if params.fiftyone and params.signals.enabled:  # near-leak exclusions become visible in the App
        final_sync = sync_fiftyone(_with(final, boxes), images_root=ingest_dir, dataset_name=name, classes=classes,
                                   database=params.database)
        if report["action"] == "exists":
            report["action"] = final_sync["action"]
        report["seconds"] = round(report["seconds"] + final_sync["seconds"], 2)
    return _write_outputs(final, decisions, signals, out_dir=out_dir, version=version, params=params,
                          name=name, report=report, signal_report=signal_report, ingest_dir=ingest_dir,
                          decisions_file=decisions_file, registry=registry)


def _write_outputs(final, decisions, signals, *, out_dir, version, params, name, report, signal_report,
                   ingest_dir, decisions_file, registry) -> CurateResult:
    rules = params.model_dump(include={"exclude_duplicates", "exclude_leakage", "exclude_near_leakage"})
    rules["near_duplicate_threshold"] = params.signals.near_duplicate_threshold
    new_version, curation_sha = curation.curated_version(version, decisions, rules)
    table = pa.Table.from_pandas(final.drop(columns="tags"), schema=CURATED_SCHEMA, preserve_index=False)
    save_table(table, out_dir / "manifest.parquet")
    save_table(pa.Table.from_pandas(decisions.sort_values(["sample_id", "action"]), preserve_index=False),
               out_dir / "curation.parquet")
    if signals is not None:
        save_table(pa.Table.from_pandas(signals, preserve_index=False), out_dir / "signals.parquet")
    reasons = reason_counts(final)
    n_excluded = int(final["excluded"].sum())
    kept = final.loc[~final["excluded"], "split"].value_counts()
    info = {
        "version": version,  # the parent: the ingest version whose images this curation uses
        "curated_version": new_version,
        "curation_sha256": curation_sha,
        "decisions_file": str(decisions_file) if decisions_file.is_file() else None,
        "images_root": str(ingest_dir),
        "n_samples": len(final),
        "n_excluded": n_excluded,
        "n_relabeled": int(final["label_original"].notna().sum()),
        "reasons": reasons,
        "decisions": {f"{a} by {s.split(':')[0]}": int(n)
                      for (a, s), n in decisions.groupby(["action", "source"]).size().items()},
        "kept_per_split": {s: int(n) for s, n in sorted(kept.items())},
        "rules": rules,
        "dataset_name": name,
        "signals": signal_report,
    }
    atomic_write_json(out_dir / "curation.json", info)
    if registry is not None:
        register_curated(Path(registry), info)
    return CurateResult(version=version, dataset_name=name, n_samples=len(final), n_excluded=n_excluded,
                        reasons=reasons, manifest=str(out_dir / "manifest.parquet"), fiftyone=report,
                        curated_version=new_version)


def register_curated(path: Path, info: dict) -> None:
    """Append the curated version (kind curation, parent = the ingest version) unless present."""
    from datetime import datetime

    from tasks.ingest import load_registry, save_registry

    entries = load_registry(path)
    if any(e["version"] == info["curated_version"] for e in entries):
        return
    entries.append({
        "version": info["curated_version"], "kind": "curation", "parent": info["version"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "curation_sha256": info["curation_sha256"], "decisions_file": info["decisions_file"],
        "decisions": info["decisions"], "rules": info["rules"], "n_excluded": info["n_excluded"],
        "n_relabeled": info["n_relabeled"], "kept_per_split": info["kept_per_split"],
    })
    save_registry(path, entries)


def run(params: Params) -> CurateResult:
    """Run the stage from a loaded `Params` (the door used by dvc, flows and the CLI)."""
    data = Path(params.paths.data)
    return curate(data / "ingest", params=params.curate, out_dir=data / "curate", train=embedding_backbone(params),
                  curation_dir=params.paths.curation, cache_dir=params.paths.cache,
                  registry=params.paths.versions, seed=params.seed)


def pull(params: Params, version: str | None = None) -> dict:
    """Write the curators' FiftyOne tags for a version to `paths.curation/<version>.csv`."""
    version = version or _read_input(Path(params.paths.data) / "ingest" / "version.json", read_json)["version"]
    fo = curate_fiftyone.import_fiftyone(params.curate.database)
    name = dataset_name(params.curate.dataset_prefix, version)
    if name not in fo.list_datasets():
        raise CurateError(f"no FiftyOne dataset {name!r}; run the curate stage first")
    dataset = fo.load_dataset(name)
    decisions = curation.decisions_from_tags(dataset, classes=dataset.default_classes)
    path = curation.decisions_path(params.paths.curation, version)
    before = path.read_text() if path.is_file() else ""
    # No tags and no file yet: nothing to record (an empty file would only be noise in git).
    changed = curation.to_csv(decisions) != before and bool(len(decisions) or path.is_file())
    if changed:
        curation.write_decisions(path, decisions)
    counts = decisions["action"].value_counts().to_dict() if len(decisions) else {}
    return {"file": str(path), "version": version, "decisions": {k: int(v) for k, v in counts.items()},
            "changed": changed}


def launch_app(version: str | None = None, *, port: int | None = None, address: str = "127.0.0.1",
               params: Params | None = None) -> None:
    """Serve the FiftyOne App for a version's dataset (default: data/ingest's) until Ctrl-C."""
    from tasks import fo_app

    params = params or load_params()
    if version is None:
        version = _read_input(Path(params.paths.data) / "ingest" / "version.json", read_json)["version"]
    name = dataset_name(params.curate.dataset_prefix, version)
    fo_app.serve_app(name, database=params.curate.database, port=port or params.curate.app_port, address=address)


def _parse_app_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.curate app",
                                     description="Open the FiftyOne App on a dataset version (loopback only).")
    parser.add_argument("--port", type=int, default=None, help="default: curate.app_port")
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
        if argv[:1] == ["pull"]:
            print(json.dumps(pull(load_params(overrides=argv[1:]))))
            return 0
        result = run(load_params(overrides=argv))
    except (CurateError, ParamsError, curate_fiftyone.FiftyOneSyncError, curation.CurationError) as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2
    sync = result.fiftyone
    where = f"FiftyOne {result.dataset_name} ({sync['action']}, {sync['seconds']} s)" if sync else "FiftyOne off"
    if sync and sync.get("signals"):
        t = sync["signals"]
        where += f"; signals {t['seconds']} s (embeddings {'cached' if t['embeddings_cached'] else 'computed'})"
    print(f"curated {result.version} -> {result.curated_version}: {result.n_samples} samples, {result.n_excluded} excluded "
          f"{result.reasons}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
