"""Model builders: torchvision architectures with pretrained weights from local files only.

`build_model(arch, n_classes, weights=..., image_size=...)` returns the model with its head
replaced for the dataset's classes, plus what it needs to be rebuilt and normalized.
Architectures (ARCHS): ResNet-18/34/50, MobileNetV2, MobileNetV3 small/large, EfficientNet
B0/B1 from torchvision's builders. `resnet18_small` is ResNet-18 adapted to small images
(3×3 stride-1 stem, no max-pool), the usual CIFAR-style change. For MobileNets and
EfficientNets at ≤ 64 px the stem's stride is set to 1 so the last feature map keeps a
spatial extent (32 px in → 2×2 instead of 1×1).

Weights (`weights=`): a torchvision name (the file is looked up in torch's hub cache and its
sha256 checked, tasks.weights), a .pth file, or a PixelOps model.pt from an earlier run
(pretraining, tasks.pretrain): its head is dropped, and its model.json becomes the lineage
(`spec.extra["pretrained_from"]`).

`set_finetune(model, arch, mode, trainable_stages)` chooses what trains (see FINETUNE_MODES);
`set_train_mode(model)` is `model.train()` with the frozen parts' BatchNorm kept in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from tasks.augment import normalization_for
from tasks.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.weights import load_state_dict, resolve_weights

ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50",
         "resnet18_small", "efficientnet_b0", "efficientnet_b1")
FINETUNE_MODES = ("full", "linear_probe", "partial", "lora")
# The classification layer the new head replaces, per family.
HEADS = {"resnet": "fc", "mobilenet_v2": "classifier.1", "mobilenet_v3": "classifier.3",
         "efficientnet": "classifier.1"}
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
    elif not arch.startswith("resnet") and image_size <= SMALL_IMAGE:
        model.features[0][0].stride = (1, 1)  # MobileNets, EfficientNets: the stem conv


def _replace_head(model: nn.Module, arch: str, n_classes: int) -> None:
    old = model.get_submodule(head_name(arch))
    parent, _, leaf = head_name(arch).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Linear(old.in_features, n_classes))


def _is_head_key(arch: str, key: str) -> bool:
    return key.startswith(head_name(arch) + ".")


def _pretrained_state(arch: str, weights: str, allow_download: bool) -> tuple[dict, str, dict]:
    """(state_dict without a foreign head, sha256, extra spec facts) for `weights`."""
    path, digest, _meta = resolve_weights(_torchvision_arch(arch), weights, allow_download=allow_download)
    state = load_state_dict(path)
    extra = {"weights_file": str(path)}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        # A PixelOps model.pt (pretraining): its head belongs to the source's classes.
        state = {k: v for k, v in state["state_dict"].items() if not _is_head_key(arch, k)}
        extra["pretrained_from"] = pretrained_lineage(path)
    if arch == "resnet18_small":
        state.pop("conv1.weight", None)  # the 3×3 stem has no pretrained counterpart
    return state, digest, extra


def pretrained_lineage(weights_file: Path) -> dict | None:
    """What a PixelOps weights file was trained on: from the model.json beside it."""
    from tasks.io import read_json

    meta_path = Path(weights_file).with_name("model.json")
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    return {"model_sha256": meta.get("model_sha256"), "dataset_version": meta.get("dataset_version"),
            "classes": meta.get("classes"), "arch": meta.get("spec", {}).get("arch"),
            "image_size": meta.get("spec", {}).get("image_size"),
            "pretrained_from": meta.get("spec", {}).get("extra", {}).get("pretrained_from")}


def build_model(arch: str, n_classes: int, *, weights: str | None, image_size: int,
                allow_download: bool = False) -> tuple[nn.Module, ModelSpec]:
    """Build `arch` for `n_classes`, loading `weights` (torchvision name or file path) if given.

    The head is always new (seeded by torch's global RNG). Raises WeightsError when the file is
    missing (downloaded only with `allow_download`) or its hash is wrong, ValueError when its
    tensors do not fit `arch`.
    """
    model = _skeleton(arch, image_size)
    mean, std = normalization_for(_torchvision_arch(arch), weights)  # the weights' own preset
    spec = ModelSpec(arch=arch, n_classes=n_classes, image_size=image_size, weights=weights, mean=mean, std=std)
    if weights:
        state, digest, extra = _pretrained_state(arch, weights, allow_download)
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed_missing = [k for k in missing if not (k.startswith("conv1") and arch == "resnet18_small")
                           and not (_is_head_key(arch, k) and "pretrained_from" in extra)]
        if unexpected or allowed_missing:
            raise ValueError(f"{weights}: does not fit {arch}: missing {allowed_missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        spec.weights_sha256 = digest
        spec.extra.update(extra)
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


def head_name(arch: str) -> str:
    """The replaced classification layer: `fc` (ResNet), `classifier.1` (MobileNetV2,
    EfficientNet) or `classifier.3` (MobileNetV3)."""
    family = next((f for f in HEADS if arch.startswith(f)), None)
    if family is None:
        raise ValueError(f"unknown model {arch!r}; allowed: {', '.join(ARCHS)}")
    return HEADS[family]


def backbone_stages(model: nn.Module, arch: str) -> list[list[nn.Module]]:
    """The backbone as stages, input to output; `partial` fine-tuning unfreezes the last ones.

    resnets: 5 stages, [conv1 + bn1 (the stem), layer1, layer2, layer3, layer4].
    mobilenet_v2: 19 stages, features[0] .. features[18] (the stem conv, the 17 inverted
    residual blocks, the final 1×1 conv to 1280 channels), one stage per index.
    mobilenet_v3_*, efficientnet_*: one stage per index of `features` (stem, blocks, last conv).
    """
    if arch.startswith("resnet"):
        return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    if arch in ARCHS:
        return [[block] for block in model.features]
    raise ValueError(f"unknown model {arch!r}; allowed: {', '.join(ARCHS)}")


def set_finetune(model: nn.Module, arch: str, mode: str, trainable_stages: int) -> dict:
    """Freeze what `mode` does not train (requires_grad=False); return what trains.

    full:         every parameter trains (nothing is touched).
    linear_probe: only the new head (`head_name(arch)`) trains.
    lora:         as linear_probe here; tasks.lora then adds the trainable low-rank adapters.
    partial:      the head and the last `trainable_stages` of `backbone_stages(model, arch)`.

    BatchNorm policy: a BatchNorm layer in a frozen part keeps its pretrained affine
    parameters (frozen with the rest) and its running statistics: `set_train_mode` puts it in
    eval mode, so it normalizes with the pretrained statistics and never updates them. Call
    `set_train_mode` instead of `model.train()` (after every switch back from evaluation).
    BatchNorm in the trainable parts behaves as usual (batch statistics, running averages).

    Returns {"mode", "stages": backbone stage count, "trainable_stages": stages that train}.
    Raises ValueError for an unknown mode, or `trainable_stages` outside 1..stages in partial.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown finetune mode {mode!r}; allowed: {', '.join(FINETUNE_MODES)}")
    stages = backbone_stages(model, arch)
    if mode == "full":
        return {"mode": mode, "stages": len(stages), "trainable_stages": len(stages)}
    if mode == "partial" and not 1 <= trainable_stages <= len(stages):
        raise ValueError(f"train.trainable_stages={trainable_stages}: {arch} has {len(stages)} backbone "
                         f"stages; allowed 1..{len(stages)}")
    n_train = trainable_stages if mode == "partial" else 0  # lora: adapters come on top (tasks.lora)
    model.requires_grad_(False)
    for stage in stages[len(stages) - n_train:]:
        for module in stage:
            module.requires_grad_(True)
    model.get_submodule(head_name(arch)).requires_grad_(True)
    return {"mode": mode, "stages": len(stages), "trainable_stages": n_train}


def set_train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, then BatchNorm layers with no trainable parameter back to eval mode.

    A BatchNorm whose affine parameters are frozen belongs to a frozen part (`set_finetune`);
    eval mode keeps its running statistics as they were. With nothing frozen this is exactly
    `model.train()`.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
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
