"""The trainer against a bare PyTorch loop, and linear probe against full fine-tuning.

Data: `size` train images (default 6,000) and as many test images (at most all of them),
sampled with seed 0 from the curated version (data/curate, rows not excluded) into a subset
curate folder in a temp dir; the images stay where they are. Settings: the `train:` section
of params.yaml (MobileNetV2, ImageNet weights, 32 px, batch 128, AdamW, channels_last, bf16 auto).

1. throughput: tasks.train.train for 1 epoch against a bare loop over the same uint8 tensor,
   already decoded: the same model (tasks.models.build_model), batch size, normalize, AdamW,
   channels_last, bf16 and compile settings; random batches; no augmentation, schedule, validation or
   bookkeeping. Interleaved bare, trainer, bare, ... (3 trainer runs, 4 bare) after an untimed warm-up loop.
   The trainer's rate is model.json's `images_per_second`: images trained on ÷ the training
   loop's seconds (its validation pass included; decoding the images and building the model
   excluded). Ratio: mean trainer rate ÷ mean bare rate (goal ≥ 0.9); each trainer run over the
   mean of the bare runs either side of it is reported too (their spread shows the noise).
2. finetune: train.finetune=linear_probe and full, `train.epochs` epochs each on the same
   subset: test accuracy on the test subset, training-loop seconds (model.json
   `seconds.train`), trainable parameters (model.json `parameters`).
3. detection: bench/detection.py's figures, nested, when that module exists (run first).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from tasks.data import Normalize, build_eval_transform, image_channels, label_indices, load_images
from tasks.io import atomic_write_json, read_json, save_table
from tasks.models import bf16_supported, build_model
from tasks.params import TrainParams, load_params
from tasks.train import load_trained, load_training_rows, predict_logits, resolve_device, train

DEFAULT_SIZE = 6000
# OpenMP's spin-waiting makes 2 threads ~20x slower on 2 cores busy with other jobs; recorded with the figures
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def default_source() -> Path:
    """The project's curated version (`paths.data`/curate), or an error saying how to make it."""
    source = load_params().paths.data / "curate"
    if not (source / "curation.json").is_file():
        raise FileNotFoundError(f"{source}/curation.json not found: run `.venv/bin/pixelops run` "
                                "(or `dvc repro curate`) first, or pass source= a curate folder")
    return source


def make_subset(source: Path, dest: Path, *, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A curate folder in `dest` with `n_train` train and `n_test` test rows of `source`.

    source: a curate folder (manifest.parquet, curation.json); excluded rows are left out.
    Rows are sampled with `seed`; curation.json points at the source's images (absolute path).
    Raises ValueError when a split has fewer rows than asked.
    """
    rows, _, version, images_root = load_training_rows(Path(source))
    parts = []
    for split, n in (("train", n_train), ("test", n_test)):
        pool = rows[rows["split"] == split]
        if len(pool) < n:
            raise ValueError(f"{source}: {len(pool)} {split} rows, {n} asked (lower --size)")
        parts.append(pool.sample(n=n, random_state=seed))
    subset = pd.concat(parts).reset_index(drop=True)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_table(pa.Table.from_pandas(subset, preserve_index=False), dest / "manifest.parquet")
    atomic_write_json(dest / "curation.json", {"version": f"{version}-bench-{n_train}-{n_test}-s{seed}",
                                               "images_root": str(images_root.resolve())})
    return dest


def split_size(source: Path, split: str) -> int:
    rows, *_ = load_training_rows(Path(source))
    return int((rows["split"] == split).sum())


def decode_split(curate_dir: Path, split: str, *, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, label indices) of one split, decoded as the trainer decodes."""
    rows, classes, _, images_root = load_training_rows(Path(curate_dir))
    rows = rows[rows["split"] == split].reset_index(drop=True)
    images = load_images(rows, images_root, size=image_size, channels=image_channels(rows))
    return images, label_indices(rows, classes)


def model_accuracy(model_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of a train output folder's model on decoded uint8 images, as tasks.evaluate scores it."""
    model, spec, _ = load_trained(Path(model_dir))
    logits = predict_logits(model, images, build_eval_transform(mean=spec.mean, std=spec.std), batch_size=512,
                            device=torch.device("cpu"), channels_last=False, bf16=False)
    return float((logits.argmax(1) == labels).float().mean())


def _bare_loop(p: TrainParams, images: torch.Tensor, labels: torch.Tensor, *, n_classes: int, steps: int,
               seed: int) -> float:
    """Images/s of the plain loop the trainer wraps: random batches of `images`, nothing else."""
    torch.set_num_threads(p.num_threads)
    torch.manual_seed(seed)
    device = resolve_device(p.device)
    model, spec = build_model(p.model, n_classes, weights=p.weights, image_size=p.image_size,
                              allow_download=p.allow_download)
    model, normalize = model.to(device), Normalize(spec.mean, spec.std).to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if p.compile else model  # as the trainer (train.compile)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    bf16 = bf16_supported(device) if p.bf16 == "auto" else bool(p.bf16)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (p.batch_size,), generator=gen)
        x = normalize(images[idx].to(device))
        if p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * p.batch_size / (time.perf_counter() - t0)


def _trainer(subset: Path, p: TrainParams, out_dir: Path) -> dict:
    """tasks.train.train on the subset; its model.json, plus the wall time of the whole call."""
    t0 = time.perf_counter()
    train(subset, params=p, out_dir=out_dir, seed=0, cache_dir=None)
    meta = read_json(out_dir / "model.json")
    meta["wall_seconds"] = time.perf_counter() - t0
    return meta


def _throughput(subset: Path, p: TrainParams, tmp: Path, *, repeats: int) -> dict:
    images, labels = decode_split(subset, "train", image_size=p.image_size)
    n_classes = len(load_training_rows(subset)[1])
    n_fit = len(images) - round(len(images) * p.val_fraction)  # the trainer's share after its val carve-out
    steps = math.ceil(n_fit / p.batch_size)
    one_epoch = p.model_copy(update={"epochs": 1, "resume": False})
    _bare_loop(p, images, labels, n_classes=n_classes, steps=min(steps, 3), seed=99)  # warm-up, untimed
    bare, runs = [], []
    for i in range(repeats + 1):
        bare.append(_bare_loop(p, images, labels, n_classes=n_classes, steps=steps, seed=i))
        if i < repeats:
            runs.append(_trainer(subset, one_epoch, tmp / f"trainer-{i}"))
    trainer = [m["images_per_second"] for m in runs]
    epoch_only = [m["n_train"] / m["history"][0]["seconds"] for m in runs]
    neighbours = [t / ((bare[i] + bare[i + 1]) / 2) for i, t in enumerate(trainer)]
    return {
        "images_per_epoch": n_fit,
        "steps_per_epoch": steps,
        "order": "warm-up, " + ", ".join(["bare", "trainer"] * repeats + ["bare"]),
        "bare_images_per_second": [round(v, 1) for v in bare],
        "trainer_images_per_second": trainer,
        "trainer_epoch_only_images_per_second": [round(v, 1) for v in epoch_only],
        "trainer_seconds": [m["seconds"] for m in runs],
        "trainer_wall_seconds": [round(m["wall_seconds"], 2) for m in runs],
        "trainer_over_neighbouring_bare": [round(r, 3) for r in neighbours],
        "trainer_over_neighbouring_bare_median": statistics.median(neighbours),
        "ratio": sum(trainer) / len(trainer) / (sum(bare) / len(bare)),
        "ratio_epoch_only": sum(epoch_only) / len(epoch_only) / (sum(bare) / len(bare)),
        "note": "trainer rate = model.json images_per_second: training loop only (augmentation, schedule, "
                "loss.item(), validation pass included); decode and model build excluded. "
                "epoch_only: the epoch's steps alone (history seconds), validation excluded.",
    }


def _finetune(subset: Path, p: TrainParams, tmp: Path) -> dict:
    test_x, test_y = decode_split(subset, "test", image_size=p.image_size)
    modes = {}
    for mode in ("linear_probe", "full"):
        meta = _trainer(subset, p.model_copy(update={"finetune": mode, "resume": False}), tmp / mode)
        modes[mode] = {"test_accuracy": model_accuracy(tmp / mode, test_x, test_y),
                       "best_val_accuracy": meta["best_val_accuracy"],
                       "parameters": meta["parameters"], "seconds": meta["seconds"],
                       "images_per_second": meta["images_per_second"]}
    probe, full = modes["linear_probe"], modes["full"]
    return {
        "epochs": p.epochs,
        "n_test": len(test_y),
        "modes": modes,
        "accuracy_gap_full_minus_probe": full["test_accuracy"] - probe["test_accuracy"],
        "train_seconds_ratio_probe_over_full": probe["seconds"]["train"] / full["seconds"]["train"],
        "trainable_parameters": {m: v["parameters"]["trainable"] for m, v in modes.items()},
    }


def _detection(out: Path | None) -> dict | None:
    """bench/detection.py's figures at its own default size, its files under `out`/detection (default:
    its own folder), or None when that module is absent."""
    if importlib.util.find_spec("bench.detection") is None:
        return None
    detection = importlib.import_module("bench.detection")
    t0 = time.perf_counter()
    figures = detection.run(size=None, **({"out": Path(out) / "detection"} if out is not None else {}))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return figures


def run(size: int | None = None, out: Path | None = None, *, source: Path | None = None, repeats: int = 3,
        epochs: int | None = None, overrides: list[str] | None = None, detection: bool = True) -> dict:
    """Figures of this benchmark (module docstring).

    size:      train images in the subset (test: as many, at most all); default 6,000.
    out:       a folder for files: bench/detection.py's go under `out`/detection.
    source:    the curate folder to sample from; default `paths.data`/curate.
    repeats:   trainer runs in the throughput figure (bare runs: one more).
    epochs:    for the finetune figure; default `train.epochs`.
    overrides: `train.key=value` overrides of params.yaml for both figures (tests shrink with them).
    detection: run bench/detection.py too when it exists.
    """
    size = size or DEFAULT_SIZE
    source = Path(source) if source is not None else default_source()
    p = load_params(overrides=overrides).train
    p = p.model_copy(update={"epochs": epochs or p.epochs})
    # Detection first (about half a minute): a failure there ends the run before the long part.
    nested = _detection(out) if detection else None
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-train-") as tmp:
        tmp = Path(tmp)
        n_test = min(size, split_size(source, "test"))
        subset = make_subset(source, tmp / "curate", n_train=size, n_test=n_test)
        throughput = _throughput(subset, p, tmp, repeats=repeats)
        load["after_throughput"] = os.getloadavg()
        finetune = _finetune(subset, p, tmp)
        load["after_finetune"] = os.getloadavg()
    figures = {
        "size": size,
        "n_test": n_test,
        "source": str(source),
        "overrides": overrides or [],
        "settings": {k: p.model_dump(mode="json")[k] for k in ("model", "weights", "image_size", "batch_size", "lr",
                                                                "weight_decay", "num_threads", "device", "bf16",
                                                                "channels_last", "epochs")},
        "throughput": throughput,
        "finetune": finetune,
        "load_average_1_5_15": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "environment": {k: os.environ.get(k) for k in THREAD_ENV},
        "warning": (f"1-min load average {load['start'][0]:.1f} on {os.cpu_count()} cores at the start: other jobs "
                    "were running; the interleaved ratio is the figure to read, absolute rates are inflated")
        if load["start"][0] > (os.cpu_count() or 1) else None,
        "ratios": {
            "trainer / bare loop (images/s, training loop)": throughput["ratio"],
            "trainer epoch only / bare loop (images/s)": throughput["ratio_epoch_only"],
            "trainer / neighbouring bare runs (median)": throughput["trainer_over_neighbouring_bare_median"],
            "linear_probe / full (training seconds)": finetune["train_seconds_ratio_probe_over_full"],
            "full - linear_probe (test accuracy)": finetune["accuracy_gap_full_minus_probe"],
        },
    }
    figures["detection"] = nested if nested is not None else (
        "skipped" if not detection else "bench/detection.py not present")
    if nested is not None:
        figures["ratios"].update({f"detection: {k}": v for k, v in nested.get("ratios", {}).items()})
    return figures
