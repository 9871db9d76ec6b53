"""Sharded ingest on a local Dask cluster: 2 workers vs 1 worker vs the plain one-process stage.

Two real sources, each written once into a temp folder (not timed), in image-folder layout
(bench/ingest.py's trees): `fmnist`, Fashion-MNIST images as 28×28 PNG files (decoding is
nearly free; listing and storing dominate), and `photos`, 1024×768 JPEG crops of the NEON aerial
images that deepforest ships (decoding dominates, as with camera images). In one run, each into
its own output folder, no facts cache shared between them:
  plain    tasks.ingest.ingest, the gate in its own process pool (`ingest.workers: 0`, one per core)
  dask-1   tasks.ingest_shards with flows/ingest.py's shard tasks on a 1-worker Dask cluster
  dask-2   the same on a 2-worker cluster
Dask times include starting and stopping the cluster, Prefect's flow and task runs (what a
user waits for); `gate_seconds` is the part from cluster start to the last shard's result
(listing, storing and the tables are the rest). All three must publish the same version id.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_ingest(n_images: int = 20000, kind: str = "fmnist") -> dict:
    """Seconds and ratios for plain vs Dask 1 vs Dask 2 workers on `n_images` real image files."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from bench.ingest import _fmnist_tree, _jpeg_tree
    from flows import ingest as ingest_flows
    from tasks.ingest import IngestResult, ingest
    from tasks.ingest_shards import ingest_sharded
    from tasks.params import IngestParams, SourceParams

    gate_seconds: dict[str, float] = {}

    def timed_runner(name: str, n_workers: int):
        def run_shards(source, params, shards):
            took, results = _timed(lambda: ingest_flows._run_on_dask(source, params, shards, n_workers=n_workers))
            gate_seconds[name] = took
            return results
        return run_shards

    # The test harness starts a throwaway Prefect server before anything is timed, so no run pays
    # for the server's start-up, and benchmark runs stay out of the project's flow history.
    out: dict = {"cores": os.cpu_count(), "source": kind, "images": n_images, "seconds": {}, "versions": {}}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-scaleout-") as tmp, \
            prefect_test_harness(server_startup_timeout=120):
        tmp = Path(tmp)
        (_fmnist_tree if kind == "fmnist" else _jpeg_tree)(tmp / "src", n_images)
        src = SourceParams(path=tmp / "src", format="image-folder", classes=None)
        params = IngestParams(source=src, max_bad_fraction=0.0, workers=0)

        @flow(name="bench-scaleout-ingest")  # the shard task runs need a flow run, as in flows/ingest.py
        def sharded(n_workers: int) -> IngestResult:
            return ingest_sharded(src, out_dir=tmp / f"dask-{n_workers}", params=params,
                                  n_shards=n_workers * ingest_flows.SHARDS_PER_WORKER,
                                  run_shards=timed_runner(f"dask-{n_workers}", n_workers))

        runs = {"plain": lambda: ingest(src, out_dir=tmp / "plain", params=params),
                "dask-1": lambda: sharded(1), "dask-2": lambda: sharded(2)}
        for name, fn in runs.items():
            took, result = _timed(fn)
            out["seconds"][name] = took
            out["versions"][name] = result.version
    versions = set(out["versions"].values())
    assert len(versions) == 1, f"sharded ingest published other versions than the plain stage: {out['versions']}"
    s = out["seconds"]
    out["gate_seconds"] = gate_seconds
    out["ratios"] = {
        "speed-up dask 2 workers / 1 worker": s["dask-1"] / s["dask-2"],
        "speed-up dask 2 workers / plain stage": s["plain"] / s["dask-2"],
        "speed-up dask 1 worker / plain stage": s["plain"] / s["dask-1"],
        "gate flow speed-up 2 workers / 1 worker": gate_seconds["dask-1"] / gate_seconds["dask-2"],
    }
    return out


def run(size: int | None = None) -> dict:
    """The `python -m bench scaleout_ingest [--size N]` door."""
    return bench_ingest(size or 20000)


def both(fmnist: int = 20000, photos: int = 2000) -> dict:
    """Small images (listing-bound) and large photos (decode-bound), for bench/scaleout.py."""
    return {"fmnist": bench_ingest(fmnist, "fmnist"), "photos": bench_ingest(photos, "photos")}


if __name__ == "__main__":
    import json

    from tasks.env import configure_environment

    configure_environment()
    print(json.dumps(run(), indent=2))
