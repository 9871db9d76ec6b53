"""Epoch checkpoints of the train stage, for an exact resume after a crash or a kill.

Checkpoints live outside the stage's DVC output (`dvc repro` deletes data/train/ before the
stage runs), under `paths.cache`:

    <cache_dir>/train/<run key>/epoch-0001.pt, epoch-0002.pt, ...

The run key (`run_key`) is made of content: the curated manifest and curation.json bytes, the
`train:` section without the knobs that cannot change the result (`resume`,
`keep_checkpoints`), the seed, the pretrained weights' sha256, the torch version and the
training code. Any change that could change the numbers gives a new folder, so a resume
never mixes two configurations. One run per key at a time.

A checkpoint holds everything the next epoch depends on: model, optimizer and LR schedule
states, the data-order / augmentation generator, torch's global RNG (dropout), CUDA's RNG on
a GPU, the best score and weights so far, the history, with `train.ema_decay` the EMA
model's state (its early-stopping counter needs no entry: it is derived from the history), and
in a data-parallel run (tasks.ddp) every rank's random streams under `ranks`; rank 0 alone
writes it, every rank reads it on resume. All of it is tensors and plain Python values, so it
loads with `torch.load(weights_only=True)`. On CPU a resumed run ends with the same weights,
bit for bit, as an uninterrupted one.

torch.load checks no checksum: a flipped bit in a tensor loads silently. Every file read here
goes through `load_file`, which first checks the CRC-32 that torch's zip format stores for each
member (and, for a final model.pt, the sha256 recorded in model.json), so a corrupted file is
refused by name (a checkpoint: the previous one is used), never trained on or evaluated.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import torch

from tasks import ddp
from tasks.io import atomic_write_bytes, sha256_file
from tasks.params import TrainParams

FORMAT = 1
# The code whose change could change a run's numbers: part of the run key.
SOURCES = ("train.py", "checkpoints.py", "recipe.py", "models.py", "data.py", "augment.py", "lora.py",
           "weights.py", "ddp.py")
_KEYS = {"format", "run_key", "epoch", "model", "optimizer", "scheduler", "generator", "torch_rng",
         "best", "best_state", "history"}


class CorruptFile(ValueError):
    """A torch file whose bytes fail their CRC-32 or recorded sha256."""


def verify_archive(path: Path | str) -> None:
    """Raise CorruptFile unless every member of the torch (zip) file `path` matches its CRC-32.

    Measured on a checkpoint: flipping each byte in turn, torch.load silently returned
    different tensors for most positions; with this check first, none.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:
        raise CorruptFile(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from e
    if bad is not None:
        raise CorruptFile(f"{path}: member {bad} fails its CRC-32 check: the file is corrupted")


def load_file(path: Path | str, *, sha256: str | None = None) -> dict:
    """torch.load(weights_only=True) of `path` after its integrity checks (CRC-32s, then `sha256` if given)."""
    verify_archive(path)
    if sha256 is not None and (got := sha256_file(path)) != sha256:
        raise CorruptFile(f"{path}: sha256 {got[:12]}… is not the recorded {sha256[:12]}…: the file is corrupted "
                          "or was replaced; re-run the stage that wrote it")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_key(curate_dir: Path, params: TrainParams, *, seed: int, weights_sha256: str | None,
            world_size: int = 1) -> str:
    """16 hex digits naming one training configuration on one curated version (content only).

    world_size: data-parallel processes (tasks.ddp); other than 1 it is part of the key, since the
    shards, per-rank BatchNorm and RNG streams change the numbers (1 keeps the key it always had).
    """
    curate_dir = Path(curate_dir)
    h = hashlib.sha256()
    for path in (curate_dir / "manifest.parquet", curate_dir / "curation.json"):
        h.update(sha256_file(path).encode())
    config = params.model_dump(mode="json", exclude={"resume", "keep_checkpoints"})
    here = Path(__file__).parent
    identity = {"train": config, "seed": seed, "weights_sha256": weights_sha256, "torch": torch.__version__,
                "code": {name: sha256_file(here / name) for name in SOURCES}}
    if world_size != 1:
        identity["world_size"] = world_size
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()[:16]


def run_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "train" / key


def epoch_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch-NNNN.pt in `folder`, oldest first."""
    found = []
    for path in Path(folder).glob("epoch-*.pt"):
        stem = path.stem.removeprefix("epoch-")
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def save(folder: Path, state: dict, *, keep: int) -> Path:
    """Write `state` as epoch-NNNN.pt atomically, then delete all but the newest `keep`."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    path = epoch_path(folder, state["epoch"])
    atomic_write_bytes(path, buf.getvalue())  # durable (fsync'd, renamed) before older ones go
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def capture(*, epoch: int, run_key: str, model, optimizer, scheduler, generator: torch.Generator,
            best: float, best_state: dict | None, history: list[dict], device: torch.device,
            ema=None, ranks: list[dict] | None = None) -> dict:
    """Everything the epochs after `epoch` depend on, as weights_only-loadable values.

    ema:   the AveragedModel of `train.ema_decay`, or None (no entry).
    ranks: in a data-parallel run, every rank's `rng_states()` by rank (each rank draws its own
           augmentation and dropout); None in a single process (no entry).
    """
    state = {"run_key": run_key, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "best": float(best), "best_state": best_state, "history": history}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if ranks is not None:
        state["ranks"] = ranks
    return state


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """This process's random streams (data-parallel runs gather one per rank into `capture`)."""
    states = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _shapes(tensors: dict) -> dict:
    return {k: getattr(v, "shape", None) for k, v in tensors.items()}


def _check(state: object, *, key: str, model, epochs: int, ema=None) -> str | None:
    """Why `state` cannot resume this run, or None when it can."""
    needed = _KEYS | ({"ema"} if ema is not None else set())
    if not isinstance(state, dict) or not needed <= set(state):
        return f"missing entries {sorted(needed - set(state)) if isinstance(state, dict) else 'all'}"
    if state["format"] != FORMAT or state["run_key"] != key:
        return f"format {state['format']} / run key {state['run_key']}, expected {FORMAT} / {key}"
    if not isinstance(state["epoch"], int) or not 1 <= state["epoch"] <= epochs:
        return f"epoch {state['epoch']!r} outside 1..{epochs}"
    expected = {"model": _shapes(model.state_dict()), "best_state": _shapes(model.state_dict())}
    if ema is not None:
        expected["ema"] = _shapes(ema.state_dict())
    for name, shapes in expected.items():
        got = state[name]
        if not isinstance(got, dict) or _shapes(got) != shapes:
            return f"{name}: tensors do not match the model"
    return None


def load_latest(folder: Path, *, key: str, model, epochs: int,
                ema=None) -> tuple[dict, Path] | tuple[None, None]:
    """The newest checkpoint in `folder` that loads and fits this run, and its path.

    An unreadable or mismatching file is reported on stderr, naming it, and the one before it
    is tried; (None, None) when none is usable (the run starts fresh).
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            state = load_file(path)
        except CorruptFile as e:
            why = f"corrupted ({str(e).removeprefix(f'{path}: ')})"
        except Exception as e:  # noqa: BLE001 - any failure to read an untrusted file means "unusable"
            why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        else:
            why = _check(state, key=key, model=model, epochs=epochs, ema=ema)
            if why is None:
                return state, path
        print(f"warning: checkpoint {path}: {why}; falling back to the previous one",
              file=sys.stderr, flush=True)
    return None, None


def restore(state: dict, *, model, optimizer, scheduler, generator: torch.Generator,
            device: torch.device, ema=None, rank: int = 0) -> tuple[int, float, dict, list[dict]]:
    """Put a checkpoint's states back (the EMA model's too, when given); returns (epoch, best, best_state, history).

    rank: in a data-parallel run, whose random streams to restore from the checkpoint's `ranks`.
    """
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    streams = state["ranks"][rank] if "ranks" in state else state
    generator.set_state(streams["generator"])
    torch.set_rng_state(streams["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in streams:
        torch.cuda.set_rng_state(streams["cuda_rng"], device)
    return state["epoch"], state["best"], state["best_state"], list(state["history"])


def discard_after(folder: Path, epoch: int) -> None:
    """Delete checkpoints newer than `epoch` (all of them for 0: a fresh start) and stale temp files."""
    for n, path in list_checkpoints(folder):
        if n > epoch:
            path.unlink(missing_ok=True)
    for tmp in Path(folder).glob(".epoch-*.tmp"):  # left by a process killed mid-write
        tmp.unlink(missing_ok=True)


def resume(folder: Path, key: str, *, params: TrainParams, model, opt, sched, gen: torch.Generator,
           device: torch.device, ema=None, world: ddp.World | None = None) -> tuple[int, float, dict | None, list]:
    """(start epoch, best, best_state, history) of tasks.train: from the newest valid checkpoint, or fresh.

    With `params.resume`, rank 0 picks the checkpoint (`load_latest`) and every rank restores
    that same file, its own random streams included; rank 0 alone deletes later ones.
    """
    world = world or ddp.World()
    state, path = None, None
    if params.resume and world.main:
        state, path = load_latest(folder, key=key, model=model, epochs=params.epochs, ema=ema)
    path = ddp.broadcast_object(path, world)  # every rank resumes from the file rank 0 chose
    if path is not None and not world.main:
        state = load_file(path)
    start, best, best_state, history = 0, -1.0, None, []
    if state is not None:
        start, best, best_state, history = restore(state, model=model, optimizer=opt, scheduler=sched,
                                                   generator=gen, device=device, ema=ema, rank=world.rank)
        if world.main:
            print(f"resuming after epoch {start}/{params.epochs} from {path}", flush=True)
    if world.main:  # a fresh start must not keep an older run's later epochs
        discard_after(folder, start)
    return start, best, best_state, history
