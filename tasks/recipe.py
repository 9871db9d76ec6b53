"""The train stage's optimization recipe: optimizer, gradient clipping, weight EMA, early stopping.

Plain functions of `TrainParams` (the `train:` section: optimizer, momentum, weight_decay, lr,
grad_clip, ema_decay, early_stopping_patience, val_fraction), used by tasks.train. With every
knob at its default (adamw, no clipping, no EMA, no early stopping) they do exactly what
tasks.train did before they existed, so default runs give the same weights bit for bit.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tasks.params import TrainParams


def check_recipe(p: TrainParams) -> None:
    """Raise ValueError when the recipe's knobs do not fit together."""
    if p.early_stopping_patience is not None and p.val_fraction == 0:
        raise ValueError(f"train.early_stopping_patience={p.early_stopping_patience} needs a validation split, "
                         "but train.val_fraction=0; set train.val_fraction > 0 or "
                         "train.early_stopping_patience=null")


def build_optimizer(params: list[torch.nn.Parameter], p: TrainParams) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum (`train.optimizer`), over `params`."""
    if p.optimizer == "sgd":
        # Nesterov needs momentum > 0; with train.momentum=0 this is plain SGD.
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0,
                               weight_decay=p.weight_decay)
    return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                   grad_clip: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm of `params` to `grad_clip` (None: no clipping), then step.

    Returns the total norm before clipping (a tensor, not synced to the host), or None.
    bf16 autocast needs no gradient scaler, so the gradients are already unscaled here.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip is not None else None
    opt.step()
    return norm


def build_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of `model`'s parameters and buffers, or None when off."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def epochs_without_gain(history: list[dict]) -> int:
    """Epochs since the best `val_accuracy` in `history` (0 when the last epoch was the best).

    Derived from the history rather than stored, so a resumed run counts the same as an
    uninterrupted one. "Better" is strictly greater, as in the best-model selection.
    """
    best, since = float("-inf"), 0
    for entry in history:
        if entry["val_accuracy"] > best:
            best, since = entry["val_accuracy"], 0
        else:
            since += 1
    return since


def should_stop(history: list[dict], patience: int | None) -> bool:
    """Whether early stopping (`train.early_stopping_patience`; None: off) ends training now."""
    return patience is not None and bool(history) and epochs_without_gain(history) >= patience
