"""Pretraining as a stage: train on a source dataset, fine-tune from it on another, with lineage."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from tasks import curate, ingest, pretrain, train
from tasks.models import build_model
from tasks.weights import WeightsError, train_weights
from tests.conftest import tiny_params

FMNIST = "/usr/share/datasets/fashion-mnist"
FOOTWEAR = {"Sandal", "Sneaker", "Ankle boot"}
CLASSES = "[T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot]"
SOURCE = [f"pretrain.source={{path: {FMNIST}, format: idx, classes: {CLASSES}}}", "pretrain.limit_per_split=600",
          "pretrain.epochs=3", "curate.fiftyone=false", "train.image_size=32"]


def _target_folder(pretrain_dir, dest):
    """A different task on other images: footwear vs the rest, from the source's test split."""
    rows = pd.read_parquet(pretrain_dir / "ingest" / "manifest.parquet")
    rows = rows[rows["split"] == "test"].reset_index(drop=True)
    for i, r in rows.iterrows():
        split = "test" if i % 4 == 0 else "train"
        folder = dest / split / ("footwear" if r["label"] in FOOTWEAR else "other")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(pretrain_dir / "ingest" / r["path"], folder / f"{i}.png")
    return dest


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    params = tiny_params(tmp, SOURCE + ["pretrain.enabled=true"])
    result = pretrain.run(params)
    return tmp, params, result


def test_disabled_stage_writes_only_its_marker(tmp_path):
    params = tiny_params(tmp_path, ["pretrain.enabled=false"])
    (tmp_path / "data" / "pretrain" / "model").mkdir(parents=True)  # stale weights of an earlier run
    assert pretrain.run(params).enabled is False
    out = tmp_path / "data" / "pretrain"
    assert json.loads((out / "pretrain.json").read_text()) == {"enabled": False}
    assert sorted(p.name for p in out.iterdir()) == ["pretrain.json"]
    with pytest.raises(WeightsError, match="pretrain.enabled"):
        train_weights(tiny_params(tmp_path, ["train.weights=pretrain"]))


def test_pretrain_writes_weights_and_source_lineage(pretrained):
    tmp, params, result = pretrained
    info = json.loads((tmp / "data" / "pretrain" / "pretrain.json").read_text())
    meta = json.loads((tmp / "data" / "pretrain" / "model" / "model.json").read_text())
    assert result.enabled and info["enabled"] and info["model_sha256"] == meta["model_sha256"]
    assert info["source_version"] == meta["dataset_version"] and len(info["classes"]) == 10
    assert meta["spec"]["n_classes"] == 10 and info["best_val_accuracy"] > 0.3  # 10 classes: chance 0.1


def test_fine_tune_from_pretrained_weights_records_lineage(pretrained, tmp_path):
    tmp, _, _ = pretrained
    target = _target_folder(tmp / "data" / "pretrain", tmp_path / "target")
    params = tiny_params(tmp_path, SOURCE + ["pretrain.enabled=true", "train.weights=pretrain",
                                             f"ingest.source={{path: {target}, format: image-folder}}",
                                             "train.epochs=2"])
    shutil.copytree(tmp / "data" / "pretrain", tmp_path / "data" / "pretrain")  # the stage's output
    ingest.run(params)
    curate.run(params)
    train.run(params)
    meta = json.loads((tmp_path / "data" / "train" / "model.json").read_text())
    source = json.loads((tmp / "data" / "pretrain" / "pretrain.json").read_text())
    lineage = meta["spec"]["extra"]["pretrained_from"]
    assert meta["classes"] == ["footwear", "other"] and meta["spec"]["n_classes"] == 2
    assert lineage["model_sha256"] == source["model_sha256"]
    assert lineage["dataset_version"] == source["source_version"] and len(lineage["classes"]) == 10
    assert meta["best_val_accuracy"] > 0.6  # two classes, footwear is 30%: better than the majority

    # The backbone started from the pretrained tensors, the head is new.
    torch.manual_seed(0)
    model, _ = build_model("mobilenet_v2", 2, weights=str(tmp / "data/pretrain/model/model.pt"), image_size=32)
    source_state = torch.load(tmp / "data/pretrain/model/model.pt", weights_only=True)["state_dict"]
    start = model.state_dict()
    assert torch.equal(start["features.5.conv.1.0.weight"], source_state["features.5.conv.1.0.weight"])
    assert start["classifier.1.weight"].shape == (2, 1280) != source_state["classifier.1.weight"].shape
