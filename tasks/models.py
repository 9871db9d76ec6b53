"""Model builders: torchvision architectures with pretrained weights from local files only.

`build_model(arch, n_classes, weights=..., image_size=...)` returns the model with its head
replaced for the dataset's classes, plus what it needs to be rebuilt and normalized.
`resnet18_small` is ResNet-18 adapted to small images (3×3 stride-1 stem, no max-pool),
the usual CIFAR-style change. For MobileNetV2 at ≤ 64 px the stem's stride is set to 1 so the
last feature map keeps a spatial extent (32 px in → 2×2 instead of 1×1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision import models

from tasks.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.weights import load_state_dict, resolve_weights

ARCHS = ("mobilenet_v2", "resnet18", "resnet18_small")
SMALL_IMAGE = 64  # at or below this size the stem keeps full resolution


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model for evaluation or export."""

    arch: str
    n_classes: int
    image_size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    weights: str | None = None
    weights_sha256: str | None = None
    extra: dict = field(default_factory=dict)


def _torchvision_arch(arch: str) -> str:
    return "resnet18" if arch == "resnet18_small" else arch


def _skeleton(arch: str, image_size: int) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; allowed: {', '.join(ARCHS)}")
    model = getattr(models, _torchvision_arch(arch))(weights=None)
    return model


def _adapt_small(model: nn.Module, arch: str, image_size: int) -> None:
    if arch == "resnet18_small":
        old = model.conv1
        model.conv1 = nn.Conv2d(3, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif arch == "mobilenet_v2" and image_size <= SMALL_IMAGE:
        model.features[0][0].stride = (1, 1)


def _replace_head(model: nn.Module, arch: str, n_classes: int) -> None:
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, n_classes)


def build_model(arch: str, n_classes: int, *, weights: str | None, image_size: int) -> tuple[nn.Module, ModelSpec]:
    """Build `arch` for `n_classes`, loading `weights` (torchvision name or file path) if given."""
    model = _skeleton(arch, image_size)
    spec = ModelSpec(arch=arch, n_classes=n_classes, image_size=image_size, weights=weights)
    if weights:
        path, digest, meta = resolve_weights(_torchvision_arch(arch), weights)
        state = load_state_dict(path)
        if arch == "resnet18_small":
            state.pop("conv1.weight", None)  # the 3×3 stem has no pretrained counterpart
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("conv1")]:
            raise ValueError(f"{path}: does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        spec.weights_sha256 = digest
        spec.extra["weights_file"] = str(path)
    _adapt_small(model, arch, image_size)
    _replace_head(model, arch, n_classes)
    return model, spec


def rebuild_model(spec: ModelSpec, state_dict: dict) -> nn.Module:
    """The trained model from its spec and saved state (no pretrained file needed)."""
    model = _skeleton(spec.arch, spec.image_size)
    _adapt_small(model, spec.arch, spec.image_size)
    _replace_head(model, spec.arch, spec.n_classes)
    model.load_state_dict(state_dict)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def bf16_supported(device: torch.device) -> bool:
    """Whether `bf16: auto` turns autocast on: CUDA devices with native bf16.

    On CPU, bf16 autocast was measured slower than fp32 for MobileNetV2 at 32 px on this
    project's 2-core AVX-512 machines (depthwise convolutions fall off oneDNN's fast path;
    see bench/ and README), so CPU users opt in with `train.bf16: true`.
    """
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
