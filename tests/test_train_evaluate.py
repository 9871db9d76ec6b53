"""Train and evaluate on a tiny real Fashion-MNIST version; presets; weights resolution."""

from __future__ import annotations

import json

import pytest
import torch

from tasks import curate, evaluate, ingest, train
from tasks.data import TrainAugment, split_train_val
from tasks.metrics import classification_metrics
from tasks.weights import WeightsError, resolve_weights
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    params = tiny_params(tmp, ["curate.fiftyone=false", "train.epochs=2", "ingest.limit_per_split=600"])
    ingest.run(params)
    curate.run(params)
    return params, train.run(params)


def test_train_writes_model_and_lineage(trained):
    params, result = trained
    out = params.paths.data / "train"
    meta = json.loads((out / "model.json").read_text())
    assert meta["dataset_version"] == result.version
    assert meta["spec"]["arch"] == "mobilenet_v2" and meta["spec"]["weights_sha256"].startswith("b0353104")
    assert len(meta["history"]) == 2 and meta["n_val"] == 30
    assert (out / "params.resolved.yaml").is_file() and meta["finetune"] == "full"
    # epoch checkpoints live in the cache, outside the DVC output, as plain tensor dicts
    assert not list(out.glob("*checkpoint*")) and meta["checkpoint_dir"].startswith(str(params.paths.cache))
    last = max((params.paths.cache / "train").glob("*/epoch-*.pt"))
    state = torch.load(last, weights_only=True)
    assert last.name == "epoch-0002.pt" and state["epoch"] == 2 and "optimizer" in state


def test_evaluate_beats_chance_and_writes_report(trained):
    params, _ = trained
    result = evaluate.run(params)
    assert result.n_test == 600
    assert result.accuracy > 0.5  # 10 classes: chance is 0.1; a pretrained backbone learns fast
    metrics = json.loads((params.paths.reports / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "n_test"}
    html = (params.paths.reports / "evaluate" / "index.html").read_text()
    assert "T-shirt/top" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert (params.paths.reports / "evaluate" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_classification_metrics_known_values():
    import numpy as np

    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "<c>"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["<c>"]["recall"] == 0.0
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    y = TrainAugment(flip_p=1.0, pad_crop=0, erasing_p=0.0)(x, generator=g)
    assert torch.equal(y, x.flip(3))
    z = TrainAugment(flip_p=0.0, pad_crop=2, erasing_p=0.0)(x, generator=g)
    assert z.shape == x.shape and z.dtype == torch.uint8


def test_val_split_is_reproducible():
    a = split_train_val(1000, val_fraction=0.1, seed=3)
    b = split_train_val(1000, val_fraction=0.1, seed=3)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a[1]) == 100
    assert not set(a[0]) & set(a[1])


def test_missing_weights_fail_fast_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not found and downloads are off"):
        resolve_weights("resnet18", "IMAGENET1K_V1")
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="does not start with b0353104"):
        resolve_weights("mobilenet_v2", str(bad))
