"""Ingest with the image gate split into shards (run on Dask by flows/ingest.py); same version as one process.

Inputs:  `ingest:` params and source (a folder or a zip/tar archive), a shard count, and a
         `run_shards` callable that gates a list of shards somewhere (default: in this process).
Outputs: exactly what tasks.ingest.ingest writes under data/ingest/, byte for byte: only the
         gate moves; listing, storing, the tables, the version id and publication are
         tasks/ingest.py's own code, reached through its `check=` parameter.
Params:  `ingest:` section (`ingest.workers` is not used here: each shard gates in-process,
         the shard's worker process is the parallelism).

How: ingest lists the source in this process (an archive is extracted once into the staging
folder first, as always) and asks for the images the facts cache does not know. Those are
cut into contiguous runs of the deterministic listing (`plan_shards`). A shard of files names
them (paths, ~100 bytes each: re-listing in the worker would cost about as much per image as
gating it); a shard of in-memory items (idx) re-reads the listing in its worker and encodes
only its own slice. Each worker gates its shard in-process (`gate_shard`); only (index,
source_key, facts or rejection as a plain dict, sha256) come back, never image bytes. Every
result is checked against this process's listing (indices; source_key and, for in-memory
items, sha256 of the bytes) before ingest stores bytes, so a source that changes under the
run, or a worker that lists differently, fails loudly instead of publishing a wrong version.

Workers must see the same filesystem paths as this process (a local cluster, or a shared
mount at the same path): shards, rejection details and cache entries name image paths.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

from PIL import Image

from tasks import formats, gate
from tasks.ingest import IngestError, IngestResult, ingest
from tasks.io import sha256_bytes
from tasks.params import IngestParams, Params, SourceParams
from tasks.sources import SourceItem

ShardResult = list[tuple[int, str | None, dict, str]]  # (index, source_key, {"facts"|"rejection": ...}, sha256)
RunShards = Callable[[SourceParams, IngestParams, "list[Shard]"], Sequence[ShardResult]]


class ShardError(IngestError):
    """A shard's view of the source disagrees with the listing ingest made; nothing was published."""


@dataclass(frozen=True)
class Shard:
    number: int
    ranges: tuple[tuple[int, int], ...]  # [start, stop) runs of listing indices this shard gates
    n_items: int                          # length of the parent's listing, for the worker to compare
    paths: tuple[str, ...] | None = None  # the images' files, in index order; None: re-list (idx bytes)

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    @property
    def stop(self) -> int:
        return self.ranges[-1][1]

    def indices(self) -> list[int]:
        return [i for start, stop in self.ranges for i in range(start, stop)]


def plan_shards(indices: Sequence[int], n: int, *, n_items: int) -> list[Shard]:
    """Cut listing `indices` (those to gate) into at most `n` shards of near-equal size.

    Shards are contiguous in listing order, so a worker reads only the listing up to its last
    index; runs inside a shard skip images the facts cache already knows. Empty shards are
    dropped. Raises ValueError for n < 1 or an index outside [0, n_items).
    """
    if isinstance(n, bool) or n < 1:
        raise ValueError(f"plan_shards: n={n!r}; expected a positive number of shards")
    todo = sorted(set(indices))
    if todo and (todo[0] < 0 or todo[-1] >= n_items):
        raise ValueError(f"plan_shards: indices span {todo[0]}..{todo[-1]}, outside the listing 0..{n_items - 1}")
    base, extra = divmod(len(todo), n)
    shards, at = [], 0
    for k in range(n):
        part = todo[at: at + base + (k < extra)]
        at += len(part)
        if part:
            shards.append(Shard(len(shards), _runs(part), n_items))
    return shards


def _runs(sorted_indices: list[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for i in sorted_indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def _in_ranges(shard: Shard) -> Callable[[int], bool]:
    return set(shard.indices()).__contains__


# --------------------------------------------------------------------------- in the worker


def gate_shard(source: SourceParams, params: IngestParams, shard: Shard) -> ShardResult:
    """Gate one shard in this (worker) process, in-process (`workers=1`).

    A shard with `paths` gates those files as given. One without (in-memory items: idx) re-lists
    `source` (its path: the folder ingest read, an extracted archive included) and gates its
    indices. Returns one tuple per index: (index, source_key or None when given paths,
    {"facts": ...} or {"rejection": ...}, sha256). Raises ShardError when the listing ends
    before the shard does, SourceError from the readers.
    """
    if shard.paths is not None:
        if len(shard.paths) != shard.size:
            raise ShardError(f"shard {shard.number}: {len(shard.paths)} paths for {shard.size} indices")
        keys: dict[int, str | None] = dict.fromkeys(shard.indices())
        work = zip(shard.indices(), map(Path, shard.paths))
    else:
        root = Path(source.path)
        fmt = formats.detect_format(root) if source.format == "auto" else source.format
        listed = (_idx_items(root, source, params, shard) if fmt == "idx"
                  else _listed_items(root, fmt, source, params, shard))
        keys = {}

        def work_from_listing():
            for i, item in listed:
                keys[i] = item.source_key
                yield i, item.path if item.path is not None else item.data

        work = work_from_listing()
    out = [(i, keys[i], _as_dict(outcome), digest)
           for i, outcome, digest in gate.check_many(work, max_pixels=params.max_pixels,
                                                     timeout_s=params.decode_timeout_s, workers=1)]
    if len(out) != shard.size:
        raise ShardError(f"{source.path}: shard {shard.number} found {len(out)} of its {shard.size} images: the "
                         f"worker's listing ends before ingest's ({shard.n_items} items); the source changed "
                         "during ingest, re-run it")
    return out


def _listed_items(root: Path, fmt: str, source: SourceParams, params: IngestParams,
                  shard: Shard) -> Iterator[tuple[int, SourceItem]]:
    dataset = formats.read_source(root, format=fmt, classes=source.classes, limit_per_split=params.limit_per_split)
    if isinstance(dataset.items, list) and len(dataset.items) != shard.n_items:
        raise ShardError(f"{root}: the worker lists {len(dataset.items)} images, ingest listed {shard.n_items}; "
                         "the source changed during ingest, re-run it")
    wanted = _in_ranges(shard)
    # Lazy readers (image-folder, yolo) stop at the shard's last index; nothing after it is listed.
    for i, item in enumerate(islice(dataset.items, shard.stop)):
        if wanted(i):
            yield i, item


def _idx_items(root: Path, source: SourceParams, params: IngestParams,
               shard: Shard) -> Iterator[tuple[int, SourceItem]]:
    """The shard's idx items, PNG-encoding only those (not every item before them).

    The idx reader encodes each item as it is listed (≈ 57 µs per 28×28 image against ≈ 37 µs
    to gate it), so re-listing through it would cost each shard every encode up to its last
    index. Labels are still checked by `read_source`; the PNG settings must stay those of
    tasks.formats._iter_idx, and the parent compares every sha256 with its own listing's bytes.
    """
    dataset = formats.read_source(root, format="idx", classes=source.classes, limit_per_split=params.limit_per_split)
    limit, wanted, offset = params.limit_per_split, _in_ranges(shard), 0
    for split, base in formats.IDX_FILES.items():
        image_file = formats._idx_path(root / base)
        if image_file is None:
            continue
        labels = formats._read_idx(formats._idx_path(root / formats.IDX_LABELS[split]), 0x00000801)
        n = len(labels) if limit is None else min(limit, len(labels))
        if any(start < offset + n and stop > offset for start, stop in shard.ranges):
            pixels = formats._read_idx(image_file, 0x00000803)
            if len(pixels) != len(labels):
                raise ShardError(f"{image_file}: {len(pixels)} images but {len(labels)} labels")
            for i in range(n):
                if wanted(offset + i):
                    buf = io.BytesIO()
                    Image.fromarray(pixels[i], mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
                    yield offset + i, SourceItem(split=split, source_key=f"{base}[{i}]",
                                                 label=dataset.classes[int(labels[i])], data=buf.getvalue())
        offset += n


def _as_dict(outcome: gate.ImageFacts | gate.Rejection) -> dict:
    return {"facts" if isinstance(outcome, gate.ImageFacts) else "rejection": asdict(outcome)}


def _from_dict(d: dict) -> gate.ImageFacts | gate.Rejection:
    return gate.ImageFacts(**d["facts"]) if "facts" in d else gate.Rejection(**d["rejection"])


# --------------------------------------------------------------------------- in the parent


def run_in_process(source: SourceParams, params: IngestParams, shards: list[Shard]) -> list[ShardResult]:
    """Gate the shards one after another here (tests, and a reference for other runners)."""
    return [gate_shard(source, params, s) for s in shards]


def sharded_check(source: SourceParams, params: IngestParams, *, n_shards: int,
                  run_shards: RunShards = run_in_process):
    """A `check` for tasks.ingest.ingest that plans shards, runs them with `run_shards`, verifies results."""

    def check(root: Path, items: list, todo: list[int]):
        shards = [_with_paths(s, items) for s in plan_shards(todo, n_shards, n_items=len(items))]
        if not shards:
            return []
        results = run_shards(source.model_copy(update={"path": Path(root)}), params, shards)
        if len(results) != len(shards):
            raise ShardError(f"{source.path}: {len(shards)} shards sent, {len(results)} results came back")
        return [r for shard, result in zip(shards, results) for r in _verified(shard, result, items)]

    return check


def _with_paths(shard: Shard, items: list) -> Shard:
    """The shard with its files named, when every item is a file (all formats but idx).

    Sending paths (~100 bytes each) costs less than re-listing in the worker: listing an
    image-folder costs about as much per image as gating it (resolving each path inside the
    root), and a shard would re-list everything before its first index.
    """
    paths = [items[i].path for i in shard.indices()]
    return replace(shard, paths=tuple(map(str, paths))) if all(p is not None for p in paths) else shard


def _verified(shard: Shard, result: ShardResult, items: list):
    expected = shard.indices()
    if sorted(r[0] for r in result) != expected:
        raise ShardError(f"shard {shard.number}: results for {len(result)} indices, expected its {len(expected)} "
                         f"images in {shard.ranges}")
    for index, key, outcome, digest in result:
        item = items[index]
        if key is not None and key != item.source_key:
            raise ShardError(f"shard {shard.number}: item {index} is {key!r} in the worker's listing but "
                             f"{item.source_key!r} in ingest's; the source changed during ingest, re-run it")
        if item.data is not None and digest and digest != sha256_bytes(item.data):
            raise ShardError(f"shard {shard.number}: {item.source_key}: the worker encoded other bytes than the reader "
                             "(tasks/ingest_shards._idx_items must match tasks.formats._iter_idx)")
        yield index, _from_dict(outcome), digest


def ingest_sharded(source: SourceParams, *, out_dir: Path, params: IngestParams | None = None,
                   registry: Path | None = None, n_shards: int,
                   run_shards: RunShards = run_in_process) -> IngestResult:
    """tasks.ingest.ingest with the gate cut into `n_shards` shards run by `run_shards`.

    Same arguments, result, errors and outputs as `ingest` (plus ShardError); archives are
    extracted once here and the shards read the extracted folder.
    """
    if isinstance(n_shards, bool) or n_shards < 1:
        raise ValueError(f"ingest_sharded: n_shards={n_shards!r}; expected a positive integer")
    params = params or IngestParams(source=source)
    return ingest(source, out_dir=out_dir, params=params, registry=registry,
                  check=sharded_check(source, params, n_shards=n_shards, run_shards=run_shards))


def run(params: Params, *, n_shards: int, run_shards: RunShards = run_in_process,
        out_dir: Path | None = None) -> IngestResult:
    """The sharded stage from a loaded `Params`: tasks.ingest.run's outputs and registry line."""
    p = params.ingest
    return ingest_sharded(p.source, out_dir=out_dir or params.paths.data / "ingest", params=p,
                          registry=params.paths.versions, n_shards=n_shards, run_shards=run_shards)
