"""LoRA fine-tuning (`train.finetune: lora`) with the `peft` library, and merging back for evaluation.

Input:  a torchvision model from tasks.models.build_model (new head already in place), its arch
        and head name (tasks.models.head_name), `train.lora` (tasks.params.LoraParams).
Output: the model wrapped by peft (training), then a plain torchvision model with the adapters
        merged into its weights, whose state_dict has exactly the un-wrapped model's keys, so
        evaluation and export rebuild it with tasks.models.rebuild_model and no peft.

What trains: the LoRA A/B matrices on every Conv2d and Linear of the backbone with groups == 1,
and the new head (peft `modules_to_save`, a trainable copy of it). Everything else is frozen,
BatchNorm included, so tasks.models.set_train_mode keeps every BatchNorm in eval mode.

Depthwise convolutions (groups > 1, MobileNetV2's 3×3 convs) are not adapted: peft 0.21 adds
LoRA to a grouped conv only when the rank is divisible by `groups` (32..960 channels here), and
cannot merge such a layer (NotImplementedError), which the plain-model export needs. They hold
a small share of the weights (3×3 per channel); the pointwise convs around them are adapted.

peft (which imports transformers, ~5 s) is imported inside the functions: `import tasks.lora`
stays cheap for runs that do not use LoRA.
"""

from __future__ import annotations

import copy

from torch import nn

from tasks.params import LoraParams


def lora_targets(model: nn.Module, head_name: str) -> tuple[list[str], list[str]]:
    """(adapted, skipped): backbone Conv2d/Linear module names with groups == 1, and the grouped ones.

    The head (`head_name`) is in neither list: it trains whole.
    """
    adapted, skipped = [], []
    for name, module in model.named_modules():
        if name == head_name or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        (skipped if getattr(module, "groups", 1) > 1 else adapted).append(name)
    return adapted, skipped


def _check_wrapped(model: nn.Module, expected: list[str]) -> None:
    """peft matches target names by suffix: make sure exactly the intended layers got adapters."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    got = {name.removeprefix(prefix) for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if got != set(expected):
        raise RuntimeError(f"LoRA adapters on {sorted(got ^ set(expected))[:5]} differ from the targets")


def apply_lora(model: nn.Module, arch: str, lora: LoraParams, head_name: str) -> tuple[nn.Module, dict]:
    """Wrap `model` with peft LoRA adapters; only the adapters and the head stay trainable.

    model:     a torchvision classifier with its new head (tasks.models.build_model); modified in place.
    arch:      its architecture name (recorded in the info).
    lora:      rank, alpha (scaling = alpha / rank) and dropout on the adapters' input.
    head_name: the head's module name (tasks.models.head_name(arch)), trained whole.
    Returns (peft model, info) with info = {"arch", "rank", "alpha", "dropout", "peft_version",
    "target_modules", "skipped_grouped_convs", "parameters": {"total", "trainable", "lora", "head"}}.
    Raises ValueError when `head_name` is not a module of `model`.
    """
    import peft

    try:
        head = model.get_submodule(head_name)
    except AttributeError:
        raise ValueError(f"{arch}: no head module {head_name!r}") from None
    targets, skipped = lora_targets(model, head_name)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, modules_to_save=[head_name], bias="none")
    wrapped = peft.get_peft_model(model, config)
    _check_wrapped(wrapped, targets)
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    n_lora = sum(p.numel() for n, p in trainable if ".lora_" in n)
    info = {
        "arch": arch, "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
        "peft_version": peft.__version__, "target_modules": targets, "skipped_grouped_convs": skipped,
        "parameters": {"total": sum(p.numel() for p in wrapped.parameters()),  # base + adapters + head copy
                       "trainable": sum(p.numel() for _, p in trainable), "lora": n_lora,
                       "head": sum(p.numel() for p in head.parameters())},
    }
    return wrapped, info


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain torchvision model: adapters merged into the weights, the trained head in place.

    `model` is what apply_lora returned; it is consumed (peft merges in place). The result's
    state_dict has exactly the keys of the model before apply_lora.
    """
    return model.merge_and_unload()


def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """The merged plain model's state_dict, leaving `model` (still training) untouched.

    state_dict: a state of the wrapped model to merge instead of its current one (e.g. the
    best epoch's snapshot, or an EMA copy's). Works on a deep copy.
    """
    clone = copy.deepcopy(model)
    if state_dict is not None:
        clone.load_state_dict(state_dict)
    return {k: v.detach().clone() for k, v in merge_lora(clone).state_dict().items()}
