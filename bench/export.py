"""Exported models against PyTorch eager on CPU: latency, throughput and test accuracy.

Model: the project's trained model (`paths.data`/train) with its curated version
(`paths.data`/curate), when the two belong together; otherwise a small one trained here as
bench/train.py trains (`size` train images, default 6,000, sampled with seed 0 by
bench.train.make_subset; `train:` section of params.yaml, 1 epoch, no checkpoints).
Export: tasks.export.export with params.yaml's `export:` section into a temp folder: the
artifacts the stage ships (TorchScript traced and frozen, ONNX from the dynamo exporter, ONNX
Runtime static int8 QDQ); its parity gate applies.

Figures, each backend against PyTorch eager (the fp32 nn.Module under no_grad, as
tasks.evaluate runs it) measured in the same process, `threads` intra-op threads for torch and
onnxruntime alike (default min(2, cores)):
- single-image latency: median of `runs` calls (default 200) after 5 untimed ones;
- batch-64 throughput: images/s over `batches` batches (default 30) after one untimed batch;
  both in `rounds` rounds (default 3) that rotate the backends' order, medians across rounds
  (the load average is recorded: the machine is shared);
- test accuracy of every backend on the test split (all of it, or the first `size` images of it
  for the project's model), as a difference to PyTorch's;
- artifact sizes, from export.json.
Ratios: latency ÷ PyTorch's (lower is faster), throughput ÷ PyTorch's (higher is faster),
accuracy − PyTorch's, bytes ÷ PyTorch's model.pt.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tasks.data import build_eval_transform
from tasks.export import ARTIFACTS, batched_logits, export, latency_ms, ort_runner, ort_session
from tasks.io import read_json
from tasks.params import load_params
from tasks.train import load_trained, load_training_rows, train

DEFAULT_TRAIN_SIZE = 6000
BACKENDS = ("pytorch", "torchscript", "onnx", "int8")
THROUGHPUT_BATCH = 64


def _project_model() -> tuple[Path, Path] | None:
    """(model dir, curate dir) of the project when both exist and the model was trained on that version."""
    data = load_params().paths.data
    model_dir, curate_dir = data / "train", data / "curate"
    if not ((model_dir / "model.json").is_file() and (curate_dir / "curation.json").is_file()):
        return None
    same = read_json(model_dir / "model.json").get("dataset_version") == read_json(
        curate_dir / "curation.json").get("version")
    return (model_dir, curate_dir) if same else None


def _train_small(tmp: Path, size: int) -> tuple[Path, Path]:
    from bench.train import default_source, make_subset, split_size

    source = default_source()
    subset = make_subset(source, tmp / "curate", n_train=size, n_test=min(size, split_size(source, "test")))
    p = load_params().train
    train(subset, params=p.model_copy(update={"epochs": 1, "resume": False}), out_dir=tmp / "train", seed=0)
    return tmp / "train", subset


@torch.no_grad()
def _throughput(fn, x, batches: int) -> float:
    fn(x)  # untimed
    t0 = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return batches * len(x) / (time.perf_counter() - t0)


def _runners(model, out: Path, threads: int) -> dict:
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated upstream (FutureWarning on load)
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out / ARTIFACTS["torchscript"]), map_location="cpu")
    return {"pytorch": lambda x: model(x).numpy(), "torchscript": lambda x: scripted(x).numpy(),
            "onnx": ort_runner(ort_session(out / ARTIFACTS["onnx"], threads)),
            "int8": ort_runner(ort_session(out / ARTIFACTS["int8"], threads))}


def run(size: int | None = None, *, threads: int | None = None, runs: int = 200, batches: int = 30,
        rounds: int = 3) -> dict:
    """Figures of this benchmark (module docstring).

    size:    test images for the accuracy figure with the project's model (default: all); train
             images of the small model trained when there is none (default 6,000).
    threads: torch and onnxruntime intra-op threads; default min(2, cores).
    runs, batches, rounds: single-image calls per latency, batches per throughput, rotations.
    """
    from tasks.data import image_channels, label_indices, load_images

    threads = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-export-") as tmp:
        tmp = Path(tmp)
        found = _project_model()
        model_dir, curate_dir = found or _train_small(tmp, size or DEFAULT_TRAIN_SIZE)
        t0 = time.perf_counter()
        report = export(model_dir, curate_dir, tmp / "export", params=load_params().export, num_threads=threads)
        export_seconds = time.perf_counter() - t0

        model, spec, meta = load_trained(model_dir)
        model.eval()
        rows, classes, _, images_root = load_training_rows(curate_dir)
        test = rows[rows["split"] == "test"].reset_index(drop=True)
        if found and size:
            test = test.iloc[:size]
        images = load_images(test, images_root, size=spec.image_size, channels=image_channels(test))
        labels = label_indices(test, classes).numpy()
        normalize = build_eval_transform(mean=spec.mean, std=spec.std)
        runners = _runners(model, tmp / "export", threads)

        accuracy = {name: float((batched_logits(fn, images, normalize).argmax(1) == labels).mean())
                    for name, fn in runners.items()}
        one = normalize(images[:1])
        batch = normalize(images[:THROUGHPUT_BATCH].repeat(-(-THROUGHPUT_BATCH // len(images)), 1, 1, 1)
                          [:THROUGHPUT_BATCH])
        latency, throughput = {n: [] for n in BACKENDS}, {n: [] for n in BACKENDS}
        for r in range(rounds):
            order = BACKENDS[r % len(BACKENDS):] + BACKENDS[: r % len(BACKENDS)]
            for name in order:
                latency[name].append(latency_ms(runners[name], one, runs))
                throughput[name].append(round(_throughput(runners[name], batch, batches), 1))
        load["end"] = os.getloadavg()

    lat = {n: statistics.median(v) for n, v in latency.items()}
    thr = {n: statistics.median(v) for n, v in throughput.items()}
    sizes = report["sizes_bytes"]
    ratios = {}
    for name in BACKENDS[1:]:
        ratios[f"{name} ÷ pytorch (single-image latency)"] = round(lat[name] / lat["pytorch"], 3)
    for name in BACKENDS[1:]:
        ratios[f"{name} ÷ pytorch (batch-{THROUGHPUT_BATCH} images/s)"] = round(thr[name] / thr["pytorch"], 3)
    for name in BACKENDS[1:]:
        ratios[f"{name} - pytorch (test accuracy)"] = round(accuracy[name] - accuracy["pytorch"], 4)
    for name in BACKENDS[1:]:
        ratios[f"{name} ÷ pytorch (bytes)"] = round(sizes[name] / sizes["pytorch"], 3)
    return {
        "model": {"dir": str(model_dir) if found else "trained here (temp)", "arch": spec.arch,
                  "image_size": spec.image_size, "dataset_version": meta["dataset_version"],
                  "model_sha256": meta["model_sha256"], "trained_here": found is None},
        "threads": threads,
        "n_test": len(labels),
        "settings": {"runs": runs, "batches": batches, "batch_size": THROUGHPUT_BATCH, "rounds": rounds,
                     "export": load_params().export.model_dump(mode="json")},
        "latency_ms": lat,
        "latency_ms_per_round": latency,
        "throughput_images_per_second": thr,
        "throughput_per_round": throughput,
        "accuracy": accuracy,
        "export_report": {k: report[k] for k in ("parity", "int8", "sizes_bytes", "latency_ms", "opset",
                                                  "versions")},
        "export_seconds": round(export_seconds, 1),
        "load_average_1_5_15": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "warning": (f"1-min load average {load['start'][0]:.1f} on {os.cpu_count()} cores at the start: other "
                    "jobs were running; read the ratios (same run, rotated order), not absolute times")
        if load["start"][0] > (os.cpu_count() or 1) else None,
        "ratios": ratios,
    }
