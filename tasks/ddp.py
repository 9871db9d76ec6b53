"""Data-parallel training glue for tasks.train: torchrun launch, process group, collectives.

`torchrun --standalone --nproc_per_node N -m tasks.train` starts N processes with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `init` joins them into one process
group (NCCL on CUDA, one GPU per process at LOCAL_RANK; gloo on CPU). Every helper here is a
no-op, or returns its input, in a single process (`World().size == 1`), so tasks.train keeps
one code path and a one-process run does exactly what it did before DDP existed.

Contract with tasks.train (module docstring there): the global batch stays `train.batch_size`
(each rank takes batch_size / world_size of its DistributedSampler shard), rank 0 alone
writes files and calls `on_epoch`, and whatever rank 0 decides (an exception from `on_epoch`
or from writing a checkpoint, the history entry, the outputs' metadata) is broadcast so that
all ranks take the same branch: no rank waits forever in a collective another rank skipped.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

# A rank stuck in a collective (a peer died outside torchrun's watch) fails after this long
# instead of torch's 30 min default; an epoch on 2 CPU cores of the real dataset fits in it.
TIMEOUT = timedelta(minutes=10)
_SEED_STRIDE = 1_000_003  # rank r's augmentation/dropout seed: seed + r * stride (rank 0: seed itself)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: a plain single process)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) with WORLD_SIZE > 1."""
    return _env_int("WORLD_SIZE", 1) > 1


def init(device: torch.device) -> tuple[World, bool]:
    """Join the process group when launched with WORLD_SIZE > 1; (world, whether we created the group).

    device: the device training asked for (tasks.train.resolve_device): "cuda" selects NCCL and
    pins this process to GPU LOCAL_RANK; anything else selects gloo. An already initialized
    group (the caller's own) is used as is and not destroyed by us.
    """
    if not launched():
        return World(), False
    rank, local_rank, size = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                               "launch at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=TIMEOUT)
    else:
        backend = dist.get_backend()
    return World(rank, local_rank, size, local_size, backend), created


def destroy(created: bool = True) -> None:
    """Leave the process group (when `created` by `init` and still there)."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main(world: World | None = None) -> bool:
    """Whether this process is rank 0 (always, in a single process); without `world`, from the
    process group or, once it is gone (tasks.train leaves it at the end), from torchrun's RANK."""
    if world is not None:
        return world.main
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def rank_device(device: torch.device, world: World) -> torch.device:
    """cuda:LOCAL_RANK for a distributed CUDA run, else `device` unchanged."""
    return torch.device("cuda", world.local_rank) if world.distributed and device.type == "cuda" else device


def rank_batch_size(batch_size: int, world: World) -> int:
    """The per-rank batch that keeps the global batch at `batch_size`; ValueError when it does not divide."""
    if batch_size % world.size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the world size {world.size}: the "
                         f"global batch is split evenly over the ranks; use a multiple of {world.size} "
                         f"(e.g. {batch_size - batch_size % world.size or world.size}) or another --nproc_per_node")
    return batch_size // world.size


def rank_seed(seed: int, world: World) -> int:
    """Seed of this rank's augmentation and dropout streams: `seed` on rank 0, a distinct one elsewhere
    (identical streams would give every shard the same crops, flips and dropout masks)."""
    return seed + _SEED_STRIDE * world.rank


def threads_per_rank(num_threads: int, world: World, device: torch.device) -> int:
    """`train.num_threads`, capped on CPU so the ranks on this machine do not oversubscribe its cores."""
    if not world.distributed or device.type != "cpu":
        return num_threads
    cap = max(1, (os.cpu_count() or 1) // world.local_size)
    if num_threads > cap and world.main:
        print(f"train.num_threads={num_threads} × {world.local_size} ranks exceeds {os.cpu_count()} cores: "
              f"using {cap} thread(s) per rank", flush=True)
    return min(num_threads, cap)


def use_sync_batchnorm(device: torch.device, rank_batch: int) -> bool:
    """SyncBatchNorm only on CUDA with a per-rank batch under 32.

    torch's SyncBatchNorm refuses CPU tensors, so gloo runs keep per-rank statistics. On GPUs,
    per-rank BatchNorm over >= 32 images is the usual large-batch practice and costs no
    collective per layer; below that the statistics get noisy enough to be worth syncing.
    """
    return device.type == "cuda" and rank_batch < 32


def wrap(model: torch.nn.Module, world: World, device: torch.device, *, sync_bn: bool) -> torch.nn.Module:
    """`model` itself in a single process; else DistributedDataParallel around it (parameters
    broadcast from rank 0; gradients averaged over ranks during backward). With `sync_bn`, its
    BatchNorm layers become SyncBatchNorm in place first (same parameters and state_dict keys)."""
    if not world.distributed:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_batches(tr_idx: np.ndarray, *, epoch: int, seed: int, batch_size: int, world: World) -> list[torch.Tensor]:
    """This rank's batches (row indices) for `epoch`: a DistributedSampler shard, cut into `batch_size`.

    The sampler permutes with `seed` + epoch (set_epoch), so every rank draws the same permutation
    and takes a disjoint slice; it pads the permutation to a multiple of the world size, so all ranks
    run the same number of steps, ceil(ceil(n / W) / (B / W)) = ceil(n / B): the single-process count.
    """
    sampler = DistributedSampler(range(len(tr_idx)), num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    positions = torch.tensor(list(sampler), dtype=torch.long)
    rows = torch.from_numpy(tr_idx)[positions]
    return list(rows.split(batch_size))


def _collective_device(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if world.backend == "nccl" else torch.device("cpu")


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64); `values` as is in a single process."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(world))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def mean_over_ranks(value: float, world: World) -> float:
    """The ranks' mean of `value` (equal-sized shards: the global mean); `value` in a single process."""
    return value if not world.distributed else sum_over_ranks([value], world)[0] / world.size


def accuracy(correct: torch.Tensor, world: World) -> float:
    """Share of True in `correct` over all ranks' shards (counts summed, so uneven shards are exact)."""
    if not world.distributed:
        return float(correct.float().mean())
    hits, n = sum_over_ranks([float(correct.sum()), float(correct.numel())], world)
    return hits / n


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank (pickled); `obj` itself in a single process."""
    if not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device(world))
    return box[0]


def all_gather_object(obj, world: World) -> list:
    """Every rank's `obj`, by rank; [obj] in a single process."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Parameters are identical on all ranks after each step, buffers are not: per-rank BatchNorm
    updates its running statistics from its own shard. Before validation, every rank takes rank 0's,
    so the sharded evaluation scores exactly the model rank 0 saves.
    """
    if not world.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def _portable(error: Exception) -> Exception:
    """`error` when it survives pickling (e.g. optuna.TrialPruned), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any pickling failure: fall back to a plain message
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
    return error


def on_main(fn: Callable[[], object], world: World, *, share: bool = False):
    """Run `fn` on rank 0 only; every rank then returns or raises together.

    What `fn` raises on rank 0 (optuna.TrialPruned from an `on_epoch` callback, a failed
    checkpoint write) is broadcast and raised on every rank, so the others leave the training loop
    too instead of blocking in the next collective. With `share`, `fn`'s (picklable) result is
    returned on every rank, else on rank 0 only (None elsewhere). In a single process: `fn()`.
    """
    if not world.distributed:
        return fn()
    failure, result = None, None
    if world.main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
    failure_here = failure
    portable = _portable(failure) if failure is not None else None
    failure, shared = broadcast_object((portable, result if share else None), world)
    if failure is not None:
        if world.main:
            raise failure_here
        failure.add_note(f"raised on rank 0 and re-raised on rank {world.rank} so that every rank stops")
        raise failure
    return shared if share else result
