"""python -m bench NAME [--size N] | python -m bench --list"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

from tasks.env import configure_environment

BENCHMARKS = {
    "pipeline": "flow vs direct stage calls (orchestration overhead); warm ÷ cold re-runs, both doors",
    "ingest": "ingest images/s vs one-process PIL decode and `dvc add`; no-op re-ingest ÷ first; loose vs packed",
    "augment": "batched uint8 train preset vs per-sample torchvision transforms v2",
    "train_step": "MobileNetV2 training step: bf16 autocast and channels_last vs fp32 (CPU)",
    "validate": "validate gate on 1M detection boxes: GX path vs the same checks in pandas (time, peak RSS)",
    "curate": "FiftyOne load, re-sync and Brain signals at 10k/35k/70k samples: time, peak RSS, scaling exponents",
    "train": "trainer images/s ÷ a bare PyTorch loop on the same tensors; linear probe vs full fine-tune",
    "seed_recipe": "time to a fixed test accuracy: the platform trainer vs the naive seed recipe (speed-up)",
    "detection": "detection training and evaluation (bench/detection.py)",
    "tune": "a sweep with median/hyperband pruning vs none: epochs ratio, best val gap, Optuna overhead",
    "export": "TorchScript, ONNX, int8 ONNX vs PyTorch eager: 1-image latency, batch-64 images/s, test accuracy",
    "scaleout": "Dask-sharded ingest 2 workers vs 1 (small PNGs, large JPEGs); torchrun DDP 2 processes vs 1",
}


def _table(ratios: dict) -> str:
    width = max(len(k) for k in ratios)
    return "\n".join(f"{k:<{width}}  {v:8.3f}" for k, v in ratios.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", nargs="?", choices=sorted(BENCHMARKS))
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    parser.add_argument("--size", type=int, default=None, help="images per split (benchmark-specific default)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, what in BENCHMARKS.items():
            print(f"{name:<12} {what}")
        return 0
    configure_environment()
    if importlib.util.find_spec(f"bench.{args.name}") is None:
        print(f"benchmark {args.name!r} is registered but bench/{args.name}.py does not exist (yet); "
              f"available: {', '.join(n for n in BENCHMARKS if importlib.util.find_spec(f'bench.{n}'))}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{args.name}")
    kwargs = {"size": args.size}
    if "out" in inspect.signature(module.run).parameters:  # a folder for the benchmark's own files
        kwargs["out"] = args.out / args.name
    t0 = time.perf_counter()
    figures = module.run(**kwargs)
    figures.update(benchmark=args.name, cores=os.cpu_count(), python=platform.python_version(),
                   wall_seconds=round(time.perf_counter() - t0, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{args.name} ({figures['cores']} cores) — ratios:")
    print(_table(figures["ratios"]))
    print(f"raw timings and settings: {args.out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
