"""The ingest stage as a Prefect flow, the image gate optionally sharded over a local Dask cluster.

`dask_workers=0`: the stage exactly as `pixelops.stages.run_stage("ingest")` runs it (one
process, plus the gate's own process pool per `ingest.workers`).
`dask_workers=N>=1`: listing, storing and publishing stay in this process; the gate runs as
one Prefect task per shard (tasks/ingest_shards.py), mapped on a DaskTaskRunner over a local
cluster of N single-threaded worker processes, bound to 127.0.0.1, no dashboard.
The dataset version is the same either way (tests/test_ingest_dask.py).

Either way DVC decides first whether the stage is up to date (then nothing runs), and a run
is committed to dvc.lock and its registry line synced, so this flow, `python -m flows.pipeline`
and `dvc repro` agree.

Run:  python -m flows.ingest [--root .] [--dask-workers 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

from tasks.env import configure_environment

configure_environment()

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from flows.forms import apply_form
from pixelops.stages import commit_stage, enter_project, is_up_to_date, repo_writer, run_stage
from tasks import ingest_shards
from tasks.io import read_json
from tasks.params import IngestParams, SourceParams, load_params

# Two shards per worker: a worker that finishes early takes another, while each shard's fixed
# cost (a Prefect task run; idx: reading and unzipping the image file again) stays small.
SHARDS_PER_WORKER = 2


def dask_runner(n_workers: int):
    """A DaskTaskRunner on a fresh local cluster: processes (Pillow's limits are process-global),
    one thread each, loopback only, no dashboard (the scheduler's health endpoint stays on loopback)."""
    from prefect_dask import DaskTaskRunner

    # distributed logs every worker start and stop at INFO; keep its warnings and errors only
    # (the environment variable reaches the worker processes, which read it at start-up).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None})


# Retries only for the flaky part, reading the source (as the pipeline's ingest task); a bad
# image is never an exception, it comes back as a rejection.
@task(name="gate-shard", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def gate_shard_task(source: SourceParams, params: IngestParams, shard: ingest_shards.Shard) -> list:
    return ingest_shards.gate_shard(source, params, shard)


def _run_on_dask(source: SourceParams, params: IngestParams, shards: list, *, n_workers: int) -> list:
    """Gate the shards as task runs of the current flow run on a Dask cluster started for them.

    The runner is entered here rather than attached to a flow: whoever calls ingest_flow (a
    direct call, the CLI, a deployment) gets it, and the cluster lives only while shards are
    gated. Not a child flow: a flow's parameters go to the API, capped at 512 KB, and shards
    name their files (about 800 KB for 20,000 images).
    """
    with dask_runner(n_workers) as runner:
        futures = runner.map(gate_shard_task, {"source": unmapped(source), "params": unmapped(params),
                                               "shard": shards})
        return [f.result() for f in futures]


@flow(name="pixelops-ingest")
def ingest_flow(root: str = ".", ingest: IngestParams | None = None, dask_workers: int = 0) -> dict:
    """Run the ingest stage unless DVC says it is up to date; `dask_workers` >= 1 shards the gate.

    `ingest` is a form over params.yaml's `ingest:` section (flows/forms.py): changed values are
    written into params.yaml first. The whole run holds the project's DVC writer lock.
    """
    if isinstance(dask_workers, bool) or dask_workers < 0:
        raise ValueError(f"ingest_flow: dask_workers={dask_workers!r}; 0 (one process) or a number of Dask workers")
    logger = get_run_logger()
    root = enter_project(root)
    t0 = time.perf_counter()
    with repo_writer(load_params(f"{root}/params.yaml"), root, f"pixelops-ingest flow run (pid {os.getpid()})",
                     say=logger.warning):
        apply_form(root, {"ingest": ingest}, say=logger.info)
        params = load_params(f"{root}/params.yaml")
        if dask_workers == 0:
            skipped = run_stage("ingest", params, root=root).skipped
        elif is_up_to_date("ingest", root):
            skipped = True
        else:
            skipped = False
            ingest_shards.run(params, n_shards=dask_workers * SHARDS_PER_WORKER,
                              run_shards=partial(_run_on_dask, n_workers=dask_workers))
            commit_stage("ingest", root)
            from pixelops.versions import sync_registry

            sync_registry(params, root)  # as run_stage: the registry line learns the DVC hash
    seconds = time.perf_counter() - t0
    version = read_json(Path(root) / params.paths.data / "ingest" / "version.json")["version"]
    logger.info("ingest %s in %.1fs (dask_workers=%d): version %s",
                "up to date, skipped" if skipped else "ran", seconds, dask_workers, version)
    return {"stage": "ingest", "skipped": skipped, "seconds": round(seconds, 2), "version": version,
            "dask_workers": dask_workers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", help="project folder (params.yaml, dvc.yaml)")
    parser.add_argument("--dask-workers", type=int, default=0,
                        help="0: one process (default); N: gate shards on a local Dask cluster of N processes")
    args = parser.parse_args(argv)
    if args.dask_workers < 0:
        parser.error(f"--dask-workers {args.dask_workers}: 0 (one process) or a positive number of Dask workers")
    from tasks.archive import ArchiveError
    from tasks.ingest import IngestError
    from tasks.sources import SourceError

    try:
        r = ingest_flow(root=args.root, dask_workers=args.dask_workers)
    except (IngestError, SourceError, ArchiveError) as e:
        print(f"ingest failed: {e}", file=sys.stderr)
        return 1
    print(f"ingest {'skipped (up to date)' if r['skipped'] else 'ran'} in {r['seconds']:.1f}s: "
          f"dataset version {r['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
