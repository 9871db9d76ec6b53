"""Train-time augmentation presets on whole uint8 batches, and normalization from weights metadata.

Input:  a uint8 batch (B, C, S, S) of decoded training images (tasks.data.load_images), its long
        labels (B,), and the training run's `torch.Generator`.
Output: (x, target): x uint8 (B, C, S, S), or float32 in 0..255 after MixUp; target the long
        labels, or soft float targets (B, n_classes) when MixUp/CutMix is on.
Params: `train.augment` (tasks.params.AugmentParams).

Order, as in torchvision's classification reference presets:
  1. geometry: RandomResizedCrop when `resized_crop_scale` is set (batched, per-sample scale and
     aspect ratio, one `grid_sample` on the batch); otherwise the pad-and-crop translation by up
     to `pad_crop` px (pad_crop is then ignored: the resized crop already moves the content);
  2. horizontal flip (`flip_p`);
  3. `policy`: torchvision v2 TrivialAugmentWide or RandAugment(`randaugment_ops`,
     `randaugment_magnitude`), per sample on uint8 tensors (the only per-sample step);
  4. random erasing (`erasing_p`);
  5. MixUp (`mixup_alpha`) / CutMix (`cutmix_alpha`); with both on, one of the two per batch,
     each with probability 1/2 (as timm and torchvision's reference do).

With the default params (policy none, no resized crop, no mixing) the pipeline is
tasks.data.TrainAugment, bit for bit, consuming the generator in the same order, so runs and
exact resume are unchanged.

Reproducibility: every random draw comes from `generator`. torchvision v2 policies and
`torch.distributions.Beta` only read torch's global RNG, so those stages draw one 63-bit seed
from `generator`, run inside `torch.random.fork_rng` with the global RNG seeded by it, and leave
the global RNG exactly as it was (dropout and anything else that uses it is unaffected).

Loss: `F.cross_entropy(logits, target, label_smoothing=eps)` takes both kinds of target. With
soft targets PyTorch smooths the mixed distribution, (1 - eps) * target + eps / n_classes, which
equals mixing the two smoothed one-hot labels (smoothing is linear), as timm's Mixup does.

Normalization: `normalization_for(arch, weights)` reads mean/std from the torchvision weights
entry's preset (`weights.transforms()`), ImageNet's for files and random init.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.data import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, _random_erase
from tasks.params import AugmentParams

POLICIES = ("none", "trivialaugment", "randaugment")
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
CROP_ATTEMPTS = 10           # RandomResizedCrop's tries before it falls back to a centre crop


@contextmanager
def seeded_global_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Run the block with torch's global CPU RNG seeded from `generator`, then restore it.

    For code that only reads the global RNG (torchvision v2 transforms, torch.distributions):
    it becomes a function of `generator`'s state, which consumes exactly one int64 draw.
    """
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _crop_boxes(b: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width) per sample, drawn as RandomResizedCrop.get_params does.

    All CROP_ATTEMPTS tries are drawn at once and each sample keeps its first box that fits;
    samples where none fits get RandomResizedCrop's fallback: a centred box, the whole image
    when its aspect ratio is within `ratio`.
    """
    area = torch.empty(b, CROP_ATTEMPTS).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    log_ratio = torch.empty(b, CROP_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                        generator=generator)
    aspect = log_ratio.exp()
    cw = (area * aspect).sqrt().round().long()
    ch = (area / aspect).sqrt().round().long()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # index of the first True (0 when none)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    fw, fh = _fallback_box(h, w, ratio)
    found = fits.any(1)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = (torch.rand(b, generator=generator) * (h - ch + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - cw + 1)).long()
    top = torch.where(found, top, (h - ch) // 2)  # the fallback box is centred
    left = torch.where(found, left, (w - cw) // 2)
    return top, left, ch, cw


def _fallback_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = w / h
    if in_ratio < min(ratio):
        return w, round(w / min(ratio))
    if in_ratio > max(ratio):
        return round(h * max(ratio)), h
    return w, h


def _source_coords(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """grid_sample coordinates (B, size) that resize the span [start, start + length) to `size` px.

    As `F.interpolate(mode="bilinear", align_corners=False)` on the cropped span: half-pixel
    centres, clamped to the span's first and last pixel (never reading past the crop's edge).
    """
    out = torch.arange(size, dtype=torch.float32)
    src = (out + 0.5) * (length.float()[:, None] / size) - 0.5
    src = src.clamp(min=0).minimum(length.float()[:, None] - 1) + start.float()[:, None]
    return (2 * src + 1) / size - 1  # pixel index → [-1, 1] with align_corners=False


def resized_crop(x: torch.Tensor, scale: tuple[float, float], *, ratio: tuple[float, float] = CROP_RATIO,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop on a uint8 batch: a random box per sample, resized back to (H, W).

    One bilinear `grid_sample` resizes every box at once, matching torchvision's crop-then-resize
    to rounding. Boxes are never larger than the image, so each is upsampled and antialiasing
    would change nothing. Returns uint8 (B, C, H, W).
    """
    b, _, h, w = x.shape
    top, left, ch, cw = _crop_boxes(b, h, w, scale, ratio, generator)
    gy, gx = _source_coords(top, ch, h), _source_coords(left, cw, w)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, H, W, [x, y])
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def build_policy(aug: AugmentParams):
    """The torchvision v2 policy transform for `aug.policy`, or None for `none`."""
    from torchvision.transforms import v2

    if aug.policy == "none":
        return None
    if aug.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    if aug.policy == "randaugment":
        return v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude)
    raise ValueError(f"unknown augment.policy {aug.policy!r}; allowed: {', '.join(POLICIES)}")


def apply_policy(x: torch.Tensor, policy, generator: torch.Generator | None) -> torch.Tensor:
    """`policy` on each sample of a uint8 batch, its randomness seeded from `generator`.

    Per sample because v2 policies pick one op and magnitude per call: on a batch they would
    apply the same op to every image.
    """
    with seeded_global_rng(generator):
        return torch.stack([policy(img) for img in x])


def _one_hot(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(y, n_classes).float()


def mixup(x: torch.Tensor, y: torch.Tensor, *, alpha: float, n_classes: int,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: sample i becomes lam * x[i] + (1 - lam) * x[i - 1], one lam ~ Beta(alpha, alpha) per batch.

    Pairing with the batch rolled by one (as torchvision v2 MixUp) mixes exactly two samples per
    output. Returns float32 images in 0..255 and the same mix of one-hot targets.
    """
    with seeded_global_rng(generator):
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x = x.float()
    mixed = x.mul(lam).add_(x.roll(1, 0), alpha=1 - lam)
    target = _one_hot(y, n_classes)
    return mixed, target.mul(lam).add_(target.roll(1, 0), alpha=1 - lam)


def cutmix(x: torch.Tensor, y: torch.Tensor, *, alpha: float, n_classes: int,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: one box per batch in every sample i is pasted from x[i - 1] (as torchvision v2 CutMix).

    lam ~ Beta(alpha, alpha) sizes the box (area 1 - lam, clipped at the border); the targets
    use the pasted box's true area share. Returns uint8 images and soft targets.
    """
    _, _, h, w = x.shape
    with seeded_global_rng(generator):
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    cy, cx = (int(torch.randint(n, (), generator=generator)) for n in (h, w))
    half = 0.5 * math.sqrt(1 - lam)
    rh, rw = int(half * h), int(half * w)
    y0, y1 = max(cy - rh, 0), min(cy + rh, h)
    x0, x1 = max(cx - rw, 0), min(cx + rw, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x.roll(1, 0)[:, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    target = _one_hot(y, n_classes)
    return out, target.mul(kept).add_(target.roll(1, 0), alpha=1 - kept)


class TrainAugmentPipeline:
    """The train preset: geometry, flip, policy, erasing, mixing (see the module docstring).

    Call with a uint8 batch, its long labels and the run's generator; returns (x, target).
    `soft_targets` says whether target is (B, n_classes) float (mixing on) or the labels.
    """

    def __init__(self, aug: AugmentParams, *, n_classes: int):
        self.aug, self.n_classes = aug, n_classes
        # pad/flip reuse TrainAugment itself so the default path is the existing code.
        pad = aug.pad_crop if aug.resized_crop_scale is None else 0
        self.batched = TrainAugment(flip_p=aug.flip_p, pad_crop=pad, erasing_p=0.0)
        self.policy = build_policy(aug)
        self.soft_targets = bool(aug.mixup_alpha or aug.cutmix_alpha)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(x, y, self.n_classes if self.soft_targets else None)
        if self.aug.resized_crop_scale is not None:
            x = resized_crop(x, self.aug.resized_crop_scale, generator=generator)
        x = self.batched(x, generator=generator)
        if self.policy is not None:
            x = apply_policy(x, self.policy, generator)
        if self.aug.erasing_p:
            x = _random_erase(x, self.aug.erasing_p, generator)
        return self._mix(x, y, generator)

    def _mix(self, x, y, generator):
        mixup_alpha, cutmix_alpha = self.aug.mixup_alpha, self.aug.cutmix_alpha
        if not (mixup_alpha or cutmix_alpha):
            return x, y
        use_cutmix = bool(cutmix_alpha) and (
            not mixup_alpha or bool(torch.rand((), generator=generator) < 0.5))
        if use_cutmix:
            return cutmix(x, y, alpha=cutmix_alpha, n_classes=self.n_classes, generator=generator)
        return mixup(x, y, alpha=mixup_alpha, n_classes=self.n_classes, generator=generator)

    def __repr__(self) -> str:
        return f"TrainAugmentPipeline({self.aug!r}, n_classes={self.n_classes})"


def _check_batch(x: torch.Tensor, y: torch.Tensor, n_classes: int | None) -> None:
    """Shapes and dtype; label range only when mixing turns labels into one-hot rows."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"augment: expected a uint8 batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"augment: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if n_classes is not None and len(y) and not 0 <= int(y.min()) <= int(y.max()) < n_classes:
        raise ValueError(f"augment: labels {int(y.min())}..{int(y.max())} outside 0..{n_classes - 1}")


def build_train_augment(aug: AugmentParams, *, n_classes: int) -> TrainAugmentPipeline:
    """The train augmentation preset from `train.augment`, for `n_classes` (needed by mixing).

    Raises ValueError for an unknown policy (listing the allowed ones) or n_classes < 1.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes={n_classes}: must be >= 1")
    return TrainAugmentPipeline(aug, n_classes=n_classes)


def _is_weights_file(weights: str) -> bool:
    # The same rule as tasks.weights.resolve_weights: a .pth/.pt suffix or an existing file.
    path = Path(weights).expanduser()
    return path.suffix in {".pth", ".pt"} or path.is_file()


def normalization_for(arch: str, weights: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the weights were trained with: from the torchvision weights entry's preset.

    `weights` one of `arch`'s torchvision weights names (e.g. IMAGENET1K_V1):
    `get_model_weights(arch)[name].transforms()` (the entry's `meta` has no mean/std; building
    the preset downloads nothing; e.g. efficientnet_v2_l IMAGENET1K_V1 has 0.5/0.5). Anything
    else (a file path, `pretrain`, None, a preset without mean/std): ImageNet's.
    Raises ValueError for an `arch` torchvision does not know.
    """
    if not weights or _is_weights_file(weights):
        return IMAGENET_MEAN, IMAGENET_STD
    from torchvision.models import get_model_weights

    from tasks.models import _torchvision_arch

    entry = get_model_weights(_torchvision_arch(arch)).__members__.get(weights)  # aliases too (DEFAULT)
    preset = entry.transforms() if entry is not None else None
    if getattr(preset, "mean", None) is None:  # detection presets normalize inside the model
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std)
