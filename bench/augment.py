"""The batched uint8 train preset (tasks/data.py) against per-sample torchvision transforms v2.

Same work per image (random 2-px translation, horizontal flip, normalization) on real
28-px Fashion-MNIST images upsampled to 32 px, one thread. Baseline: the torchvision
reference-style pipeline applied per sample, as a DataLoader worker would.
"""

from __future__ import annotations

import time

import torch
from torchvision.transforms import v2

from tasks.data import IMAGENET_MEAN, IMAGENET_STD, build_train_transform
from tasks.params import AugmentParams


def _images(n: int) -> torch.Tensor:
    from tasks.formats import _read_idx
    from tasks.params import load_params

    root = load_params().ingest.source.path
    raw = torch.from_numpy(_read_idx(root / "train-images-idx3-ubyte.gz", 0x00000803)[:n].copy())
    return torch.nn.functional.interpolate(raw[:, None].float(), size=32, mode="bilinear").round().to(torch.uint8)


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
    batch = 128

    def batched():
        for i in range(0, n, batch):
            normalize(augment(images[i : i + batch]))

    def sample_wise():
        for i in range(0, n, batch):
            torch.stack([per_sample(x) for x in images[i : i + batch]])

    timings = {}
    for name, fn in (("per_sample_v2", sample_wise), ("batched_preset", batched)):
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
    return {
        "images": n,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "images_per_second": {k: round(n / v) for k, v in timings.items()},
        "ratios": {"batched_preset speed-up over per_sample_v2": timings["per_sample_v2"] / timings["batched_preset"]},
    }
