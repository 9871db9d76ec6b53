"""tasks.lora: peft LoRA on MobileNetV2 (ImageNet weights) trained on real Fashion-MNIST images.

One module fixture wraps the model and trains it for a few dozen steps; the tests check what
trained, that the merged plain model matches and rebuilds without peft, and accuracy over chance.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tasks.data import Normalize
from tasks.lora import apply_lora, lora_targets, merge_lora, merged_state_dict
from tasks.models import build_model, head_name, rebuild_model, set_train_mode
from tasks.params import LoraParams
from tests.conftest import ROOT

ARCH = "mobilenet_v2"
FMNIST = "/usr/share/datasets/fashion-mnist"
STEPS, BATCH = 30, 64


def _fashion_mnist(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of a split as uint8 (n, 1, 32, 32), and their labels."""
    from pathlib import Path

    from tasks.formats import _read_idx

    root = Path(FMNIST)
    images = torch.from_numpy(_read_idx(root / f"{split}-images-idx3-ubyte.gz", 0x00000803)[:n].copy())
    labels = torch.from_numpy(_read_idx(root / f"{split}-labels-idx1-ubyte.gz", 0x00000801)[:n].copy())
    images = F.interpolate(images[:, None].float(), size=32, mode="bilinear").round().to(torch.uint8)
    return images, labels.long()


@pytest.fixture(scope="module")
def trained():
    """(initial state, trained peft model, info, spec, normalize, test images, test labels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is the fastest and steadiest
    torch.manual_seed(0)
    model, spec = build_model(ARCH, 10, weights="IMAGENET1K_V1", image_size=32)
    plain_keys = list(model.state_dict())
    model, info = apply_lora(model, ARCH, LoraParams(rank=8, alpha=16, dropout=0.0), head_name(ARCH))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normalize = Normalize(spec.mean, spec.std, channels=3)
    x_train, y_train = _fashion_mnist("train", STEPS * BATCH)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    set_train_mode(model)
    for step in range(STEPS):
        idx = slice(step * BATCH, (step + 1) * BATCH)
        loss = F.cross_entropy(model(normalize(x_train[idx])), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    x_test, y_test = _fashion_mnist("t10k", 300)
    yield {"before": before, "model": model, "info": info, "spec": spec, "plain_keys": plain_keys,
            "normalize": normalize, "x": x_test, "y": y_test}
    torch.set_num_threads(threads)


def _logits(model, normalize, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(normalize(x))


def test_only_adapters_and_head_change(trained):
    model, before = trained["model"], trained["before"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every adapter and the head moved; BatchNorm statistics did not


def test_frozen_batchnorm_stays_in_eval_mode(trained):
    model = set_train_mode(trained["model"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_trainable_count_is_adapters_plus_head(trained):
    """rank 8 on mobilenet_v2, 10 classes: 148,696 LoRA + 12,810 head = 161,506 of 2.4M (6.7%)."""
    info, r = trained["info"], 8
    base = trained["model"].get_base_model()
    expected_lora = 0
    for name in info["target_modules"]:
        layer = base.get_submodule(name).get_base_layer()
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            expected_lora += r * (layer.in_channels * kh * kw + layer.out_channels)
        else:
            expected_lora += r * (layer.in_features + layer.out_features)
    counts = info["parameters"]
    assert counts["lora"] == expected_lora and counts["head"] == 1280 * 10 + 10
    assert counts["trainable"] == counts["lora"] + counts["head"]
    assert counts["trainable"] < 0.1 * counts["total"]
    # the depthwise 3×3 convs are left out (peft cannot merge grouped convs), every other conv is in
    assert len(info["skipped_grouped_convs"]) == 17 and len(info["target_modules"]) == 35


def test_merged_model_matches_and_rebuilds_without_peft(trained):
    model, normalize, x = trained["model"], trained["normalize"], trained["x"][:64]
    wrapped = _logits(model, normalize, x)
    state = merged_state_dict(model)
    assert list(state) == trained["plain_keys"]
    assert torch.equal(_logits(model, normalize, x), wrapped)  # merged_state_dict left it untouched
    rebuilt = rebuild_model(trained["spec"], state)
    torch.testing.assert_close(_logits(rebuilt, normalize, x), wrapped, atol=1e-4, rtol=1e-4)


def test_a_few_dozen_steps_beat_chance(trained):
    logits = _logits(trained["model"], trained["normalize"], trained["x"])
    accuracy = float((logits.argmax(1) == trained["y"]).float().mean())
    assert accuracy > 0.4, f"accuracy {accuracy:.3f} after {STEPS} steps (chance 0.1)"


def test_resnet_head_is_fc_and_merges_to_plain_keys():
    torch.manual_seed(0)
    model, _ = build_model("resnet18_small", 4, weights=None, image_size=32)
    keys = list(model.state_dict())
    model, info = apply_lora(model, "resnet18_small", LoraParams(rank=4), head_name("resnet18_small"))
    assert "fc" not in info["target_modules"] and not info["skipped_grouped_convs"]
    x = torch.randn(2, 3, 32, 32)
    wrapped = _logits(model, torch.nn.Identity(), x)
    plain = merge_lora(model)
    assert type(plain).__name__ == "ResNet" and list(plain.state_dict()) == keys
    torch.testing.assert_close(_logits(plain, torch.nn.Identity(), x), wrapped, atol=1e-4, rtol=1e-4)


def test_unknown_head_is_an_error():
    model, _ = build_model("resnet18_small", 4, weights=None, image_size=32)
    with pytest.raises(ValueError, match="no head module 'classifier.1'"):
        apply_lora(model, "resnet18_small", LoraParams(), "classifier.1")


def test_targets_leave_out_depthwise_convs_and_head():
    model, _ = build_model(ARCH, 10, weights=None, image_size=32)
    adapted, skipped = lora_targets(model, head_name(ARCH))
    assert head_name(ARCH) not in adapted + skipped
    assert all(model.get_submodule(n).groups > 1 for n in skipped)
    assert "features.0.0" in adapted and "features.18.0" in adapted


def test_import_is_cheap():
    """`import tasks.lora` does not import peft (nor transformers)."""
    code = "import sys, tasks.lora; print('peft' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
