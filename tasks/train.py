"""Stage train: fine-tune a pretrained torchvision model on the curated dataset version.

Inputs:  data/curate/manifest.parquet (rows not excluded, split train), images under
         data/ingest/, classes.json; pretrained weights from torch's hub cache or a file.
Outputs: data/train/ (`paths.data`/train)
    model.pt               best-validation weights (state_dict; load with weights_only=True)
    model.json             model spec, dataset version, history, timings, parameter counts
    checkpoint.pt          last epoch's full state (model, optimizer, schedule, RNG) for resume
    params.resolved.yaml   every param this run used
Params:  `train:` section and `seed`.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from tasks.data import (
    build_eval_transform,
    build_train_transform,
    image_channels,
    label_indices,
    load_images,
    split_train_val,
)
from tasks.io import atomic_write_bytes, atomic_write_json, load_table, read_json, sha256_file
from tasks.models import ModelSpec, bf16_supported, build_model, count_parameters
from tasks.params import Params, TrainParams, dump_resolved


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


def _lr_lambda(total_steps: int, warmup_steps: int):
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


def _save_checkpoint(path: Path, **state) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())  # temp + fsync + rename: never half-written


def train(curate_dir: Path, *, params: TrainParams, out_dir: Path, seed: int = 0) -> TrainResult:
    """Fine-tune `params.model` on the curated version in `curate_dir`; write to `out_dir`."""
    t_start = time.perf_counter()
    torch.set_num_threads(params.num_threads)
    torch.manual_seed(seed)
    device = resolve_device(params.device)
    rows, classes, version, images_root = load_training_rows(Path(curate_dir))
    rows = rows[rows["split"] == "train"].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{curate_dir}/manifest.parquet: no train rows left after curation")

    channels = image_channels(rows)
    images = load_images(rows, images_root, size=params.image_size, channels=channels)
    labels = label_indices(rows, classes)
    tr_idx, val_idx = split_train_val(len(rows), val_fraction=params.val_fraction, seed=seed)
    t_loaded = time.perf_counter()

    model, spec = build_model(params.model, len(classes), weights=params.weights, image_size=params.image_size)
    augment, normalize = build_train_transform(params.augment, mean=spec.mean, std=spec.std)
    eval_norm = build_eval_transform(mean=spec.mean, std=spec.std)
    model, normalize, eval_norm = model.to(device), normalize.to(device), eval_norm.to(device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast, bf16 = _autocast(device, params)

    steps_per_epoch = math.ceil(len(tr_idx) / params.batch_size)
    total = steps_per_epoch * params.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(params.warmup_epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best, best_state = [], -1.0, None
    t_train = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        t_epoch, loss_sum = time.perf_counter(), 0.0
        order = torch.from_numpy(tr_idx)[torch.randperm(len(tr_idx), generator=gen)]
        for step in range(steps_per_epoch):
            idx = order[step * params.batch_size : (step + 1) * params.batch_size]
            x = normalize(augment(images[idx], generator=gen).to(device))
            if params.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(device)
            with autocast:
                loss = F.cross_entropy(model(x), y, label_smoothing=params.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            if (step + 1) % 100 == 0:
                rate = (step + 1) * params.batch_size / (time.perf_counter() - t_epoch)
                print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss_sum / (step + 1):.4f} "
                      f"{rate:.0f} img/s", flush=True)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
                 "seconds": round(time.perf_counter() - t_epoch, 2)}
        if len(val_idx):
            logits = predict_logits(model, images[val_idx], eval_norm, batch_size=512, device=device,
                                    channels_last=params.channels_last, bf16=bf16)
            entry["val_accuracy"] = float((logits.argmax(1) == labels[val_idx]).float().mean())
        history.append(entry)
        print(f"epoch {epoch + 1}/{params.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                                                               if k != "epoch"), flush=True)
        score = entry.get("val_accuracy", epoch)  # without a val split: the last epoch
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save_checkpoint(out_dir / "checkpoint.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                         scheduler=sched.state_dict(), epoch=epoch + 1, generator=gen.get_state(),
                         torch_rng=torch.get_rng_state())

    train_seconds = time.perf_counter() - t_train
    _save_checkpoint(out_dir / "model.pt", state_dict=best_state)
    n_seen = len(tr_idx) * params.epochs
    meta = {
        "spec": asdict(spec),
        "classes": classes,
        "dataset_version": version,
        "n_train": len(tr_idx),
        "n_val": len(val_idx),
        "device": str(device),
        "bf16": bf16,
        "parameters": count_parameters(model),
        "history": history,
        "best_val_accuracy": best if len(val_idx) else None,
        "seconds": {"load": round(t_loaded - t_start, 2), "train": round(train_seconds, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
        "images_per_second": round(n_seen / train_seconds, 1),
        "model_sha256": sha256_file(out_dir / "model.pt"),
    }
    atomic_write_json(out_dir / "model.json", meta)
    return TrainResult(str(out_dir / "model.pt"), version, meta["best_val_accuracy"], params.epochs,
                       meta["seconds"]["total"], meta["images_per_second"])


def load_trained(model_dir: Path):
    """(model, spec, meta) from a train output folder; weights loaded with weights_only=True."""
    from tasks.models import rebuild_model

    meta = read_json(Path(model_dir) / "model.json")
    spec = ModelSpec(**meta["spec"])
    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    return rebuild_model(spec, state), spec, meta


def run(params: Params) -> TrainResult:
    out_dir = params.paths.data / "train"
    result = train(params.paths.data / "curate", params=params.train, out_dir=out_dir, seed=params.seed)
    dump_resolved(params, out_dir / "params.resolved.yaml")
    return result


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    r = run(load_params(overrides=argv or []))
    print(f"trained on {r.version}: best val accuracy {r.best_val_accuracy}, {r.seconds:.0f}s, "
          f"{r.images_per_second:.0f} img/s → {r.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
