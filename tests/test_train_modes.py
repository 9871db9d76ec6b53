"""Fine-tuning modes (what trains, frozen BatchNorm) and exact resume from epoch checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tasks import curate, ingest, recipe, train
from tasks.io import sha256_file
from tasks.models import build_model, set_finetune, set_train_mode
from tests.conftest import ROOT, tiny_params

BASE = ["curate.fiftyone=false", "ingest.limit_per_split=100", "train.image_size=32", "train.batch_size=64",
        "train.epochs=1"]
# Which parameter names train in each mode (mobilenet_v2; partial with trainable_stages=2).
MODES = {"full": ("",), "linear_probe": ("classifier.1.",),
         "partial": ("features.17.", "features.18.", "classifier.1.")}

# Runs tasks.train.train in a fresh process; with a delay, each training step first sleeps
# (no numbers or RNG touched), so the kill lands while training is still under way.
RUN = """
import sys, time
from pathlib import Path
from tasks import data, train
from tasks.params import TrainParams
params, curate_dir, out_dir, cache_dir, delay = sys.argv[1:]
forward = data.TrainAugment.forward
def slowed(self, x, generator=None):
    time.sleep(float(delay))
    return forward(self, x, generator=generator)
data.TrainAugment.forward = slowed
train.train(Path(curate_dir), params=TrainParams.model_validate_json(params), out_dir=Path(out_dir),
            seed=0, cache_dir=Path(cache_dir))
"""


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modes")
    params = tiny_params(tmp, BASE)
    ingest.run(params)
    curate.run(params)
    return params.paths.data / "curate"


def _params(curate_dir, extra):
    return tiny_params(curate_dir.parents[1], BASE + extra).train


def _weights(out_dir) -> dict:
    return torch.load(out_dir / "model.pt", weights_only=True)["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def _assert_same_run(out_dir, cache, expected, ref_cache) -> None:
    """model.pt (the best epoch's weights) and the last epoch's model and optimizer states match."""
    _assert_same_weights(_weights(out_dir), expected)
    ref_meta = json.loads((ref_cache.parent / "ref" / "model.json").read_text())
    assert sha256_file(out_dir / "model.pt") == ref_meta["model_sha256"]  # the same bytes for DVC too
    last, ref = (torch.load(max(c.glob("train/*/epoch-*.pt")), weights_only=True) for c in (cache, ref_cache))
    assert last["epoch"] == ref["epoch"] == 3 and last["best"] == ref["best"]
    _assert_same_weights(last["model"], ref["model"])
    pairs = zip(last["optimizer"]["state"].values(), ref["optimizer"]["state"].values(), strict=True)
    moments = [(a[k], b[k]) for a, b in pairs for k in ("exp_avg", "exp_avg_sq", "step")]
    assert len(moments) == 3 * len(ref["optimizer"]["state"]) and all(torch.equal(a, b) for a, b in moments)


@pytest.fixture(scope="module")
def mode_runs(curated):
    out = {}
    for mode in MODES:
        out_dir = curated.parents[1] / f"train-{mode}"
        train.train(curated, params=_params(curated, [f"train.finetune={mode}", "train.trainable_stages=2"]),
                    out_dir=out_dir, seed=0)
        out[mode] = (_weights(out_dir), json.loads((out_dir / "model.json").read_text()))
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_only_the_chosen_parts_train(mode_runs, mode):
    torch.manual_seed(0)  # as train() does before building the model: the same new head
    model, _ = build_model("mobilenet_v2", 10, weights="IMAGENET1K_V1", image_size=32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trained, meta = mode_runs[mode]
    params = dict(model.named_parameters())
    expected = {k for k in params if k.startswith(MODES[mode])}
    changed = {k for k in params if not torch.equal(initial[k], trained[k])}
    assert changed == expected
    bn_stats = [k for k in initial if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    frozen_bn = [k for k in bn_stats if k.rsplit(".", 1)[0] + ".weight" not in expected]
    assert all(torch.equal(initial[k], trained[k]) for k in frozen_bn)  # eval mode: statistics kept
    assert all(not torch.equal(initial[k], trained[k]) for k in bn_stats if k not in frozen_bn)
    assert meta["finetune"] == mode
    assert meta["parameters"]["trainable"] == sum(params[k].numel() for k in expected)


def test_trainable_counts_order(mode_runs):
    counts = {m: meta["parameters"] for m, (_, meta) in mode_runs.items()}
    assert counts["linear_probe"]["trainable"] < counts["partial"]["trainable"] < counts["full"]["trainable"]
    assert counts["full"]["trainable"] == counts["full"]["total"] == counts["partial"]["total"]


def test_resnet_stages_and_frozen_batchnorm():
    model, _ = build_model("resnet18_small", 10, weights=None, image_size=32)
    info = set_finetune(model, "resnet18_small", "partial", 1)
    assert info == {"mode": "partial", "stages": 5, "trainable_stages": 1}
    assert {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad} == {"layer4", "fc"}
    set_train_mode(model)
    assert not model.bn1.training and not model.layer3[0].bn1.training and model.layer4[0].bn1.training
    with pytest.raises(ValueError, match=r"resnet18_small has 5 backbone stages; allowed 1\.\.5"):
        set_finetune(model, "resnet18_small", "partial", 6)


@pytest.fixture(scope="module")
def reference(curated):
    """An uninterrupted 3-epoch run (dropout on: mobilenet_v2's classifier) with its checkpoints."""
    params = _params(curated, ["train.epochs=3", "train.keep_checkpoints=2"])
    out_dir, cache = curated.parents[1] / "ref", curated.parents[1] / "ref-cache"
    train.train(curated, params=params, out_dir=out_dir, seed=0, cache_dir=cache)
    return params, _weights(out_dir), cache


def _run(params, curated, out_dir, cache, delay=0.0):
    return subprocess.Popen([sys.executable, "-c", RUN, params.model_dump_json(), str(curated), str(out_dir),
                             str(cache), str(delay)], cwd=ROOT, env=os.environ.copy(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_gives_identical_weights(reference, curated, tmp_path):
    params, expected, ref_cache = reference
    kept = sorted(p.name for p in ref_cache.glob("train/*/epoch-*.pt"))
    assert kept == ["epoch-0002.pt", "epoch-0003.pt"]  # keep_checkpoints=2
    proc = _run(params, curated, tmp_path / "out", tmp_path / "cache", delay=0.5)
    deadline = time.monotonic() + 180
    while proc.poll() is None and not list(tmp_path.glob("cache/train/*/epoch-*.pt")):
        assert time.monotonic() < deadline, "no epoch checkpoint after 180 s"
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.communicate()[0]}"
    proc.kill()  # SIGKILL: no cleanup, no atexit
    proc.wait()
    assert proc.returncode == -9 and not (tmp_path / "out" / "model.pt").exists()
    resumed = _run(params, curated, tmp_path / "out", tmp_path / "cache")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resuming after epoch" in log
    _assert_same_run(tmp_path / "out", tmp_path / "cache", expected, ref_cache)


def test_corrupt_newest_checkpoint_falls_back(reference, curated, tmp_path, capsys):
    params, expected, ref_cache = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    newest = max(cache.glob("train/*/epoch-*.pt"))
    newest.write_bytes(b"\x00garbage" * 100)
    train.train(curated, params=params, out_dir=tmp_path / "out", seed=0, cache_dir=cache)
    captured = capsys.readouterr()
    assert str(newest) in captured.err and "falling back" in captured.err
    assert "resuming after epoch 2/3" in captured.out
    _assert_same_run(tmp_path / "out", cache, expected, ref_cache)


# --- recipe (tasks.recipe): optimizer, gradient clipping, weight EMA, early stopping ---

def _meta(out_dir) -> dict:
    return json.loads((out_dir / "model.json").read_text())


def test_sgd_with_grad_clip_trains(curated, tmp_path):
    torch.manual_seed(0)  # as train() does: the same new head
    initial, _ = build_model("mobilenet_v2", 10, weights="IMAGENET1K_V1", image_size=32)
    train.train(curated, params=_params(curated, ["train.optimizer=sgd", "train.grad_clip=1.0"]),
                out_dir=tmp_path, seed=0)
    trained, meta = _weights(tmp_path), _meta(tmp_path)
    changed = [k for k, v in initial.named_parameters() if not torch.equal(v, trained[k])]
    assert len(changed) == len(list(initial.parameters()))  # full fine-tuning: every parameter moved
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert meta["recipe"]["optimizer"] == "sgd" and meta["recipe"]["grad_clip"] == 1.0


def test_grad_clip_bounds_the_update():
    layer = torch.nn.Linear(8, 4)
    params = list(layer.parameters())
    before = [p.detach().clone() for p in params]
    (layer(torch.randn(16, 8)) * 1e3).sum().backward()
    opt = torch.optim.SGD(params, lr=1.0)  # the update is minus the (clipped) gradient
    norm = recipe.optimizer_step(opt, params, grad_clip=0.5)
    assert norm > 10  # the gradient was far above the limit...
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    assert step.norm() == pytest.approx(0.5, rel=1e-4)  # ...and the step it took is clipped to it
    assert recipe.optimizer_step(opt, params, grad_clip=None) is None


@pytest.fixture(scope="module")
def ema_run(curated):
    """3 epochs with an EMA of the weights, no val split (the last epoch is saved), checkpoints kept."""
    params = _params(curated, ["train.epochs=3", "train.ema_decay=0.9", "train.val_fraction=0",
                               "train.keep_checkpoints=3"])
    out_dir, cache = curated.parents[1] / "ema", curated.parents[1] / "ema-cache"
    train.train(curated, params=params, out_dir=out_dir, seed=0, cache_dir=cache)
    return params, out_dir, cache


def test_ema_weights_are_saved(ema_run):
    _, out_dir, cache = ema_run
    last = torch.load(max(cache.glob("train/*/epoch-*.pt")), weights_only=True)
    assert last["epoch"] == 3 and int(last["ema"]["n_averaged"]) > 1
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    saved = _weights(out_dir)
    _assert_same_weights(saved, averaged)  # model.pt is the AveragedModel's state
    assert not torch.equal(saved["classifier.1.weight"], last["model"]["classifier.1.weight"])  # not the raw one
    assert _meta(out_dir)["recipe"]["ema_decay"] == 0.9


def test_ema_resume_gives_identical_weights(ema_run, curated, tmp_path):
    params, out_dir, ref_cache = ema_run
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    for path in cache.glob("train/*/epoch-000[23].pt"):  # as if killed during epoch 2
        path.unlink()
    train.train(curated, params=params, out_dir=tmp_path / "out", seed=0, cache_dir=cache)
    assert _meta(tmp_path / "out")["resumed_after_epoch"] == 1
    assert sha256_file(tmp_path / "out" / "model.pt") == sha256_file(out_dir / "model.pt")
    last, ref = (torch.load(max(c.glob("train/*/epoch-*.pt")), weights_only=True) for c in (cache, ref_cache))
    _assert_same_weights(last["ema"], ref["ema"])
    _assert_same_weights(last["model"], ref["model"])


def test_early_stopping_stops_and_resume_respects_it(curated, tmp_path):
    # A frozen backbone and a vanishing lr: the val accuracy cannot improve after epoch 1.
    params = _params(curated, ["train.epochs=4", "train.lr=1e-9", "train.finetune=linear_probe",
                               "train.early_stopping_patience=1"])
    result = train.train(curated, params=params, out_dir=tmp_path / "a", seed=0, cache_dir=tmp_path / "cache")
    meta = _meta(tmp_path / "a")
    assert meta["stopped_early_after_epoch"] == result.epochs_run == len(meta["history"]) == 2
    again = train.train(curated, params=params, out_dir=tmp_path / "b", seed=0, cache_dir=tmp_path / "cache")
    resumed = _meta(tmp_path / "b")
    assert resumed["resumed_after_epoch"] == resumed["stopped_early_after_epoch"] == again.epochs_run == 2
    assert resumed["model_sha256"] == meta["model_sha256"]


def test_early_stopping_needs_a_val_split(curated, tmp_path):
    params = _params(curated, ["train.early_stopping_patience=2", "train.val_fraction=0"])
    with pytest.raises(ValueError, match=r"train\.early_stopping_patience=2.*train\.val_fraction=0"):
        train.train(curated, params=params, out_dir=tmp_path, seed=0)


def test_default_recipe_records_no_early_stop(mode_runs):
    meta = mode_runs["full"][1]
    assert meta["stopped_early_after_epoch"] is None
    assert meta["recipe"] == {"optimizer": "adamw", "grad_clip": None, "ema_decay": None,
                              "early_stopping_patience": None}


def test_lora_trains_adapters_and_head_and_saves_plain_weights(curated):
    """finetune=lora through train(): the saved model.pt has the plain torchvision keys, with the
    adapters merged into exactly the adapted layers' weights; everything else is untouched."""
    from tasks.lora import lora_targets

    out_dir = curated.parents[1] / "train-lora"
    train.train(curated, params=_params(curated, ["train.finetune=lora"]), out_dir=out_dir, seed=0)
    torch.manual_seed(0)
    model, _ = build_model("mobilenet_v2", 10, weights="IMAGENET1K_V1", image_size=32)
    initial, trained = model.state_dict(), _weights(out_dir)
    assert trained.keys() == initial.keys()
    adapted, skipped = lora_targets(model, "classifier.1")
    expected = {f"{name}.weight" for name in adapted} | {"classifier.1.weight", "classifier.1.bias"}
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed == expected and len(skipped) == 17  # the depthwise convs: peft cannot merge them
    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["finetune"] == "lora" and meta["lora"]["rank"] == 8
    assert meta["parameters"]["trainable"] == 161_506  # 148,696 adapter + 12,810 head parameters
    reloaded, _, _ = train.load_trained(out_dir)  # no peft needed to use the model
    assert isinstance(reloaded, torch.nn.Module)


def test_policy_and_mixing_presets_train(curated):
    """TrivialAugment, resized crop, erasing and MixUp/CutMix (soft targets) through train()."""
    out_dir = curated.parents[1] / "train-presets"
    extra = ["train.augment.policy=trivialaugment", "train.augment.resized_crop_scale=[0.6, 1.0]",
             "train.augment.erasing_p=0.25", "train.augment.mixup_alpha=0.2", "train.augment.cutmix_alpha=1.0"]
    train.train(curated, params=_params(curated, extra + ["train.epochs=2"]), out_dir=out_dir, seed=0)
    meta = json.loads((out_dir / "model.json").read_text())
    assert meta["augment"]["policy"] == "trivialaugment" and meta["augment"]["cutmix_alpha"] == 1.0
    assert all(h["train_loss"] == h["train_loss"] for h in meta["history"])  # finite, not NaN
    assert meta["history"][-1]["val_accuracy"] > 0.2  # 10 classes: above chance even so briefly


@pytest.mark.slow  # inductor compiles C++ kernels: minutes on 2 cores
def test_compiled_model_trains_and_saves_plain_keys(curated):
    out_dir = curated.parents[1] / "train-compiled"
    train.train(curated, params=_params(curated, ["train.compile=true"]), out_dir=out_dir, seed=0)
    weights = _weights(out_dir)
    assert not any(k.startswith("_orig_mod.") for k in weights)  # the module itself is saved
    assert json.loads((out_dir / "model.json").read_text())["history"][0]["val_accuracy"] > 0.1
