"""Orchestration overhead and re-run cost of the pipeline, both doors, in one run.

Four fresh throwaway projects on the same real data (Fashion-MNIST, `size` images per split):
  direct     each tasks.<stage>.run(params) called in order, no Prefect, no DVC
  flow       python -m flows.pipeline's flow, cold then warm (nothing changed)
  dvc        `dvc repro`, cold then warm
Ratios: flow_cold/direct (what Prefect + DVC bookkeeping add), warm/cold for each door.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.project import dvc, make_project


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(size: int | None = None) -> dict:
    size = size or 2000
    overrides = [f"ingest.limit_per_split={size}", "validate.min_per_class=5", "train.epochs=1"]
    from flows.pipeline import pipeline
    from pixelops.stages import STAGES, stage_module
    from tasks.params import load_params

    here = os.getcwd()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-") as tmp:
        tmp = Path(tmp)
        try:
            direct = make_project(tmp / "direct", overrides)
            os.chdir(direct)
            params = load_params()
            timings["direct"] = _timed(lambda: [stage_module(s).run(params) for s in STAGES])

            flow = make_project(tmp / "flow", overrides)
            os.chdir(flow)
            timings["flow_cold"] = _timed(pipeline)
            timings["flow_warm"] = _timed(pipeline)

            repo = make_project(tmp / "dvc", overrides)
            for kind in ("dvc_cold", "dvc_warm"):
                t0 = time.perf_counter()
                proc = dvc(repo, "repro")
                timings[kind] = time.perf_counter() - t0
                if proc.returncode:
                    raise RuntimeError(f"dvc repro failed: {proc.stderr[-2000:]}")
        finally:
            os.chdir(here)
    return {
        "size_per_split": size,
        "overrides": overrides,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "ratios": {
            "flow_cold / direct": timings["flow_cold"] / timings["direct"],
            "flow_warm / flow_cold": timings["flow_warm"] / timings["flow_cold"],
            "dvc_warm / dvc_cold": timings["dvc_warm"] / timings["dvc_cold"],
        },
    }
