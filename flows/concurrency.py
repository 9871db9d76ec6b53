"""Prefect global concurrency limits the flows share: `gpu`, one slot per visible GPU.

Every task that trains or runs a model on CUDA (pipeline stages pretrain, train, evaluate,
review, export; each tune trial) holds one slot of `gpu` for its duration, so flow runs and
sweep workers sharing a Prefect server never put two trainings on one GPU. The limit lives on
the server: workers on several machines that share one server share it (then set its slot
count to the GPUs behind that server: `prefect gcl update gpu --limit N`). On CPU nothing is
acquired: there is no GPU to oversubscribe, and the CPU runs are bounded by their threads.
"""

from __future__ import annotations

import contextlib

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from tasks.params import Params

GPU_LIMIT = "gpu"


def uses_gpu(params: Params) -> bool:
    import torch

    return params.train.device == "cuda" or (params.train.device == "auto" and torch.cuda.is_available())


def ensure_gpu_limit(params: Params, slots: int | None = None) -> bool:
    """Create the `gpu` limit (one slot per GPU, or `slots`) when models run on CUDA; True if so."""
    if slots is None and not uses_gpu(params):
        return False
    if slots is None:
        import torch

        slots = max(1, torch.cuda.device_count())
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)  # an existing limit keeps its slots
        except ObjectNotFound:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    return True


def concurrency_slot(name: str):
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, strict=True)  # strict: a missing limit is an error, not "no limit"


def gpu_slot(active: bool):
    """One slot of `gpu` while the block runs, when `active` (ensure_gpu_limit's answer)."""
    return concurrency_slot(GPU_LIMIT) if active else contextlib.nullcontext()
