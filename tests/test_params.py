"""params.yaml loads into typed models; unknown keys and bad overrides fail naming the key."""

from __future__ import annotations

import pytest

from tasks.params import ParamsError, apply_overrides, from_dict, load_params, load_raw
from tests.conftest import ROOT


def test_params_yaml_loads():
    p = load_params(ROOT / "params.yaml")
    assert p.train.model in {"mobilenet_v2", "resnet18", "resnet18_small"}
    assert p.validate_params.severity.unique_sample_id == "error"


def test_override_dvc_style():
    p = load_params(ROOT / "params.yaml", overrides=["train.epochs=7", "train.lr=0.01", "train.weights=null"])
    assert (p.train.epochs, p.train.lr, p.train.weights) == (7, 0.01, None)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key train.epoch"),
    ("nope.x=1", "nope is not a section"),
    ("train.epochs", "expected KEY=VALUE"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(ROOT / "params.yaml", overrides=[override])


def test_unknown_key_in_file_is_rejected():
    raw = load_raw(ROOT / "params.yaml")
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match="train.learning_rate"):
        from_dict(raw)


def test_wrong_type_is_rejected():
    with pytest.raises(ParamsError, match="train.epochs"):
        from_dict(apply_overrides(load_raw(ROOT / "params.yaml"), ["train.epochs=many"]))
