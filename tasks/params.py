"""Typed models of params.yaml; the only module that reads YAML.

Every section of params.yaml has a model here with unknown keys rejected, so a typo in
params.yaml or in a `-S section.key=value` override fails at load, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml or an override does not match the typed models."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(_Strict):
    data: Path = Path("data")
    reports: Path = Path("reports")
    versions: Path = Path("dataset-versions.jsonl")  # registry of every dataset version (git-tracked)
    curation: Path = Path("curation")  # curators' decisions per dataset version (git-tracked CSVs)
    cache: Path = Path(".cache")  # recomputable caches (embeddings), never versioned


FORMATS = ("auto", "idx", "image-folder", "csv", "parquet", "coco", "voc", "yolo")


class SourceParams(_Strict):
    path: Path
    format: Literal["auto", "idx", "image-folder", "csv", "parquet", "coco", "voc", "yolo"] = "auto"
    classes: list[str] | None = None


class ArchiveParams(_Strict):
    """Caps checked on an archive's member list before anything is extracted."""

    max_members: int = Field(default=1_000_000, ge=1)
    max_total_bytes: int = Field(default=50 * 2**30, ge=1)
    max_ratio: float = Field(default=200.0, gt=1)  # uncompressed / compressed, per member and overall


class IngestParams(_Strict):
    source: SourceParams
    limit_per_split: int | None = Field(default=None, ge=1)
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)  # quarantined / all; above it the stage fails
    max_pixels: int = Field(default=100_000_000, ge=1)          # decompression-bomb cap per image
    decode_timeout_s: float = Field(default=30.0, gt=0)         # per image, in the worker
    workers: int = Field(default=0, ge=0)                        # 0: one per core
    archive: ArchiveParams = ArchiveParams()


Severity = Literal["error", "warn"]


class SeverityParams(_Strict):
    # images table (both tasks) and class shape; label_in_class_map checks box labels for detection
    label_in_class_map: Severity = "error"
    no_nulls: Severity = "error"
    unique_sample_id: Severity = "error"
    split_allowed: Severity = "error"
    split_fraction_in_bounds: Severity = "error"
    image_size_in_bounds: Severity = "error"
    min_per_class: Severity = "error"
    class_imbalance: Severity = "error"
    no_cross_split_content: Severity = "warn"
    # detection only: the boxes table joined to its images
    box_image_in_manifest: Severity = "error"
    box_inside_image: Severity = "error"
    box_positive_size: Severity = "error"
    box_coords_ordered: Severity = "error"
    box_area_in_bounds: Severity = "error"
    max_boxes_per_image: Severity = "error"
    box_not_xywh: Severity = "warn"


class ValidateParams(_Strict):
    allowed_splits: list[str] = ["train", "val", "test"]
    # [min, max] share of all images per split; a split absent from the data has share 0
    split_fraction: dict[str, tuple[float, float]] = {"train": (0.4, 0.95), "val": (0.0, 0.3),
                                                      "test": (0.05, 0.5)}
    min_per_class: int = Field(default=1, ge=0)
    max_class_imbalance: float = Field(default=10.0, ge=1)  # per split: largest class / smallest
    min_width: int = Field(default=1, ge=1)
    max_width: int = Field(default=100_000, ge=1)
    min_height: int = Field(default=1, ge=1)
    max_height: int = Field(default=100_000, ge=1)
    box_tolerance: float = Field(default=1.0, ge=0)        # px a box corner may lie outside its image
    min_box_side: float = Field(default=1.0, gt=0)         # px: shortest allowed box side
    min_box_area: float = Field(default=0.0, ge=0, le=1)   # box area / image area
    max_box_area: float = Field(default=1.0, gt=0, le=1)
    max_boxes_per_image: int = Field(default=1000, ge=1)
    xywh_max_fraction: float = Field(default=0.01, ge=0, le=1)  # of boxes looking like xywh before box_not_xywh fails
    severity: SeverityParams = SeverityParams()

    def model_post_init(self, context) -> None:  # pydantic reports a ValueError here as a validation error
        for split, (lo, hi) in self.split_fraction.items():
            if split not in self.allowed_splits:
                raise ValueError(f"split_fraction.{split}: not one of allowed_splits {self.allowed_splits}")
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"split_fraction.{split}: [{lo}, {hi}] must satisfy 0 <= min <= max <= 1")
        for lo, hi in (("min_width", "max_width"), ("min_height", "max_height"), ("min_box_area", "max_box_area")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} is above {hi}={getattr(self, hi)}")


class DatabaseParams(_Strict):
    uri: str | None = None  # a MongoDB of your own; null: the project's mongod on 127.0.0.1:port
    port: int = Field(default=27027, ge=1024, le=65535)
    dir: Path = Path(".fiftyone/db")
    timeout_s: float = Field(default=5.0, gt=0)
    cache_size_gb: float = Field(default=1.0, ge=0.25)


class SignalsParams(_Strict):
    enabled: bool = True
    embedding_dim: int = Field(default=64, ge=2)  # PCA of the backbone's features
    batch_size: int = Field(default=512, ge=1)
    near_duplicate_threshold: float = Field(default=0.025, gt=0, lt=2)  # cosine distance
    mislabeled_fraction: float = Field(default=0.05, gt=0, le=1)  # size of the likely-mislabeled view


class CurateParams(_Strict):
    fiftyone: bool = True
    dataset_prefix: str = "pixelops"
    exclude_duplicates: bool = True
    exclude_leakage: bool = True
    exclude_near_leakage: bool = True  # train/val near-duplicates of test images (needs signals)
    app_port: int = Field(default=5151, ge=1024, le=65535)
    database: DatabaseParams = DatabaseParams()
    signals: SignalsParams = SignalsParams()


class AugmentParams(_Strict):
    """Train-time augmentation (tasks.augment). The fast batched ops run on whole uint8 batches;
    `policy` adds a per-sample torchvision v2 policy; `mixup_alpha`/`cutmix_alpha` mix batches."""

    flip_p: float = Field(default=0.5, ge=0, le=1)
    pad_crop: int = Field(default=2, ge=0)       # random translation by up to N px (pad then crop)
    resized_crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range, e.g. [0.6, 1]
    erasing_p: float = Field(default=0.0, ge=0, le=1)
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    randaugment_ops: int = Field(default=2, ge=1)
    randaugment_magnitude: int = Field(default=9, ge=0, le=30)
    mixup_alpha: float = Field(default=0.0, ge=0)   # 0: off
    cutmix_alpha: float = Field(default=0.0, ge=0)  # 0: off; with both on, one of the two per batch

    def model_post_init(self, context) -> None:
        if self.resized_crop_scale is not None:
            lo, hi = self.resized_crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"resized_crop_scale [{lo}, {hi}] must satisfy 0 < min <= max <= 1")


class LoraParams(_Strict):
    """LoRA adapters via peft (train.finetune=lora) on the backbone's conv and linear layers."""

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class DetectionParams(_Strict):
    """Faster R-CNN training on a detection dataset version (tasks.detection)."""

    arch: Literal["fasterrcnn_mobilenet_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                  "fasterrcnn_resnet50_fpn_v2"] = "fasterrcnn_mobilenet_v2"
    weights: str | None = "IMAGENET1K_V1"  # backbone weights: a torchvision name or a file path
    tile_size: int = Field(default=400, ge=64)       # images larger than this are cut into tiles
    tile_overlap: float = Field(default=0.2, ge=0, lt=1)
    min_visible: float = Field(default=0.5, gt=0, le=1)  # a cut box is kept when this share lies in the tile
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=2, ge=1)
    lr: float = Field(default=0.04, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    trainable_backbone_layers: int = Field(default=3, ge=0)
    score_threshold: float = Field(default=0.05, ge=0, le=1)


CLASSIFIERS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34",
               "resnet50", "resnet18_small", "efficientnet_b0", "efficientnet_b1")


class TrainParams(_Strict):
    model: Literal["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34",
                   "resnet50", "resnet18_small", "efficientnet_b0", "efficientnet_b1"] = "mobilenet_v2"
    weights: str | None = "IMAGENET1K_V1"  # torchvision name, .pth file, or "pretrain" (tasks.pretrain)
    allow_download: bool = False  # fetch a missing torchvision weights file from its URL
    image_size: int = Field(default=32, ge=16)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: float = Field(default=0.3, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    num_threads: int = Field(default=2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto", True, False] = "auto"
    channels_last: bool = True
    augment: AugmentParams = AugmentParams()
    finetune: Literal["full", "linear_probe", "partial", "lora"] = "full"
    trainable_stages: int = Field(default=2, ge=1)  # partial: the last N backbone stages train
    lora: LoraParams = LoraParams()
    keep_checkpoints: int = Field(default=2, ge=1)  # newest K epoch checkpoints kept for resume
    resume: bool = True  # continue from the newest valid checkpoint of this exact configuration
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd only (Nesterov)
    grad_clip: float | None = Field(default=None, gt=0)  # max global gradient norm; null: off
    ema_decay: float | None = Field(default=None, gt=0, lt=1)  # EMA of weights, evaluated and saved; null: off
    early_stopping_patience: int | None = Field(default=None, ge=1)  # epochs without val gain; null: off
    compile: bool = False  # torch.compile the model (pays a compile time; mostly for CUDA)
    detection: DetectionParams = DetectionParams()


class PretrainParams(_Strict):
    """Stage pretrain (tasks.pretrain): train.model on a source dataset, fine-tuned from later
    with `train.weights: pretrain`. Architecture, input size and device come from `train:`; the
    recipe is TrainParams' defaults with these epochs, lr and batch size."""

    enabled: bool = False
    source: SourceParams | None = None
    limit_per_split: int | None = Field(default=None, ge=1)
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=128, ge=1)
    weights: str | None = "IMAGENET1K_V1"  # what pretraining starts from (torchvision name, file, null)


class SearchDim(_Strict):
    """One tunable's distribution in `tune.space` (key: a dotted path into `train:`)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False      # float/int: sample on a log scale (learning rates, weight decay)
    step: float | None = None
    choices: list[str | int | float | bool | None] | None = None
    when: dict[str, str | int | float | bool | None] | None = None  # only sampled when earlier keys have these values

    def model_post_init(self, context) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"{self.type} needs low <= high (got low={self.low}, high={self.high})")
        elif self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")


class TuneParams(_Strict):
    """Stage tune (tasks.tune): an Optuna sweep over `space`, each trial the train stage's own
    train() with the trial's values; the best trial's values feed the final train stage."""

    enabled: bool = False
    trials: int = Field(default=20, ge=1)               # trials to finish (complete, pruned or failed)
    timeout_s: float | None = Field(default=None, gt=0)  # per run of the stage: no new trial after this
    epochs: int | None = Field(default=None, ge=1)      # per trial; null: train.epochs
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(default=5, ge=0)        # random trials before TPE, and before pruning starts
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    warmup_epochs: int = Field(default=1, ge=0)         # median: epochs a trial runs before it can be pruned
    workers: int = Field(default=1, ge=1)               # local worker processes, threads split between them
    storage: str | None = None   # null: Optuna journal file under paths.cache/tune; or postgresql+psycopg://...
    heartbeat_s: float = Field(default=20.0, gt=0)      # a running trial's liveness stamp
    stale_after_s: float = Field(default=180.0, gt=0)   # no stamp for this long: its worker is gone
    space: dict[str, SearchDim] = {}

    def model_post_init(self, context) -> None:
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s}) must exceed 2 × heartbeat_s ({self.heartbeat_s})")
        keys = list(self.space)
        for key, dim in self.space.items():
            _train_field(key)
            for cond in dim.when or {}:
                if cond not in keys[: keys.index(key)]:
                    raise ValueError(f"space.{key}.when: {cond!r} must be a key of space listed before {key!r}")


def _train_field(dotted: str):
    """The pydantic field a dotted `train:` key names; ValueError listing the known keys if none."""
    model, field = TrainParams, None
    for i, part in enumerate(dotted.split(".")):
        if model is None or part not in model.model_fields:
            known = sorted(model.model_fields) if model is not None else []
            raise ValueError(f"space key {dotted!r}: {'.'.join(dotted.split('.')[:i + 1])} is not a train: "
                             f"param; known here: {known}")
        field = model.model_fields[part]
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is not None:
        raise ValueError(f"space key {dotted!r} is a section; name one of its params: {sorted(model.model_fields)}")
    return field


def with_values(params: TrainParams, values: dict, **fixed) -> TrainParams:
    """`params` with dotted `train:` keys set (a trial's values), re-validated; `fixed` top-level keys last."""
    data = params.model_dump(mode="json")
    for dotted, value in values.items():
        _train_field(dotted)
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    data.update(fixed)
    return TrainParams.model_validate(data)


class EvaluateParams(_Strict):
    batch_size: int = Field(default=512, ge=1)
    top_k: int = Field(default=3, ge=2)  # top-k accuracy beside top-1
    calibration_bins: int = Field(default=15, ge=2, le=100)  # ECE and the reliability diagram
    bootstrap: int = Field(default=1000, ge=0)  # resamples of the test set for intervals; 0: none
    ci: float = Field(default=0.95, gt=0, lt=1)
    gallery: int = Field(default=24, ge=0)  # most confident mistakes shown in the report


class ExportParams(_Strict):
    enabled: bool = True
    formats: list[Literal["torchscript", "onnx"]] = ["torchscript", "onnx"]
    quantize: Literal["int8", "none"] = "int8"  # ONNX Runtime static int8, calibrated on train images
    opset: int = Field(default=18, ge=13)
    parity_atol: float = Field(default=1e-3, gt=0)  # max |logit difference| vs PyTorch on test images
    parity_images: int = Field(default=256, ge=1)
    calibration_images: int = Field(default=256, ge=1)
    latency_runs: int = Field(default=30, ge=1)  # single-image CPU latency: median of this many

    @model_validator(mode="after")
    def _int8_needs_onnx(self):
        if self.quantize == "int8" and "onnx" not in self.formats:
            raise ValueError(f"export.quantize: int8 quantizes the ONNX model; add onnx to export.formats "
                             f"(now {self.formats}) or set quantize: none")
        return self


class ServerParams(_Strict):
    """The Prefect server `pixelops serve` starts (tasks never read this), and the DVC writer lock."""
    host: str = "127.0.0.1"  # loopback by default: anything else exposes the API (see README, auth)
    port: int = Field(default=4200, ge=1, le=65535)
    startup_timeout_s: float = Field(default=120, gt=0)
    repo_lock_timeout_s: float = Field(default=3600, ge=0)  # how long a run waits for another's DVC writes


class Params(_Strict):
    seed: int = 0
    paths: PathsParams = PathsParams()
    ingest: IngestParams
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    curate: CurateParams = CurateParams()
    pretrain: PretrainParams = PretrainParams()
    tune: TuneParams = TuneParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    server: ServerParams = ServerParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_


def parse_override(text: str) -> tuple[list[str], object]:
    """Parse a DVC-style override `section.key=value`; the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str], *, create: bool = False) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` override set.

    The key path must exist in `raw`, unless `create` (keys the file leaves to the model's
    defaults; the typed models still reject unknown ones when the result is validated).
    """
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            if create and node.get(k) is None:
                node[k] = {}
            if not isinstance(node.get(k), dict):
                raise ParamsError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a section of params.yaml")
            node = node[k]
        if keys[-1] not in node and not create:
            raise ParamsError(f"override {text!r}: unknown key {'.'.join(keys)}; known here: {sorted(node)}")
        node[keys[-1]] = value
    return out


def load_raw(path: Path | str = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def from_dict(data: dict, *, origin: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        lines = [f"{origin}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Load params.yaml (plus `-S key=value` overrides) into the typed `Params` model."""
    raw = apply_overrides(load_raw(path), overrides or [])
    return from_dict(raw, origin=str(path))


def section_dict(params: Params, section: str) -> dict:
    """One section as plain JSON-able data (for cache keys and params.resolved.yaml)."""
    if section == "validate":
        return params.validate_.model_dump(mode="json")
    value = getattr(params, section)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def dump_resolved(params: Params, path: Path) -> None:
    """Write the fully resolved params (defaults filled in) beside a stage's outputs."""
    from tasks.io import atomic_write_text

    data = params.model_dump(mode="json", by_alias=True)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
