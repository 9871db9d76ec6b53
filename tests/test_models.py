"""Architectures, heads and the offline weights mechanism (hash-checked files, no downloads)."""

from __future__ import annotations

import pytest
import torch

from tasks.io import sha256_file
from tasks.models import ARCHS, backbone_stages, build_model, count_parameters, head_name, set_finetune
from tasks.weights import WeightsError, resolve_weights


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_a_new_head_and_trains_its_head_alone(arch):
    torch.manual_seed(0)
    model, spec = build_model(arch, 7, weights=None, image_size=32)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert model.get_submodule(head_name(arch)).out_features == 7 and spec.weights_sha256 is None
    info = set_finetune(model, arch, "linear_probe", 1)
    head = model.get_submodule(head_name(arch))
    assert count_parameters(model)["trainable"] == sum(p.numel() for p in head.parameters())
    assert info["stages"] == len(backbone_stages(model, arch)) >= 5


def test_missing_torchvision_file_is_an_error_naming_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet50-11ad3fa6\.pth not found and downloads are off") as e:
        resolve_weights("resnet50", "IMAGENET1K_V2")
    assert "train.allow_download" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(WeightsError, match="has no weights 'IMAGENET9K'"):
        resolve_weights("resnet50", "IMAGENET9K")


def test_a_file_whose_hash_does_not_match_its_name_is_refused(tmp_path):
    model, _ = build_model("resnet18", 1000, weights=None, image_size=224)
    good = tmp_path / "plain.pth"
    torch.save(model.state_dict(), good)
    prefix = sha256_file(good)[:8]
    named = tmp_path / f"resnet18-{prefix}.pth"
    good.rename(named)
    path, digest, _ = resolve_weights("resnet18", str(named))
    assert path == named and digest.startswith(prefix)
    loaded, spec = build_model("resnet18", 3, weights=str(named), image_size=64)
    assert spec.weights_sha256 == digest
    assert torch.equal(loaded.layer4[1].conv2.weight, model.layer4[1].conv2.weight)

    wrong = tmp_path / "resnet18-00000000.pth"
    named.rename(wrong)
    with pytest.raises(WeightsError, match="does not start with 00000000"):
        build_model("resnet18", 3, weights=str(wrong), image_size=64)


def test_weights_of_another_arch_do_not_fit(tmp_path):
    model, _ = build_model("resnet18", 1000, weights=None, image_size=224)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit resnet34"):
        build_model("resnet34", 3, weights=str(path), image_size=64)
