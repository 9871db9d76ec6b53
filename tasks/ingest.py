"""Stage ingest: a source dataset becomes one canonical, content-addressed dataset version.

Inputs:  `ingest.source`: a folder or a zip/tar archive in any supported format
         (idx, image-folder, csv, parquet, coco, voc, yolo; tasks/formats.py).
Outputs: data/ingest/ (`paths.data`/ingest)
    images/<hh>/<sha256>.<ext>   every accepted image, stored once by content, bytes as given
    manifest.parquet             the images table: one row per image (schema in tasks.io)
    annotations.parquet          one row per label or box (boxes: absolute xyxy pixels)
    quarantine.parquet           rejected images: source_key, split, reason code, detail
    classes.json                 class names in label-index order
    version.json                 version id (hash of the tables' content), task, counts, category map
    and one line in the version registry (`paths.versions`): date, source, parent, params.
Params:  `ingest:` section.

Every image is decoded in worker processes by the integrity gate (tasks/gate.py); a bad one is
quarantined with a reason code, never rewritten. Above `ingest.max_bad_fraction` the stage
fails and publishes nothing. The version is built in a staging folder beside the old one
and swapped in by rename, so a crash never leaves a partial version where a finished one is
expected, and the previous version stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from tasks import archive, formats, gate
from tasks.ingest_cache import FactsCache, is_unchanged, source_fingerprint
from tasks.io import (
    ANNOTATION_SCHEMA,
    MANIFEST_SCHEMA,
    NO_SPACE,
    atomic_write_json,
    atomic_write_text,
    save_table,
    sha256_bytes,
    table_content_hash,
)
from tasks.params import IngestParams, Params, SourceParams
from tasks.sources import SourceError

QUARANTINE_SCHEMA = pa.schema(
    [("source_key", pa.string()), ("split", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


class IngestError(ValueError):
    """The source cannot be ingested; nothing was published."""


@dataclass(frozen=True)
class IngestResult:
    version: str
    out_dir: str
    manifest: str
    task: str
    n_images: int
    n_annotations: int
    n_quarantined: int
    classes: list[str]
    per_split: dict[str, int]
    quarantine_reasons: dict[str, int]


# --------------------------------------------------------------------------- registry


def ingested_versions(entries: list[dict]) -> list[dict]:
    """The registry's ingest entries; curated versions (kind curation, tasks.curate) come between."""
    return [e for e in entries if e.get("kind", "ingest") == "ingest"]


def load_registry(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_registry(path: Path | str, entries: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _register(path: Path, info: dict, params: IngestParams, parent: str | None) -> None:
    """Append the version to the registry unless it is already the latest ingest entry."""
    entries = load_registry(path)
    ingested = ingested_versions(entries)
    if ingested and ingested[-1]["version"] == info["version"]:
        return
    parent = parent if parent != info["version"] else None
    entries.append({
        "version": info["version"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "parent": parent,
        "source": info["source"],
        "format": info["format"],
        "task": info["task"],
        "n_images": info["n_images"],
        "n_quarantined": info["n_quarantined"],
        "per_split": info["per_split"],
        "per_class": info["per_class"],
        "params": params.model_dump(mode="json"),
        "dvc_md5": None,
    })
    save_registry(path, entries)


# --------------------------------------------------------------------------- the stage


def _open_source(source: SourceParams, params: IngestParams, staging: Path) -> Path:
    """The folder to read: the source itself, or an archive extracted (after checks) into staging."""
    path = Path(source.path)
    if not path.exists():
        hint = (" (the default Fashion-MNIST data comes from the Debian package dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist, or `make setup`)" if "fashion-mnist" in str(path) else "")
        raise IngestError(f"{path}: source not found{hint}")
    if path.is_file() and archive.is_archive(path):
        return archive.extract_to_staging(path, staging / "extracted", caps=params.archive)
    return path


def _sample_id(content_hash: str, split: str, source_key: str) -> str:
    return sha256_bytes(f"{content_hash}|{split}|{source_key}".encode())[:24]


def _columns(schema: pa.Schema) -> dict[str, list]:
    return {f.name: [] for f in schema}


# The gate as a caller may supply it: (root read, listed items, indices not in the facts cache)
# -> (index, facts or rejection, sha256) for each of those indices, in any order.
Check = Callable[[Path, list, list[int]], Iterable[tuple[int, gate.ImageFacts | gate.Rejection, str]]]


def ingest(source: SourceParams, *, out_dir: Path, params: IngestParams | None = None,
           registry: Path | None = None, check: Check | None = None) -> IngestResult:
    """Read `source` into a new dataset version under `out_dir` (published atomically).

    `check` replaces the local gate (`gate.check_many`) for the images not in the facts cache;
    tasks/ingest_shards.py passes one that gates shards elsewhere (Dask workers) from the root.
    Returns the version id, counts and paths. Raises IngestError (or SourceError / ArchiveError
    from the readers) with the file, row and rule; then nothing is published.
    """
    params = params or IngestParams(source=source)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(source.path, source.model_dump_json() + params.model_dump_json()) \
        if Path(source.path).exists() else None
    if fingerprint and is_unchanged(out_dir, fingerprint):
        return _result(json.loads((out_dir / "version.json").read_text()), out_dir)  # no-op re-ingest
    cache = FactsCache.load(out_dir)
    stage = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images").mkdir(parents=True)
    try:
        root = _open_source(source, params, stage)
        dataset = formats.read_source(root, format=source.format, classes=source.classes,
                                      limit_per_split=params.limit_per_split)
        extracted = stage in Path(root).parents  # extracted files are new each run: not cached
        fresh = FactsCache()
        info = _build(dataset, stage, params, source_label=str(source.path),
                      cache=FactsCache() if extracted else cache, fresh=FactsCache() if extracted else fresh,
                      check=(lambda items, todo: check(Path(root), items, todo)) if check else None)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise IngestError(f"no space left on device while building the new version in {stage} "
                              f"({e.filename or getattr(e, 'path', None) or 'image files'}): nothing was published and "
                              f"{out_dir} is unchanged; free space on that filesystem and re-run") from e
        raise
    shutil.rmtree(stage / "extracted", ignore_errors=True)

    # `dvc repro` deletes a stage's outputs before running it, so the parent (the version current
    # before this one) comes from the registry, falling back to the folder being replaced.
    previous = ingested_versions(load_registry(registry))[-1:] if registry is not None else []
    parent = previous[0]["version"] if previous else (
        json.loads((out_dir / "version.json").read_text())["version"] if (out_dir / "version.json").is_file() else None)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    stage.rename(out_dir)  # publication: the whole version appears at once
    shutil.rmtree(old, ignore_errors=True)
    if registry is not None:
        _register(Path(registry), info, params, parent)
    if fingerprint:
        fresh.save(out_dir, fingerprint=fingerprint, version=info["version"])
    return _result(info, out_dir)


def _result(info: dict, out_dir: Path) -> IngestResult:
    return IngestResult(
        version=info["version"], out_dir=str(out_dir), manifest=str(out_dir / "manifest.parquet"),
        task=info["task"], n_images=info["n_images"], n_annotations=info["n_annotations"],
        n_quarantined=info["n_quarantined"], classes=info["classes"], per_split=info["per_split"],
        quarantine_reasons=info["quarantine_reasons"],
    )


def _gate(items: list, params: IngestParams, cache: FactsCache, fresh: FactsCache, check=None):
    """(index, facts or rejection, sha256) for every item; files unchanged since a cached ingest
    are neither decoded nor hashed again. `fresh` collects this run's files (the next cache).
    `check(items, indices)`, when given, gates the rest instead of the local process pool."""
    work = []
    for i, item in enumerate(items):
        hit = cache.lookup(item.path) if item.path is not None else None
        if hit:
            fresh.remember(item.path, hit[0], hit[1], stat=hit[2])
            yield i, gate.ImageFacts(**hit[1]), hit[0]
        else:
            work.append((i, item.path if item.path is not None else item.data))
    outcomes = check(items, [i for i, _ in work]) if check else gate.check_many(
        work, max_pixels=params.max_pixels, timeout_s=params.decode_timeout_s, workers=params.workers)
    for index, outcome, digest in outcomes:
        path = items[index].path
        if path is not None and isinstance(outcome, gate.ImageFacts):
            fresh.remember(path, digest, asdict(outcome))
        yield index, outcome, digest


def _progress(results, total: int, every: int = 10_000):
    """Pass results through, printing a progress line every `every` images (long runs only)."""
    t0 = time.perf_counter()
    for n, result in enumerate(results, 1):
        if n % every == 0:
            print(f"ingest: {n}/{total} images checked ({n / (time.perf_counter() - t0):.0f}/s)",
                  file=sys.stderr, flush=True)
        yield result


def _build(dataset, stage: Path, params: IngestParams, *, source_label: str, cache: FactsCache,
           fresh: FactsCache, check=None) -> dict:
    """Gate every item, store accepted images by content, write the tables into `stage`."""
    items = list(dataset.items)
    if not items:
        raise IngestError(f"{source_label}: the source lists no images")
    images, annotations, quarantine = (_columns(MANIFEST_SCHEMA), _columns(ANNOTATION_SCHEMA),
                                       _columns(QUARANTINE_SCHEMA))
    stored: set[str] = set()
    for i in range(256):  # content-addressed fan-out folders, made once rather than per image
        (stage / "images" / f"{i:02x}").mkdir(exist_ok=True)
    for index, outcome, digest in sorted(_progress(_gate(items, params, cache, fresh, check), len(items)),
                                         key=lambda r: r[0]):
        item = items[index]
        if isinstance(outcome, gate.Rejection):
            for k, v in zip(quarantine, (item.source_key, item.split, outcome.reason_code, outcome.detail)):
                quarantine[k].append(v)
            continue
        rel = f"images/{digest[:2]}/{digest}{EXTENSIONS.get(outcome.format, '.img')}"
        if rel not in stored:  # identical bytes are stored once; source files are only read
            data = item.path.read_bytes() if item.path is not None else item.data
            if sha256_bytes(data) != digest:  # the file changed between the gate and now
                outcome = gate.Rejection("changed-during-ingest", f"{item.source_key}: bytes differ from "
                                         "those the gate checked; re-run ingest when the source is stable")
                for k, v in zip(quarantine, (item.source_key, item.split, outcome.reason_code, outcome.detail)):
                    quarantine[k].append(v)
                continue
            (stage / rel).write_bytes(data)
            stored.add(rel)
        sid = _sample_id(digest, item.split, item.source_key)
        row = (sid, digest, rel, item.label, item.split, outcome.width, outcome.height, outcome.mode,
               outcome.exif_orientation, item.source_key)
        for k, v in zip(images, row):
            images[k].append(v)
        _add_annotations(annotations, sid, item)

    n_bad, n_all = len(quarantine["reason"]), len(items)
    reasons = dict(Counter(quarantine["reason"]))
    if not images["sample_id"] or n_bad / n_all > params.max_bad_fraction:
        examples = "; ".join(f"{k} ({r})" for k, r in list(zip(quarantine["source_key"], quarantine["reason"]))[:3])
        raise IngestError(
            f"{source_label}: {n_bad} of {n_all} images quarantined ({n_bad / n_all:.1%}), over "
            f"ingest.max_bad_fraction={params.max_bad_fraction}; reasons {reasons}; e.g. {examples}. "
            "Nothing was published; the previous version is unchanged."
        )
    manifest = pa.table(images, schema=MANIFEST_SCHEMA)
    ann = pa.table(annotations, schema=ANNOTATION_SCHEMA)
    version = "v" + sha256_bytes(
        (table_content_hash(manifest, MANIFEST_SCHEMA.names) + table_content_hash(ann, ANNOTATION_SCHEMA.names)
         + json.dumps(dataset.classes)).encode())[:12]
    save_table(manifest, stage / "manifest.parquet")
    save_table(ann, stage / "annotations.parquet")
    save_table(pa.table(quarantine, schema=QUARANTINE_SCHEMA), stage / "quarantine.parquet")
    atomic_write_json(stage / "classes.json", dataset.classes)
    info = {
        "version": version,
        "task": dataset.task,
        "source": source_label,
        "format": dataset.format,
        "n_images": manifest.num_rows,
        "n_annotations": ann.num_rows,
        "n_unique_files": len(stored),
        "n_duplicate_images": manifest.num_rows - len(stored),  # same bytes under another name/split
        "n_background": sum(1 for it in items if it.boxes == []),
        "n_quarantined": n_bad,
        "quarantine_reasons": reasons,
        "per_split": dict(sorted(Counter(images["split"]).items())),
        "per_class": dict(sorted(Counter(annotations["label"]).items())),
        "classes": dataset.classes,
        "category_map": {str(k): v for k, v in sorted(dataset.category_map.items())},
    }
    atomic_write_json(stage / "version.json", info)  # deterministic: no dates, no parents (registry)
    return info


def _add_annotations(columns: dict[str, list], sample_id: str, item) -> None:
    if item.boxes is None:  # classification: one label row per image
        if item.label is not None:
            for k, v in zip(columns, (sample_id, item.label, None, None, None, None)):
                columns[k].append(v)
        return
    for box in item.boxes:
        for k, v in zip(columns, (sample_id, box.label, box.x1, box.y1, box.x2, box.y2)):
            columns[k].append(v)


def run(params: Params, out_dir: Path | None = None) -> IngestResult:
    """Run the stage from a loaded `Params` (the door used by dvc, flows and the CLI)."""
    p: IngestParams = params.ingest
    return ingest(p.source, out_dir=out_dir or params.paths.data / "ingest", params=p,
                  registry=params.paths.versions)


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    try:
        r = run(load_params(overrides=argv or []))
    except (IngestError, SourceError, archive.ArchiveError) as e:
        print(f"ingest failed: {e}", file=sys.stderr)
        return 1
    print(f"dataset version {r.version} ({r.task}): {r.n_images} images {r.per_split}, {r.n_annotations} "
          f"annotations, {r.n_quarantined} quarantined {r.quarantine_reasons or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
