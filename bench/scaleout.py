"""Scale-out on this machine: Dask-sharded ingest (2 workers ÷ 1) and DDP training (2 processes ÷ 1).

    python -m bench scaleout          (about 10 min on 2 cores)

Each figure is a ratio of two arms measured in the same run on the same data:
- ingest (bench/scaleout_ingest.py): the sharded ingest on a local Dask cluster of 2 workers
  against 1 worker, and against the plain one-process stage, on two real sources: 20,000 28×28
  PNGs (listing and storing bound) and 2,000 1024×768 JPEG photos (decode bound). All arms must
  publish the same version id.
- training (bench/scaleout_ddp.py): images per second of `torchrun --nproc_per_node 2` (gloo,
  one thread per process) against one process with one thread and with two threads, on the same
  real Fashion-MNIST images, and the accuracy each reaches.
On a 2-core machine the ceiling is 2×, less what the parent process, Prefect and the Dask
scheduler take; the figures say how much of that the engines deliver, not what a cluster would.
"""

from __future__ import annotations


def run(size: int | None = None) -> dict:
    from bench import scaleout_ddp, scaleout_ingest

    ingest = scaleout_ingest.both(fmnist=size or 20000, photos=2000)
    ddp = scaleout_ddp.bench_ddp()
    ratios = {f"ingest {kind}: {name}": value for kind, figures in ingest.items()
              for name, value in figures["ratios"].items()}
    ratios.update({f"ddp: {name}": value for name, value in ddp["ratios"].items()})
    return {"ingest": ingest, "ddp": ddp, "ratios": ratios}
