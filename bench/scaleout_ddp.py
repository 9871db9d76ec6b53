"""Data-parallel scale-out: `torchrun --nproc_per_node 2` (gloo, 1 thread per rank) against one process.

Data: `size` train images (default 3,000) and as many test images of the project's curated
version (data/curate; sampled with seed 0, bench.train.make_subset) or, when there is none, of
a Fashion-MNIST version ingested into a temp folder. Settings: the `train:` section of
params.yaml (MobileNetV2, ImageNet weights, 32 px, global batch 128, AdamW), device cpu,
`epochs` epochs (default 3), no checkpoints.

Three configurations, each a fresh process (so each pays its own start-up, which is excluded):
  1proc_1thread   python, train.num_threads=1          (one core idle: the per-core baseline)
  1proc_2threads  python, train.num_threads=2          (both cores, intra-op threads)
  ddp_2x1thread   torchrun 2 ranks, num_threads=1 each (both cores, data-parallel)
run in that order, `repeats` times, interleaved so that a slow spell on a shared machine hits
all three. Throughput = training images ÷ the epochs' training seconds (model.json history:
the steps alone; start-up, decoding, model build and validation excluded), over all epochs and
over the epochs after the first (warm-up excluded). Accuracy: best val accuracy and accuracy on
the test images. Ratios: 2-proc ÷ each 1-proc baseline (images/s), and the accuracy gaps.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.io import read_json
from tasks.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZE = 3000
CONFIGS = {"1proc_1thread": (1, 1), "1proc_2threads": (1, 2), "ddp_2x1thread": (2, 1)}  # (processes, threads)


def _fashion_mnist_version(tmp: Path, n: int) -> Path:
    """A curated Fashion-MNIST version of `n` train and `n` test images under `tmp` (no FiftyOne)."""
    from tasks import curate, ingest
    from tasks.params import apply_overrides, from_dict, load_raw

    raw = apply_overrides(load_raw(ROOT / "params.yaml"), [f"ingest.limit_per_split={n}", "curate.fiftyone=false"])
    raw["paths"] = {"data": str(tmp / "data"), "reports": str(tmp / "reports"), "versions": str(tmp / "v.jsonl"),
                    "curation": str(tmp / "curation"), "cache": str(tmp / "cache")}
    params = from_dict(raw, origin="bench scaleout_ddp")
    ingest.run(params)
    curate.run(params)
    return params.paths.data / "curate"


def _source(tmp: Path, size: int) -> Path:
    from bench.train import make_subset, split_size

    project = load_params().paths.data / "curate"
    if (project / "curation.json").is_file():
        n_test = min(size, split_size(project, "test"))
        return make_subset(project, tmp / "subset", n_train=size, n_test=n_test)
    return _fashion_mnist_version(tmp / "fmnist", size)


def _launch(name: str, curate_dir: Path, params_json: str, out_dir: Path, *, timeout: float) -> dict:
    """Train once in a fresh process (or two under torchrun); model.json plus the wall seconds."""
    processes, threads = CONFIGS[name]
    cfg = json.dumps({"curate": str(curate_dir), "params": params_json, "out": str(out_dir)})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if processes == 1:
        cmd = [sys.executable, "-m", "bench.scaleout_ddp", cfg]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(processes), "-m", "bench.scaleout_ddp", cfg]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(cmd[:6])} ...` exited {done.returncode}:\n{done.stderr[-3000:]}")
    meta = read_json(out_dir / "model.json")
    meta["wall_seconds"] = time.perf_counter() - t0
    return meta


def _rates(meta: dict) -> dict:
    seconds = [h["seconds"] for h in meta["history"]]
    n = meta["n_train"]
    return {"all_epochs": n * len(seconds) / sum(seconds),
            "after_first": n * (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) > 1 else None}


def bench_ddp(*, size: int = DEFAULT_SIZE, epochs: int = 3, repeats: int = 2, source: Path | None = None,
              overrides: list[str] | None = None, timeout: float = 1800) -> dict:
    """Images/s and accuracy of 2 data-parallel processes against 1 process, same data and recipe.

    size:      train images (and test images, at most all) in the subset.
    epochs:    epochs per run.
    repeats:   rounds of the three configurations (interleaved).
    source:    a curate folder to sample from; default: the project's, or a temp Fashion-MNIST version.
    overrides: `train.key=value` overrides of params.yaml (tests shrink with them).
    Returns figures: per-run rates and accuracies, medians per configuration, and `ratios`.
    """
    from bench.train import decode_split, make_subset, model_accuracy, split_size

    p = load_params(overrides=[*(overrides or []), "train.device=cpu", f"train.epochs={epochs}"]).train
    load = {"start": os.getloadavg()}
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-ddp-") as tmp:
        tmp = Path(tmp)
        if source is not None:
            curate_dir = make_subset(Path(source), tmp / "subset", n_train=size,
                                     n_test=min(size, split_size(Path(source), "test")))
        else:
            curate_dir = _source(tmp, size)
        test_x, test_y = decode_split(curate_dir, "test", image_size=p.image_size)
        for r in range(repeats):
            for name, (_, threads) in CONFIGS.items():
                out = tmp / f"{name}-{r}"
                meta = _launch(name, curate_dir, p.model_copy(update={"num_threads": threads}).model_dump_json(),
                               out, timeout=timeout)
                runs[name].append({"images_per_second": _rates(meta), "loop_images_per_second":
                                   meta["images_per_second"], "wall_seconds": round(meta["wall_seconds"], 1),
                                   "best_val_accuracy": meta["best_val_accuracy"],
                                   "test_accuracy": model_accuracy(out, test_x, test_y),
                                   "distributed": meta["distributed"]})
        load["end"] = os.getloadavg()

    def median(name: str, key: str, sub: str | None = None) -> float:
        return statistics.median(run[key][sub] if sub else run[key] for run in runs[name])

    summary = {name: {"images_per_second": median(name, "images_per_second", "all_epochs"),
                      "images_per_second_after_first_epoch": median(name, "images_per_second", "after_first")
                      if epochs > 1 else None,
                      "test_accuracy": median(name, "test_accuracy"),
                      "best_val_accuracy": median(name, "best_val_accuracy")} for name in CONFIGS}
    ddp, one, two = summary["ddp_2x1thread"], summary["1proc_1thread"], summary["1proc_2threads"]
    return {
        "size": size,
        "n_test": len(test_y),
        "epochs": epochs,
        "repeats": repeats,
        "settings": {k: p.model_dump(mode="json")[k] for k in ("model", "weights", "image_size", "batch_size", "lr",
                                                                "device", "bf16", "channels_last")},
        "runs": runs,
        "summary": summary,
        "load_average_1_5_15": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "cores": os.cpu_count(),
        "warning": (f"1-min load average {load['start'][0]:.1f} on {os.cpu_count()} cores at the start: other jobs "
                    "were running, the rates are noisy") if load["start"][0] > 0.5 * (os.cpu_count() or 1) else None,
        "ratios": {
            "ddp 2x1 thread / 1 proc 1 thread (images/s)": ddp["images_per_second"] / one["images_per_second"],
            "ddp 2x1 thread / 1 proc 2 threads (images/s)": ddp["images_per_second"] / two["images_per_second"],
            "ddp - 1 proc 1 thread (test accuracy)": ddp["test_accuracy"] - one["test_accuracy"],
            "ddp - 1 proc 2 threads (test accuracy)": ddp["test_accuracy"] - two["test_accuracy"],
        },
    }


def run(size: int | None = None) -> dict:
    """`python -m bench scaleout_ddp [--size N]`: bench_ddp with its defaults."""
    return bench_ddp(size=size or DEFAULT_SIZE)


def _worker(cfg_json: str) -> int:
    """One training run (a rank, under torchrun): train() without checkpoints into cfg["out"]."""
    from tasks.env import configure_environment
    from tasks.params import TrainParams
    from tasks.train import train

    configure_environment(ROOT)
    cfg = json.loads(cfg_json)
    train(Path(cfg["curate"]), params=TrainParams.model_validate_json(cfg["params"]), out_dir=Path(cfg["out"]),
          seed=0, cache_dir=None)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
