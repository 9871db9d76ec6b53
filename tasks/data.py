"""Images into tensors, and the train / eval augmentation presets.

Images are decoded once per stage into one uint8 tensor (N, C, S, S) at the training
resolution. The presets then work on whole batches of uint8 tensors: on 28-px images a
per-sample Python transform pipeline costs more than the model's forward pass on 2 cores,
while batched tensor ops cost microseconds (see bench/).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tasks.gate import SINGLE_CHANNEL_MODES, load_canonical
from tasks.params import AugmentParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_images(rows: pd.DataFrame, images_root: Path, *, size: int, channels: int) -> torch.Tensor:
    """Decode each row's image, resize to size×size, return uint8 (N, channels, size, size).

    Pixels come from `gate.load_canonical`, the one mode/EXIF policy ingest, training,
    evaluation and FiftyOne share (palette, alpha, CMYK, 16-bit and orientation handled there).
    """
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty((len(rows), channels, size, size), dtype=torch.uint8)
    root = Path(images_root)
    for i, rel in enumerate(rows["path"]):
        arr = np.asarray(load_canonical((root / rel).read_bytes(), mode=mode))
        img = torch.from_numpy(arr.copy()).view(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
        out[i] = img
    return out


def image_channels(rows: pd.DataFrame) -> int:
    """1 when every image is single-channel by the gate's policy (kept small in memory and
    expanded per batch), else 3."""
    return 1 if set(rows["mode"].unique()) <= SINGLE_CHANNEL_MODES else 3


def label_indices(rows: pd.DataFrame, classes: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[name] for name in rows["label"]], dtype=torch.long)


def split_train_val(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible train/val carve-out: the same seed and n give the same split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class Normalize(torch.nn.Module):
    """uint8 (B, C, H, W) → float, expanded to the model's channels, normalized."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3):
        super().__init__()
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std


class TrainAugment(torch.nn.Module):
    """Per-sample random translation (pad + crop), horizontal flip and erasing on a batch."""

    def __init__(self, *, flip_p: float, pad_crop: int, erasing_p: float):
        super().__init__()
        self.flip_p, self.pad, self.erasing_p = flip_p, pad_crop, erasing_p

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.pad:
            # Translate each sample independently: pad, then gather a shifted h×w window.
            c, pad = x.shape[1], self.pad
            padded = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
            rows = (dy[:, None] + torch.arange(h)).view(b, 1, h, 1).expand(-1, c, -1, w + 2 * pad)
            cols = (dx[:, None] + torch.arange(w)).view(b, 1, 1, w).expand(-1, c, h, -1)
            x = padded.gather(2, rows).gather(3, cols)
        if self.flip_p:
            flip = torch.rand(b, generator=generator) < self.flip_p
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        if self.erasing_p:
            x = _random_erase(x, self.erasing_p, generator)
        return x


def _random_erase(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Erase one random rectangle (2–33% of the area) per selected sample, as RandomErasing."""
    b, _, h, w = x.shape
    chosen = torch.rand(b, generator=generator) < p
    area = torch.empty(b).uniform_(0.02, 0.33, generator=generator) * h * w
    eh = area.sqrt().clamp(1, h).long()
    ew = (area / eh).clamp(1, w).long()
    y0 = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    mask = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1))
            & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1)) & chosen.view(b, 1, 1))
    return x.masked_fill(mask[:, None], 0)


def build_train_transform(aug: AugmentParams, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3):
    """(augment, normalize) for training batches, from `train.augment`: the batched default ops.

    Policies, resized crop and MixUp/CutMix are in tasks.augment.build_train_augment, which
    equals this augment bit for bit when those are off.
    """
    return TrainAugment(flip_p=aug.flip_p, pad_crop=aug.pad_crop, erasing_p=aug.erasing_p), \
        Normalize(mean, std, channels)


def build_eval_transform(*, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3) -> Normalize:
    """Deterministic eval preset: normalization only (resizing happened at decode)."""
    return Normalize(mean, std, channels)
