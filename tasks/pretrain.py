"""Stage pretrain: train on a large source dataset, save the weights, fine-tune from them later.

The seed recipe of transfer learning in two steps: `pretrain` trains `train.model` on
`pretrain.source` (ingested and curated by the same functions as the main data, FiftyOne off),
and the train stage fine-tunes from the result when `train.weights: pretrain`. The target's
model.json then names the source: `spec.extra.pretrained_from` holds the source's curated
version, classes and model sha256 (tasks.models.pretrained_lineage), so a model's lineage runs
back through its pretraining.

Inputs:  `pretrain.source` (any format ingest reads); `pretrain:` epochs, lr, batch size and
         the weights it starts from (e.g. ImageNet); from `train:` only the network and device
         (SHARED), so fine-tuning's own knobs never rerun pretraining.
Outputs: data/pretrain/ (`paths.data`/pretrain)
    pretrain.json        enabled, source, source version, model sha256, epochs, val accuracy
    ingest/, curate/     the source's dataset version and its curation (when enabled)
    model/model.pt       the weights `train.weights: pretrain` fine-tunes from (+ model.json)
Disabled (`pretrain.enabled: false`, the default) the stage writes only pretrain.json, so
the stage graph is the same either way.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks.curate import curate
from tasks.ingest import ingest
from tasks.io import atomic_write_json, read_json
from tasks.params import CurateParams, IngestParams, Params, TrainParams
from tasks.train import train
from tasks.weights import PRETRAIN


@dataclass(frozen=True)
class PretrainResult:
    enabled: bool
    model_path: str | None = None
    source_version: str | None = None
    best_val_accuracy: float | None = None


# What pretraining shares with fine-tuning: the network and where it runs. The rest of the
# recipe is pretrain's own, so tuning the fine-tune (train.lr, ...) never reruns pretraining.
SHARED = ("model", "image_size", "device", "bf16", "channels_last", "num_threads")


def pretrain_recipe(params: Params) -> TrainParams:
    shared = {k: getattr(params.train, k) for k in SHARED}
    p = params.pretrain
    return TrainParams(**shared, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, weights=p.weights)


def pretrain(params: Params, out_dir: Path) -> PretrainResult:
    """Ingest and curate `pretrain.source`, train on it, write the weights under `out_dir`."""
    p = params.pretrain
    out_dir = Path(out_dir)
    if not p.enabled:
        shutil.rmtree(out_dir, ignore_errors=True)  # a disabled stage leaves no stale weights behind
        atomic_write_json(out_dir / "pretrain.json", {"enabled": False})
        return PretrainResult(False)
    if p.source is None:
        raise ValueError("pretrain.enabled: true needs pretrain.source (path and format)")
    if params.train.weights == PRETRAIN:
        raise ValueError("pretrain starts from train.weights, which is 'pretrain' itself; "
                         "set pretrain.weights (e.g. IMAGENET1K_V1 or null)")
    ingested = ingest(p.source, out_dir=out_dir / "ingest",
                      params=IngestParams(source=p.source, limit_per_split=p.limit_per_split))
    # Rules only: near-leak detection needs FiftyOne signals, which a source does not need.
    curated = curate(out_dir / "ingest", params=CurateParams(fiftyone=False, exclude_near_leakage=False),
                     out_dir=out_dir / "curate", curation_dir=params.paths.curation, cache_dir=params.paths.cache,
                     seed=params.seed)
    recipe = pretrain_recipe(params)
    result = train(out_dir / "curate", params=recipe, out_dir=out_dir / "model", seed=params.seed,
                   cache_dir=params.paths.cache)
    meta = read_json(out_dir / "model" / "model.json")
    atomic_write_json(out_dir / "pretrain.json", {
        "enabled": True, "source": str(p.source.path), "source_version": ingested.version,
        "curated_version": curated.curated_version, "classes": ingested.classes, "epochs": p.epochs,
        "weights": p.weights, "model": params.train.model, "model_sha256": meta["model_sha256"],
        "best_val_accuracy": result.best_val_accuracy})
    return PretrainResult(True, result.model_path, curated.curated_version, result.best_val_accuracy)


def run(params: Params) -> PretrainResult:
    return pretrain(params, params.paths.data / "pretrain")


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    r = run(load_params(overrides=argv or []))
    if not r.enabled:
        print("pretrain: off (pretrain.enabled: false)")
    else:
        print(f"pretrained on {r.source_version}: best val accuracy {r.best_val_accuracy} -> {r.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
