"""Training step on CPU: the default model in fp32 (baseline) vs channels_last, bf16 autocast,
and the alternative model considered for the default (ResNet-18 adapted to 28-px images).

The default `train:` settings (MobileNetV2, 32 px, batch 128, stride-1 stem) on random inputs;
each ratio is images/s of a variant over fp32 contiguous, all measured in this run.
"""

from __future__ import annotations

import time

import torch

from tasks.models import build_model
from tasks.params import load_params


def _throughput(params, *, bf16: bool, channels_last: bool, steps: int) -> float:
    model, _ = build_model(params.model, 10, weights=params.weights, image_size=params.image_size)
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(params.batch_size, 3, params.image_size, params.image_size)
    y = torch.randint(0, 10, (params.batch_size,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * params.batch_size / (time.perf_counter() - t0)


def run(size: int | None = None) -> dict:
    params = load_params().train
    torch.set_num_threads(params.num_threads)
    steps = size or 8
    variants = {"fp32": (False, False), "fp32_channels_last": (False, True),
                "bf16": (True, False), "bf16_channels_last": (True, True)}
    ips = {name: _throughput(params, bf16=b, channels_last=c, steps=steps) for name, (b, c) in variants.items()}
    resnet = params.model_copy(update={"model": "resnet18_small", "weights": None, "image_size": 28})
    for name, (b, c) in {"resnet18_small_28px": (False, False), "resnet18_small_28px_channels_last": (False, True),
                         "resnet18_small_28px_bf16_channels_last": (True, True)}.items():
        ips[name] = _throughput(resnet, bf16=b, channels_last=c, steps=max(2, steps // 4))
    return {
        "steps": steps,
        "threads": params.num_threads,
        "images_per_second": {k: round(v, 1) for k, v in ips.items()},
        "ratios": {f"{k} / fp32": v / ips["fp32"] for k, v in ips.items() if k != "fp32"},
    }
