"""Stage train: fine-tune a pretrained torchvision model on the curated dataset version.

Inputs:  data/curate/manifest.parquet (rows not excluded, split train), images under
         data/ingest/, classes.json; pretrained weights from torch's hub cache or a file.
Outputs: data/train/ (`paths.data`/train)
    model.pt               best-validation weights (state_dict; load with weights_only=True)
    model.json             model spec, dataset version, fine-tuning mode, history, timings,
                           parameter counts (total, trainable after freezing)
    params.resolved.yaml   every param this run used
Cache:   `paths.cache`/train/<run key>/epoch-NNNN.pt, epoch checkpoints for resume
         (tasks.checkpoints); not in data/train/, which `dvc repro` deletes before the stage runs.
Params:  `train:` section and `seed`.

Fine-tuning (`train.finetune`, tasks.models.set_finetune): `full` trains everything;
`linear_probe` only the new head; `partial` the head and the last `train.trainable_stages`
backbone stages. Frozen parameters stay out of the optimizer, and BatchNorm in frozen parts
stays in eval mode (pretrained running statistics, never updated).

Resume (`train.resume`): a run continues after the newest valid epoch checkpoint of the same
run key, with model, optimizer, schedule and every RNG restored, so on CPU it ends with the
same weights as a run that was never interrupted. The newest `train.keep_checkpoints` are kept.

Recipe (tasks.recipe): `train.optimizer` adamw or sgd (Nesterov, `train.momentum`);
`train.grad_clip` clips the global gradient norm before each step; `train.ema_decay` keeps an
EMA of the weights, which is what is validated, selected and saved (and is checkpointed);
`train.early_stopping_patience` stops after N epochs without a better val accuracy
(model.json: `stopped_early_after_epoch`).

Data-parallel (tasks.ddp): under `torchrun --nproc_per_node N -m tasks.train` the N processes
train one DistributedDataParallel model (gloo on CPU, NCCL on GPUs). Each rank takes a disjoint
DistributedSampler shard; the global batch stays `train.batch_size` (batch_size / N per rank,
which must divide), so the LR schedule has the same steps as in one process. Validation is
sharded and its counts summed; rank 0 alone writes checkpoints, model.pt and model.json
(`distributed`: world size, backend, per-rank batch, SyncBatchNorm) and calls `on_epoch`.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from tasks import checkpoints, ddp, recipe
from tasks.augment import build_train_augment
from tasks.data import (
    Normalize,
    build_eval_transform,
    image_channels,
    label_indices,
    load_images,
    split_train_val,
)
from tasks.io import atomic_write_bytes, atomic_write_json, load_table, read_json, sha256_file
from tasks.models import (
    ModelSpec,
    bf16_supported,
    build_model,
    count_parameters,
    head_name,
    set_finetune,
    set_train_mode,
)
from tasks.params import Params, TrainParams, dump_resolved, with_values
from tasks.weights import train_weights


@dataclass(frozen=True)
class TrainResult:
    model_path: str
    version: str
    best_val_accuracy: float | None
    epochs_run: int
    seconds: float
    images_per_second: float


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def load_training_rows(curate_dir: Path) -> tuple[pd.DataFrame, list[str], str, Path]:
    """Curated manifest rows kept for training, the classes, the version and the image root."""
    info = read_json(curate_dir / "curation.json")
    df = load_table(curate_dir / "manifest.parquet").to_pandas()
    kept = df[~df["excluded"]] if "excluded" in df else df
    classes = read_json(Path(info["images_root"]) / "classes.json")
    return kept.reset_index(drop=True), classes, info["version"], Path(info["images_root"])


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over `warmup_steps`, then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _autocast(device: torch.device, p: TrainParams):
    enabled = bf16_supported(device) if p.bf16 == "auto" else bool(p.bf16)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), enabled


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, normalize, *, batch_size: int, device, channels_last: bool,
                   bf16: bool) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 images, in batches."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _save_weights(path: Path, state_dict: dict) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict}, buf)
    atomic_write_bytes(path, buf.getvalue())  # temp + fsync + rename: never half-written


def _end_epoch(run_dir: Path | None, state: dict | None, *, keep: int, on_epoch, entry: dict) -> None:
    """Rank 0's end of an epoch: write its checkpoint, then report it (which may stop the run)."""
    if state is not None:
        checkpoints.save(run_dir, state, keep=keep)
    if on_epoch is not None:
        on_epoch(entry)


def train(curate_dir: Path, *, params: TrainParams, out_dir: Path, seed: int = 0,
          cache_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune `params.model` on the curated version in `curate_dir`; write to `out_dir`.

    curate_dir: the curate stage's output (manifest.parquet, curation.json).
    params:     the `train:` section (model, fine-tuning mode, schedule, resume, ...).
    out_dir:    receives model.pt and model.json.
    seed:       seeds weights of the new head, the val carve-out, data order, augmentation, dropout.
    cache_dir:  epoch checkpoints go to cache_dir/train/<run key>/ and, with `params.resume`, a
                run continues from there; None: no checkpoints, no resume.
    on_epoch:   called with each epoch's history entry (epoch, train_loss, val_accuracy, ...)
                once it is checkpointed, and on resume with each restored entry first, so a
                caller sees every epoch once per call. What it raises stops the run (a sweep's
                pruning); no model.pt is written then.
    Launched by torchrun with WORLD_SIZE > 1, it joins (or uses the caller's) process group and
    trains data-parallel (module docstring). Every rank calls it with the same arguments (only
    rank 0's `on_epoch` is called) and returns the same TrainResult; what `on_epoch` raises on
    rank 0 is raised on every rank.
    Returns a TrainResult. Raises ValueError when no train rows are left, the mode or recipe
    does not fit, or `params.batch_size` does not divide over the ranks.
    """
    recipe.check_recipe(params)
    world, created = ddp.init(resolve_device(params.device))
    try:
        return _train(Path(curate_dir), params=params, out_dir=Path(out_dir), seed=seed, cache_dir=cache_dir,
                      on_epoch=on_epoch, world=world)
    finally:
        ddp.destroy(created)


def _train(curate_dir: Path, *, params: TrainParams, out_dir: Path, seed: int, cache_dir: Path | None,
           on_epoch: Callable[[dict], None] | None, world: ddp.World) -> TrainResult:
    rank_batch = ddp.rank_batch_size(params.batch_size, world)
    t_start = time.perf_counter()
    device = ddp.rank_device(resolve_device(params.device), world)
    torch.set_num_threads(ddp.threads_per_rank(params.num_threads, world, device))
    torch.manual_seed(seed)
    rows, classes, version, images_root = load_training_rows(Path(curate_dir))
    rows = rows[rows["split"] == "train"].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{curate_dir}/manifest.parquet: no train rows left after curation")

    channels = image_channels(rows)
    images = load_images(rows, images_root, size=params.image_size, channels=channels)
    labels = label_indices(rows, classes)
    tr_idx, val_idx = split_train_val(len(rows), val_fraction=params.val_fraction, seed=seed)
    t_loaded = time.perf_counter()

    model, spec = build_model(params.model, len(classes), weights=params.weights, image_size=params.image_size,
                              allow_download=params.allow_download)
    augment = build_train_augment(params.augment, n_classes=len(classes))
    normalize, eval_norm = Normalize(spec.mean, spec.std).to(device), build_eval_transform(
        mean=spec.mean, std=spec.std).to(device)
    finetune = set_finetune(model, params.model, params.finetune, params.trainable_stages)
    lora_info = None
    if params.finetune == "lora":  # adapters on the frozen backbone; merged into plain weights when saved
        from tasks.lora import apply_lora

        model, lora_info = apply_lora(model, params.model, params.lora, head_name(params.model))
    model = model.to(device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast, bf16 = _autocast(device, params)
    sync_bn = world.distributed and ddp.use_sync_batchnorm(device, rank_batch)
    # DDP and the compiled module share the parameters; checkpoints and saving use `model` itself.
    forward = ddp.wrap(model, world, device, sync_bn=sync_bn)
    forward = torch.compile(forward) if params.compile else forward
    if world.distributed:  # each rank its own dropout masks (the weights came from rank 0 above)
        torch.manual_seed(ddp.rank_seed(seed, world))
    pinned = device.type == "cuda"

    steps_per_epoch = math.ceil(len(tr_idx) / params.batch_size)
    total = steps_per_epoch * params.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]  # full: all, in the same order as before
    opt = recipe.build_optimizer(trainable, params)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, int(params.warmup_epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(ddp.rank_seed(seed, world))  # rank 0 (one process): `seed`
    ema = recipe.build_ema(model, params.ema_decay)
    scored = ema.module if ema is not None else model  # what is validated, selected and saved

    if world.main:  # rank 0 alone writes
        out_dir.mkdir(parents=True, exist_ok=True)
    run_dir, key, start, history, best, best_state = None, None, 0, [], -1.0, None
    if cache_dir is not None:
        key = checkpoints.run_key(curate_dir, params, seed=seed, weights_sha256=spec.weights_sha256,
                                  world_size=world.size)
        run_dir = checkpoints.run_dir(cache_dir, key)
        start, best, best_state, history = checkpoints.resume(run_dir, key, params=params, model=model, opt=opt,
                                                              sched=sched, gen=gen, device=device, ema=ema,
                                                              world=world)
    # Rank 0 replays the restored epochs; every rank joins (on_epoch may be None off rank 0).
    ddp.on_main(lambda: [on_epoch(entry) for entry in history] if on_epoch is not None else None, world)
    t_train = time.perf_counter()
    for epoch in range(start, params.epochs):
        if recipe.should_stop(history, params.early_stopping_patience):  # also on resume: from history
            break
        set_train_mode(model)  # frozen parts' BatchNorm stays in eval mode
        t_epoch, loss_sum = time.perf_counter(), 0.0
        if world.distributed:
            batches = ddp.shard_batches(tr_idx, epoch=epoch, seed=seed, batch_size=rank_batch, world=world)
        else:
            order = torch.from_numpy(tr_idx)[torch.randperm(len(tr_idx), generator=gen)]
            batches = [order[s * params.batch_size : (s + 1) * params.batch_size] for s in range(steps_per_epoch)]
        for step, idx in enumerate(batches):
            x, y = augment(images[idx], labels[idx], generator=gen)  # y: soft targets with MixUp/CutMix
            if pinned:  # page-locked batches: the copies below overlap with the GPU's work
                x, y = x.pin_memory(), y.pin_memory()
            x = normalize(x.to(device, non_blocking=pinned))
            if params.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=pinned)
            with autocast:
                loss = F.cross_entropy(forward(x), y, label_smoothing=params.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            recipe.optimizer_step(opt, trainable, grad_clip=params.grad_clip)
            if ema is not None:
                ema.update_parameters(model)
            sched.step()
            loss_sum += loss.item()
            if (step + 1) % 100 == 0 and world.main:
                rate = (step + 1) * params.batch_size / (time.perf_counter() - t_epoch)
                print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss_sum / (step + 1):.4f} "
                      f"{rate:.0f} img/s", flush=True)
        entry = {"epoch": epoch + 1, "train_loss": ddp.mean_over_ranks(loss_sum / steps_per_epoch, world),
                 "seconds": round(time.perf_counter() - t_epoch, 2)}
        if len(val_idx):
            ddp.sync_buffers(scored, world)  # score what rank 0 saves: its BatchNorm statistics
            mine = val_idx[world.rank :: world.size]  # one process: all of val_idx
            logits = predict_logits(scored, images[mine], eval_norm, batch_size=512, device=device,
                                    channels_last=params.channels_last, bf16=bf16)
            correct = logits.argmax(1) == labels[mine] if len(mine) else torch.zeros(0, dtype=torch.bool)
            entry["val_accuracy"] = ddp.accuracy(correct, world)
        entry = ddp.broadcast_object(entry, world)  # one history (rank 0's seconds) on all ranks
        history.append(entry)
        if world.main:
            print(f"epoch {epoch + 1}/{params.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                                                                   if k != "epoch"), flush=True)
        score = entry.get("val_accuracy", epoch)  # without a val split: the last epoch
        if score > best:  # the same entries on every rank: the same best epoch and early stop
            best = score
            best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()} if world.main else None
        state = None
        if run_dir is not None:  # every rank's random streams, for an exact resume of each
            streams = ddp.all_gather_object(checkpoints.rng_states(gen, device), world) if world.distributed else None
            state = checkpoints.capture(epoch=epoch + 1, run_key=key, model=model, optimizer=opt, scheduler=sched,
                                        generator=gen, best=best, best_state=best_state, history=history,
                                        device=device, ema=ema, ranks=streams) if world.main else None
        ddp.on_main(partial(_end_epoch, run_dir, state, keep=params.keep_checkpoints, on_epoch=on_epoch,
                            entry=entry), world)  # an exception there (pruning) stops every rank

    train_seconds = max(time.perf_counter() - t_train, 1e-9)
    epochs_run = history[-1]["epoch"] if history else 0

    def write_outputs() -> dict:  # rank 0 only; the metadata reaches every rank
        weights = best_state
        if lora_info is not None:
            from tasks.lora import merged_state_dict

            weights = merged_state_dict(scored, best_state)  # plain torchvision keys: no peft to load it
        _save_weights(out_dir / "model.pt", weights)
        n_seen = len(tr_idx) * max(0, epochs_run - start)  # images trained on in this run (all ranks)
        meta = {
            "spec": asdict(spec),
            "classes": classes,
            "dataset_version": version,
            "curated_version": read_json(Path(curate_dir) / "curation.json").get("curated_version"),
            "pretrained_from": spec.extra.get("pretrained_from"),
            "n_train": len(tr_idx),
            "n_val": len(val_idx),
            "device": str(device),
            "bf16": bf16,
            "finetune": params.finetune,
            "backbone_stages": {"total": finetune["stages"], "trainable": finetune["trainable_stages"]},
            "parameters": lora_info["parameters"] if lora_info else count_parameters(model),
            "lora": {k: v for k, v in lora_info.items() if k != "parameters"} if lora_info else None,
            "augment": params.augment.model_dump(mode="json"),
            "resumed_after_epoch": start or None,
            "recipe": {"optimizer": params.optimizer, "grad_clip": params.grad_clip, "ema_decay": params.ema_decay,
                       "early_stopping_patience": params.early_stopping_patience},
            "train_params": params.model_dump(mode="json"),  # the whole recipe, for lineage and model cards
            "stopped_early_after_epoch": epochs_run if epochs_run < params.epochs else None,
            "checkpoint_dir": str(run_dir) if run_dir is not None else None,
            "history": history,
            "best_val_accuracy": best if len(val_idx) else None,
            "seconds": {"load": round(t_loaded - t_start, 2), "train": round(train_seconds, 2),
                        "total": round(time.perf_counter() - t_start, 2)},
            "images_per_second": round(n_seen / train_seconds, 1),
            "model_sha256": sha256_file(out_dir / "model.pt"),
            "distributed": {"world_size": world.size, "backend": world.backend, "per_rank_batch_size": rank_batch,
                            "sync_batchnorm": sync_bn} if world.distributed else None,
        }
        atomic_write_json(out_dir / "model.json", meta)
        return meta

    meta = ddp.on_main(write_outputs, world, share=True)
    return TrainResult(str(out_dir / "model.pt"), version, meta["best_val_accuracy"], epochs_run,
                       meta["seconds"]["total"], meta["images_per_second"])


def load_trained(model_dir: Path):
    """(model, spec, meta) from a train output folder; weights loaded with weights_only=True."""
    from tasks.models import rebuild_model

    meta = read_json(Path(model_dir) / "model.json")
    spec = ModelSpec(**meta["spec"])
    state = checkpoints.load_file(Path(model_dir) / "model.pt", sha256=meta.get("model_sha256"))["state_dict"]
    return rebuild_model(spec, state), spec, meta


def dataset_task(curate_dir: Path) -> str:
    """classification or detection: the curated version's task (its ingest's version.json)."""
    info = read_json(Path(curate_dir) / "curation.json")
    version = Path(info["images_root"]) / "version.json"
    return read_json(version).get("task", "classification") if version.is_file() else "classification"


def final_params(params: Params) -> tuple[TrainParams, dict | None]:
    """(recipe, best trial): `train:` as is, or with `tune.enabled` the tune stage's best values
    (data/tune/best.json) trained on train+val (no val carve-out; the sweep already chose)."""
    recipe = train_weights(params)
    if not params.tune.enabled:
        return recipe, None
    best_file = params.paths.data / "tune" / "best.json"
    if not best_file.is_file():
        raise ValueError(f"tune.enabled: true but {best_file} is missing: run the tune stage first")
    best = read_json(best_file)
    return with_values(recipe, best["params"], epochs=best["epochs"], val_fraction=0.0), best


def run(params: Params):
    """The stage: classification (train) or, for a detection version, Faster R-CNN
    (tasks.detection.train_detection) with `train.detection`. Under torchrun, rank 0 alone writes."""
    out_dir, curate_dir = params.paths.data / "train", params.paths.data / "curate"
    if dataset_task(curate_dir) == "detection":
        if ddp.launched():
            raise ValueError("data-parallel training (torchrun, WORLD_SIZE > 1) covers classification only; "
                             f"{curate_dir} is a detection version: run `python -m tasks.train` in one process")
        from tasks.detection import train_detection

        result = train_detection(curate_dir, params=params.train, out_dir=out_dir, seed=params.seed,
                                 cache_dir=params.paths.cache)
    else:
        recipe, best = final_params(params)
        result = train(curate_dir, params=recipe, out_dir=out_dir, seed=params.seed, cache_dir=params.paths.cache)
        if best is not None and ddp.is_main():  # the model names the sweep and trial it came from
            meta = read_json(out_dir / "model.json")
            atomic_write_json(out_dir / "model.json", {**meta, "tuned_from": best})
    if ddp.is_main():
        dump_resolved(params, out_dir / "params.resolved.yaml")
    return result


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    r = run(load_params(overrides=argv or []))
    score = (f"best val accuracy {r.best_val_accuracy}" if isinstance(r, TrainResult)
             else f"test mAP@.50 {(r.test or {}).get('map_50')}")
    if ddp.is_main():
        print(f"trained on {r.version}: {score}, {r.seconds:.0f}s, {r.images_per_second:.0f} img/s → {r.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
