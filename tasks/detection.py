"""Faster R-CNN training and evaluation on a detection dataset version (the train stage's detection path).

Inputs:  the curate stage's output (manifest.parquet with `excluded`; curation.json, whose
         "images_root" is the ingest folder holding the images, annotations.parquet and
         classes.json); backbone ImageNet weights from torch's hub cache or a file (tasks.weights:
         offline, hash-checked).
Outputs: out_dir/model.pt    {"state_dict": ...} of the kept weights (load with weights_only=True)
         out_dir/model.json  spec to rebuild the detector (arch, anchors, tile size), classes,
                             tiling, dataset version, history, seconds, training tiles/s,
                             parameter counts, val/test metrics
Cache:   <cache_dir>/train/det-<run key>/epoch-NNNN.pt (tasks.checkpoints; the key adds this
         module's and tasks/detection_data.py's source), resumed with `train.resume`.
Params:  `train.detection`; from `train:` num_threads, device, bf16, resume, keep_checkpoints;
         `seed` is passed in.

Training: the "train" split's tiles (tasks.detection_data), SGD with momentum, linear warm-up
over the first epoch (at most a fifth of the run), cosine decay to zero. With a "val" split its
tile mAP@.50 after each epoch picks the epoch kept; without one, the last. Metrics are COCO-style
on a split's tiles (detection_data.score_tiles): tile-level figures, not full-image ones.

Model: `fasterrcnn_mobilenet_v2` is torchvision's custom-backbone recipe (MobileNetV2 `features`
as a one-map backbone, MultiScaleRoIAlign(['0'], 7, 2)) cut after the stride-16 stage
(features[:14], 96 channels: the "C4" layout of the original Faster R-CNN). On the deepforest
crowns (10-100 px) a stride-32 cell holds a whole crown: after 100 SGD steps mAP@.50 on the
training tiles was 0.03 at stride 32 and 0.21 at stride 16, and the 1280-channel map made the
box head's first layer 64 M weights (4.7 M here), most of a CPU step. Anchors are 16-128 px
(torchvision's 32-512 fit COCO at 800 px); the FPN archs are torchvision's builders with anchors
halved likewise. Tiles are never rescaled (min_size = max_size = tile_size). With backbone
weights, the backbone's BatchNorm is frozen (FrozenBatchNorm2d, torchvision's detection
convention) and its last `trainable_backbone_layers` stages train; from scratch all trains.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models import detection as tvdet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from tasks import checkpoints
from tasks import detection_data as dd
from tasks.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from tasks.models import bf16_supported, count_parameters, set_train_mode
from tasks.params import TrainParams
from tasks.train import resolve_device, warmup_cosine
from tasks.weights import WeightsError, load_state_dict, resolve_weights

# arch -> the torchvision classifier whose ImageNet weights the backbone takes
BACKBONES = {"fasterrcnn_mobilenet_v2": "mobilenet_v2", "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet_v3_large",
             "fasterrcnn_resnet50_fpn_v2": "resnet50"}
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Tree crowns are 10-100 px at native resolution; torchvision's defaults (32-512) fit COCO at 800 px.
ANCHOR_SIZES = {"fasterrcnn_mobilenet_v2": ((16, 32, 64, 128),),
                "fasterrcnn_mobilenet_v3_large_fpn": ((16, 32, 64, 128, 256),) * 3,
                "fasterrcnn_resnet50_fpn_v2": ((16,), (32,), (64,), (128,), (256,))}
C4_BLOCKS = 14  # MobileNetV2 features[:14]: through the last 96-channel block, stride 16
# Proposal and sampling budgets for tiles of a few hundred px holding tens of objects
# (torchvision's 2000 proposals / 512 sampled RoIs are sized for 800-1333 px COCO images).
RCNN_OPTIONS = {"rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500,
                "rpn_pre_nms_top_n_test": 500, "rpn_post_nms_top_n_test": 300,
                "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 128, "box_detections_per_img": 100}
SPLITS_EVALUATED = ("val", "test")


@dataclass
class DetectorSpec:
    """Everything needed to rebuild the detector (no weights file needed)."""

    arch: str
    n_classes: int  # object classes; the model has n_classes + 1 outputs (0 is background)
    tile_size: int
    score_threshold: float
    anchor_sizes: list
    aspect_ratios: list
    frozen_bn: bool
    trainable_backbone_layers: int
    backbone_stages: int
    weights: str | None = None
    weights_sha256: str | None = None
    rcnn: dict = field(default_factory=lambda: dict(RCNN_OPTIONS))


@dataclass(frozen=True)
class DetectionResult:
    model_path: str
    version: str
    epochs_run: int
    seconds: float
    images_per_second: float  # training tiles per second
    val: dict | None
    test: dict | None


# --------------------------------------------------------------------------- the detector


def _skeleton(spec: DetectorSpec) -> tuple[nn.Module, nn.Module]:
    """(detector, backbone body that takes the classifier's weights), all BatchNorm2d, nothing frozen."""
    sizes = tuple(tuple(x) for x in spec.anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(spec.aspect_ratios),) * len(sizes))
    kw = {"min_size": spec.tile_size, "max_size": spec.tile_size, "box_score_thresh": spec.score_threshold,
          "num_classes": spec.n_classes + 1, **spec.rcnn}
    if spec.arch == "fasterrcnn_mobilenet_v2":
        body = models.mobilenet_v2(weights=None).features[:C4_BLOCKS]
        body.out_channels = body[-1].out_channels
        return tvdet.FasterRCNN(body, rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
                                **kw), body
    # The builders without any weights: BatchNorm2d everywhere, every layer trainable.
    model = getattr(tvdet, spec.arch)(weights=None, weights_backbone=None, **kw)
    model.rpn.anchor_generator = anchors  # as many anchors per location as the builder's: the RPN head fits
    return model, model.backbone.body


def backbone_stages(arch: str, body: nn.Module) -> list[list[nn.Module]]:
    """The backbone as stages, input to output; `trainable_backbone_layers` counts from the end.

    mobilenet_v2: the 14 blocks of features[:14], one stage each. mobilenet_v3_large_fpn: torchvision's
    6 stages (split at the strided blocks). resnet50_fpn_v2: conv1 + bn1, layer1 .. layer4.
    """
    blocks = list(body.children())
    if arch == "fasterrcnn_mobilenet_v2":
        return [[b] for b in blocks]
    if arch == "fasterrcnn_mobilenet_v3_large_fpn":
        starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        return [blocks[a:b] for a, b in itertools.pairwise(starts)] + [blocks[starts[-1]:]]
    return [[body.conv1, body.bn1], [body.layer1], [body.layer2], [body.layer3], [body.layer4]]


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d with its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)  # MobileNetV3 uses eps 1e-3
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def _load_backbone(body: nn.Module, arch: str, weights: str) -> str:
    """Load the classifier's ImageNet weights into the backbone body; returns the file's sha256."""
    path, digest, _ = resolve_weights(BACKBONES[arch], weights)  # WeightsError names a missing file
    state = load_state_dict(path)
    prefix = "" if arch == "fasterrcnn_resnet50_fpn_v2" else "features."
    wanted = set(body.state_dict())
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
    missing = sorted(wanted - set(sub))
    if missing:
        raise WeightsError(f"{path}: not {BACKBONES[arch]} weights for {arch}: missing {missing[:5]}")
    body.load_state_dict(sub)
    return digest


def build_detector(arch: str, n_classes: int, *, weights: str | None, trainable_backbone_layers: int,
                   image_size: int, score_threshold: float = 0.05) -> tuple[nn.Module, DetectorSpec]:
    """A Faster R-CNN for `n_classes` object classes (background excluded) on image_size² tiles.

    weights: backbone ImageNet weights, a torchvision name (e.g. IMAGENET1K_V1, looked up in
    torch's hub cache) or a file path; None trains from scratch (every stage and BatchNorm trains).
    trainable_backbone_layers: with weights, the last N stages of `backbone_stages` train.
    Returns (model, spec). Raises WeightsError for a missing or wrong file, ValueError for an
    unknown arch or N above the backbone's stage count.
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown detection arch {arch!r}; allowed: {', '.join(BACKBONES)}")
    spec = DetectorSpec(arch=arch, n_classes=n_classes, tile_size=image_size, score_threshold=score_threshold,
                        anchor_sizes=[list(x) for x in ANCHOR_SIZES[arch]], aspect_ratios=list(ASPECT_RATIOS),
                        frozen_bn=bool(weights), trainable_backbone_layers=0, backbone_stages=0, weights=weights)
    model, body = _skeleton(spec)
    stages = backbone_stages(arch, body)
    if not 0 <= trainable_backbone_layers <= len(stages):
        raise ValueError(f"train.detection.trainable_backbone_layers={trainable_backbone_layers}: {arch} has "
                         f"{len(stages)} backbone stages; allowed 0..{len(stages)}")
    spec.backbone_stages = spec.trainable_backbone_layers = len(stages)
    if weights:
        spec.weights_sha256 = _load_backbone(body, arch, weights)
        freeze_batchnorm(body)
        body.requires_grad_(False)
        for stage in stages[len(stages) - trainable_backbone_layers:]:
            for module in stage:
                module.requires_grad_(True)
        spec.trainable_backbone_layers = trainable_backbone_layers
    return model, spec


def rebuild_detector(spec: DetectorSpec, state_dict: dict) -> nn.Module:
    """The trained detector from its spec and saved state (no pretrained file needed)."""
    model, body = _skeleton(spec)
    if spec.frozen_bn:
        freeze_batchnorm(body)
    model.load_state_dict(state_dict)
    return model


# --------------------------------------------------------------------------- training


def _open_run(cache_dir: Path | None, curate_dir: Path, *, params: TrainParams, seed: int, weights_sha256,
              model, opt, sched, gen, device) -> tuple[Path | None, str | None, tuple]:
    """(checkpoint folder, run key, (start epoch, best, best_state, history)) for this run.

    The key is checkpoints.run_key plus this path's own code, so an edit here never resumes an
    old run; with `params.resume` the newest valid checkpoint is restored, else a fresh start.
    """
    if cache_dir is None:
        return None, None, (0, -1.0, None, [])
    h = hashlib.sha256(checkpoints.run_key(curate_dir, params, seed=seed, weights_sha256=weights_sha256).encode())
    for name in ("detection.py", "detection_data.py"):
        h.update(sha256_file(Path(__file__).parent / name).encode())
    key = "det-" + h.hexdigest()[:16]
    run_dir = checkpoints.run_dir(cache_dir, key)
    state, path = (checkpoints.load_latest(run_dir, key=key, model=model, epochs=params.detection.epochs)
                   if params.resume else (None, None))
    resumed = (0, -1.0, None, [])
    if state is not None:
        resumed = checkpoints.restore(state, model=model, optimizer=opt, scheduler=sched, generator=gen, device=device)
        print(f"resuming after epoch {resumed[0]}/{params.detection.epochs} from {path}", flush=True)
    checkpoints.discard_after(run_dir, resumed[0])  # a fresh start must not keep an older run's later epochs
    return run_dir, key, resumed


def _train_epoch(model, data: dd.TileDataset, *, opt, sched, gen: torch.Generator, batch_size: int,
                 device: torch.device, bf16: bool) -> dict:
    """One pass over the tiles in a seeded order; mean losses, seconds and tiles/s of the steps."""
    set_train_mode(model)  # BatchNorm with frozen parameters stays in eval mode
    order = torch.randperm(len(data), generator=gen)
    data.set_epoch_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    sums: dict[str, float] = {}
    steps, seconds = 0, 0.0
    for idx in dd.batches(len(data), batch_size, order):
        images, targets = dd.collate([data[i] for i in idx])
        images = [im.to(device) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {steps + 1} ({ {k: v.item() for k, v in losses.items()} }); "
                                     "lower train.detection.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        steps += 1
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    return {**{k: round(v / steps, 4) for k, v in sums.items()}, "seconds": round(seconds, 2),
            "tiles_per_second": round(len(data) / max(seconds, 1e-9), 2)}


def _save_weights(path: Path, state_dict: dict) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict}, buf)
    atomic_write_bytes(path, buf.getvalue())  # temp + fsync + rename: never half-written


def _schedule(params: TrainParams, model: nn.Module, n_tiles: int):
    """SGD on the trainable parameters; warm-up over the first epoch (at most a fifth of the run), then cosine."""
    p = params.detection
    steps_per_epoch = math.ceil(n_tiles / p.batch_size)
    total = steps_per_epoch * p.epochs
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=p.lr, momentum=p.momentum,
                          weight_decay=p.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, min(steps_per_epoch, total // 5))))


def _fit(model, train_data, evals: dict, classes: list[str], *, params: TrainParams, opt, sched, gen, device,
         bf16: bool, run_dir: Path | None, key: str | None, start: int, best: float, best_state, history: list):
    """Epochs start+1 .. N, a checkpoint after each; returns (best_state, history)."""
    p = params.detection
    for epoch in range(start, p.epochs):
        entry = {"epoch": epoch + 1, **_train_epoch(model, train_data, opt=opt, sched=sched, gen=gen,
                                                     batch_size=p.batch_size, device=device, bf16=bf16)}
        if evals["val"] is not None:
            entry["val_map_50"] = dd.score_tiles(model, evals["val"], classes, device=device, bf16=bf16)["map_50"]
        history.append(entry)
        print(f"epoch {epoch + 1}/{p.epochs} " + " ".join(f"{k}={v}" for k, v in entry.items() if k != "epoch"),
              flush=True)
        score = entry.get("val_map_50", epoch)  # without a val split: the last epoch
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if run_dir is not None:
            state = checkpoints.capture(epoch=epoch + 1, run_key=key, model=model, optimizer=opt, scheduler=sched,
                                        generator=gen, best=best, best_state=best_state, history=history, device=device)
            checkpoints.save(run_dir, state, keep=params.keep_checkpoints)
    return best_state, history


def train_detection(curate_dir: Path, *, params: TrainParams, out_dir: Path, seed: int = 0,
                    cache_dir: Path | None = None) -> DetectionResult:
    """Train `params.detection.arch` on the train tiles of the curated version in `curate_dir`.

    curate_dir: the curate stage's output (manifest.parquet, curation.json).
    params:     the `train:` section; `params.detection` holds the detector's settings.
    out_dir:    receives model.pt and model.json.
    seed:       seeds the new layers' weights, tile order, augmentation and RoI sampling.
    cache_dir:  epoch checkpoints under cache_dir/train/det-<key>/, resumed with `params.resume`;
                None: no checkpoints.
    Returns a DetectionResult (val/test metrics when those splits have kept rows). Raises
    ValueError when the version is not detection or has no train rows; WeightsError when the
    backbone weights are missing.
    """
    p, t_start = params.detection, time.perf_counter()
    torch.set_num_threads(params.num_threads)
    torch.manual_seed(seed)
    device = resolve_device(params.device)
    bf16 = bf16_supported(device) if params.bf16 == "auto" else bool(params.bf16)
    rows, classes, info = dd.load_version(Path(curate_dir))
    root = Path(info["images_root"])
    tiling = {"tile_size": p.tile_size, "overlap": p.tile_overlap, "min_visible": p.min_visible}
    train_data = dd.split_dataset(rows, "train", root, classes, transform=dd.build_train_transform(), **tiling)
    if train_data is None:
        raise ValueError(f"{curate_dir}/manifest.parquet: no train rows left after curation")
    evals = {s: dd.split_dataset(rows, s, root, classes, transform=dd.build_eval_transform(), **tiling)
             for s in SPLITS_EVALUATED}
    t_loaded = time.perf_counter()

    model, spec = build_detector(p.arch, len(classes), weights=p.weights, image_size=p.tile_size,
                                 trainable_backbone_layers=p.trainable_backbone_layers, score_threshold=p.score_threshold)
    model = model.to(device)
    opt, sched = _schedule(params, model, len(train_data))
    gen = torch.Generator().manual_seed(seed)
    run_dir, key, resumed = _open_run(cache_dir, Path(curate_dir), params=params, seed=seed, model=model, opt=opt,
                                      sched=sched, gen=gen, device=device, weights_sha256=spec.weights_sha256)
    start = resumed[0]
    best_state, history = _fit(model, train_data, evals, classes, params=params, opt=opt, sched=sched, gen=gen,
                               device=device, bf16=bf16, run_dir=run_dir, key=key, start=start, best=resumed[1],
                               best_state=resumed[2], history=resumed[3])
    model.load_state_dict(best_state)
    out_dir = Path(out_dir)
    _save_weights(out_dir / "model.pt", best_state)
    metrics = {s: dd.score_tiles(model, d, classes, device=device, bf16=bf16) if d is not None else None
               for s, d in evals.items()}
    train_seconds = sum(e["seconds"] for e in history[start:])  # the steps this process ran
    meta = {
        "spec": asdict(spec), "classes": classes, "task": "detection", "tiling": tiling,
        "dataset_version": info["version"], "curated_version": info.get("curated_version"),
        "n_train_images": int((rows["split"] == "train").sum()), "n_train_tiles": len(train_data),
        "device": str(device), "bf16": bf16, "parameters": count_parameters(model),
        "resumed_after_epoch": start or None, "checkpoint_dir": str(run_dir) if run_dir is not None else None,
        "history": history, "best_epoch": _best_epoch(history), "val": metrics["val"], "test": metrics["test"],
        "seconds": {"load": round(t_loaded - t_start, 2), "train": round(train_seconds, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
        "images_per_second": round(len(train_data) * (len(history) - start) / max(train_seconds, 1e-9), 2),
        "model_sha256": sha256_file(out_dir / "model.pt"),
    }
    atomic_write_json(out_dir / "model.json", meta)
    return DetectionResult(str(out_dir / "model.pt"), info["version"], len(history), meta["seconds"]["total"],
                           meta["images_per_second"], metrics["val"], metrics["test"])


def _best_epoch(history: list[dict]) -> int:
    scored = [e for e in history if "val_map_50" in e]
    return max(scored, key=lambda e: e["val_map_50"])["epoch"] if scored else history[-1]["epoch"]


# --------------------------------------------------------------------------- evaluation


def load_detector(model_dir: Path) -> tuple[nn.Module, DetectorSpec, dict]:
    """(model, spec, meta) from a train output folder; weights loaded with weights_only=True."""
    meta = read_json(Path(model_dir) / "model.json")
    spec = DetectorSpec(**meta["spec"])
    state = checkpoints.load_file(Path(model_dir) / "model.pt", sha256=meta.get("model_sha256"))["state_dict"]
    return rebuild_detector(spec, state), spec, meta


def evaluate_detection(model_dir: Path, curate_dir: Path, split: str = "test", *, device: str = "cpu",
                       batch_size: int = 4) -> dict:
    """COCO-style metrics of the trained detector in `model_dir` on the tiles of `split`.

    Tiles are cut as in training (model.json "tiling"). Returns score_tiles' dict plus "split",
    "n_images", "dataset_version" and "seconds". Raises ValueError when the split has no kept
    rows or the version's classes differ from the model's.
    """
    t0 = time.perf_counter()
    model, _, meta = load_detector(model_dir)
    rows, classes, info = dd.load_version(Path(curate_dir))
    if classes != meta["classes"]:
        raise ValueError(f"{curate_dir}: classes {classes} differ from the model's {meta['classes']}")
    data = dd.split_dataset(rows, split, Path(info["images_root"]), classes, transform=dd.build_eval_transform(),
                            **meta["tiling"])
    if data is None:
        raise ValueError(f"{curate_dir}/manifest.parquet: no kept rows in split {split!r}; "
                         f"splits here: {sorted(rows['split'].unique())}")
    dev = resolve_device(device)
    scores = dd.score_tiles(model.to(dev), data, classes, device=dev, batch_size=batch_size)
    return {"split": split, "n_images": int((rows["split"] == split).sum()), "dataset_version": info["version"],
            **scores, "seconds": round(time.perf_counter() - t0, 2)}
