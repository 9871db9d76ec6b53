"""The batched uint8 train preset (tasks/data.py) against per-sample torchvision transforms v2,
and what the tasks.augment presets (policies, resized crop, mixing) cost per batch.

Same work per image (random 2-px translation, horizontal flip, normalization) on real
28-px Fashion-MNIST images upsampled to 32 px, one thread. Baseline: the torchvision
reference-style pipeline applied per sample, as a DataLoader worker would.

`presets`: each tasks.augment preset over the same images in batches of 128 (one thread, as
the augmentation runs in the training loop's process), as ms per batch and as a ratio to the
batched default preset measured in this run; `train_step_ms` is a MobileNetV2 training step on
a batch of 128 at 32 px with the `train:` settings (threads, channels_last), measured here too,
so `share_of_train_step` says what a preset adds to each step.
"""

from __future__ import annotations

import time

import torch
from torchvision.transforms import v2

from tasks.augment import build_train_augment
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, build_train_transform
from tasks.params import AugmentParams

BATCH = 128
PRESETS = {
    "default": AugmentParams(),
    "trivialaugment": AugmentParams(policy="trivialaugment"),
    "randaugment_2x9": AugmentParams(policy="randaugment", randaugment_ops=2, randaugment_magnitude=9),
    "resized_crop": AugmentParams(resized_crop_scale=(0.6, 1.0)),
    "mixup_cutmix": AugmentParams(mixup_alpha=0.2, cutmix_alpha=1.0),
    "trivialaugment_erasing_mixup_cutmix": AugmentParams(policy="trivialaugment", erasing_p=0.25,
                                                         mixup_alpha=0.2, cutmix_alpha=1.0),
}


def _images(n: int) -> torch.Tensor:
    from tasks.formats import _read_idx
    from tasks.params import load_params

    root = load_params().ingest.source.path
    raw = torch.from_numpy(_read_idx(root / "train-images-idx3-ubyte.gz", 0x00000803)[:n].copy())
    return torch.nn.functional.interpolate(raw[:, None].float(), size=32, mode="bilinear").round().to(torch.uint8)


def _timed(fn) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _preset_seconds(images: torch.Tensor) -> dict[str, float]:
    labels = torch.zeros(len(images), dtype=torch.long)
    seconds = {}
    for name, aug in PRESETS.items():
        pipeline = build_train_augment(aug, n_classes=10)

        def run_preset(pipeline=pipeline):
            g = torch.Generator().manual_seed(0)
            for i in range(0, len(images), BATCH):
                pipeline(images[i : i + BATCH], labels[i : i + BATCH], generator=g)

        seconds[name] = _timed(run_preset)
    return seconds


def _train_step_seconds(steps: int = 3) -> float:
    """Seconds per MobileNetV2 training step (batch 128, 32 px, fp32) with the `train:` settings."""
    from tasks.models import build_model
    from tasks.params import load_params

    params = load_params().train
    threads = torch.get_num_threads()
    torch.set_num_threads(params.num_threads)
    model, _ = build_model(params.model, 10, weights=params.weights, image_size=params.image_size)
    model.train()
    fmt = torch.channels_last if params.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(BATCH, 3, params.image_size, params.image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.set_num_threads(threads)
    return (time.perf_counter() - t0) / steps


def run(size: int | None = None) -> dict:
    n = size or 8192
    torch.set_num_threads(1)
    images = _images(n)
    augment, normalize = build_train_transform(AugmentParams(flip_p=0.5, pad_crop=2, erasing_p=0.0))
    per_sample = v2.Compose([
        v2.RandomCrop(32, padding=2),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(lambda x: x.expand(3, -1, -1)),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    def batched():
        for i in range(0, n, BATCH):
            normalize(augment(images[i : i + BATCH]))

    def sample_wise():
        for i in range(0, n, BATCH):
            torch.stack([per_sample(x) for x in images[i : i + BATCH]])

    timings = {name: _timed(fn) for name, fn in (("per_sample_v2", sample_wise), ("batched_preset", batched))}
    presets = _preset_seconds(images)
    batches = -(-n // BATCH)
    step = _train_step_seconds()
    return {
        "images": n,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "images_per_second": {k: round(n / v) for k, v in timings.items()},
        "ratios": {"batched_preset speed-up over per_sample_v2": timings["per_sample_v2"] / timings["batched_preset"]},
        "presets": {
            "batch": BATCH,
            "ms_per_batch": {k: round(1000 * v / batches, 3) for k, v in presets.items()},
            "time / default": {k: round(v / presets["default"], 2) for k, v in presets.items() if k != "default"},
            "train_step_ms": round(1000 * step, 1),
            "share_of_train_step": {k: round(v / batches / step, 4) for k, v in presets.items()},
        },
    }
