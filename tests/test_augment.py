"""tasks.augment: the default preset is TrainAugment bit for bit; policies, resized crop and mixing
are reproducible from the run's generator; MixUp/CutMix targets; normalization from weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from tasks.augment import (
    _crop_boxes,
    build_train_augment,
    cutmix,
    mixup,
    normalization_for,
    resized_crop,
)
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
from tasks.params import AugmentParams

N_CLASSES = 10
EVERYTHING = AugmentParams(flip_p=0.5, resized_crop_scale=(0.5, 1.0), erasing_p=0.5, policy="trivialaugment",
                           mixup_alpha=0.2, cutmix_alpha=1.0)


def _batch(b: int = 32, c: int = 1, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, N_CLASSES, (b,), generator=g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("aug", [AugmentParams(), AugmentParams(erasing_p=0.5, pad_crop=4),
                                 AugmentParams(flip_p=0.0, pad_crop=0)])
def test_default_preset_is_train_augment_bit_for_bit(aug):
    x, y = _batch()
    g_new, g_old = _gen(3), _gen(3)
    for _ in range(3):  # consecutive batches: the generator must be consumed the same way
        out, target = build_train_augment(aug, n_classes=N_CLASSES)(x, y, generator=g_new)
        expected = TrainAugment(flip_p=aug.flip_p, pad_crop=aug.pad_crop, erasing_p=aug.erasing_p)(x, generator=g_old)
        assert torch.equal(out, expected) and target is y
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_same_generator_same_output_and_global_rng_untouched():
    x, y = _batch(c=3)
    pipeline = build_train_augment(EVERYTHING, n_classes=N_CLASSES)
    global_before = torch.get_rng_state()
    a, ta = pipeline(x, y, generator=_gen(7))
    b, tb = pipeline(x, y, generator=_gen(7))
    c, _ = pipeline(x, y, generator=_gen(8))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a.float(), c.float())
    assert torch.equal(torch.get_rng_state(), global_before)  # dropout etc. see the same global stream


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_policies_keep_shape_and_dtype(policy, channels):
    x, y = _batch(c=channels)
    out, target = build_train_augment(AugmentParams(flip_p=0, pad_crop=0, policy=policy, randaugment_ops=2,
                                                    randaugment_magnitude=9), n_classes=N_CLASSES)(x, y, _gen())
    assert out.shape == x.shape and out.dtype == torch.uint8 and target is y
    changed = (out != x).flatten(1).any(1)
    assert changed.sum() >= len(x) // 2  # most samples got a non-identity op


def test_unknown_policy_names_the_allowed_ones():
    aug = AugmentParams().model_copy(update={"policy": "autoaugment"})  # bypass validation
    with pytest.raises(ValueError, match="none, trivialaugment, randaugment"):
        build_train_augment(aug, n_classes=N_CLASSES)


def test_wrong_input_is_an_error_naming_it():
    x, y = _batch()
    pipeline = build_train_augment(AugmentParams(), n_classes=N_CLASSES)
    with pytest.raises(ValueError, match="expected a uint8 batch"):
        pipeline(x.float(), y)
    with pytest.raises(ValueError, match="32 images but labels of shape"):
        pipeline(x, y[:5])
    mixing = build_train_augment(AugmentParams(mixup_alpha=0.2), n_classes=N_CLASSES)
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        mixing(x, y + N_CLASSES)


def _distinct_neighbours(b: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the constant image i + 1 with label i: every pixel and class tells its source."""
    x = (torch.arange(b, dtype=torch.uint8) + 1).view(b, 1, 1, 1).expand(b, 1, size, size).contiguous()
    return x, torch.arange(b)


def test_mixup_mixes_exactly_two_samples_and_targets_sum_to_one():
    x, y = _distinct_neighbours()
    out, target = mixup(x, y, alpha=0.4, n_classes=N_CLASSES, generator=_gen())
    assert out.dtype == torch.float32 and target.shape == (len(x), N_CLASSES)
    torch.testing.assert_close(target.sum(1), torch.ones(len(x)))
    assert ((target > 0).sum(1) <= 2).all()
    lam = target[torch.arange(len(x)), y]
    expected = lam.view(-1, 1, 1, 1) * x.float() + (1 - lam).view(-1, 1, 1, 1) * x.roll(1, 0).float()
    torch.testing.assert_close(out, expected)


def test_cutmix_pastes_from_one_neighbour_in_proportion_to_its_target():
    x, y = _distinct_neighbours()
    for seed in range(5):
        out, target = cutmix(x, y, alpha=1.0, n_classes=N_CLASSES, generator=_gen(seed))
        assert out.dtype == torch.uint8
        torch.testing.assert_close(target.sum(1), torch.ones(len(x)))
        partner = x.roll(1, 0)
        assert ((out == x) | (out == partner)).all()
        pasted = (out == partner).flatten(1).float().mean(1)
        torch.testing.assert_close(pasted, target[torch.arange(len(x)), y.roll(1, 0)])


def test_both_mixes_on_pick_one_per_batch():
    x, y = _batch()
    pipeline = build_train_augment(AugmentParams(flip_p=0, pad_crop=0, mixup_alpha=0.2, cutmix_alpha=1.0),
                                   n_classes=N_CLASSES)
    g = _gen()
    kinds = {pipeline(x, y, g)[0].dtype for _ in range(12)}
    assert kinds == {torch.uint8, torch.float32}  # CutMix keeps uint8, MixUp blends to float
    assert pipeline.soft_targets


def test_soft_targets_with_label_smoothing_smooth_the_mix():
    """cross_entropy(soft, label_smoothing=e) == mixing the losses of the two smoothed labels."""
    logits, eps = torch.randn(4, N_CLASSES), 0.1
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 0, 1, 2]), 0.7
    soft = lam * F.one_hot(y_a, N_CLASSES).float() + (1 - lam) * F.one_hot(y_b, N_CLASSES).float()
    mixed = F.cross_entropy(logits, soft, label_smoothing=eps)
    separate = (lam * F.cross_entropy(logits, y_a, label_smoothing=eps)
                + (1 - lam) * F.cross_entropy(logits, y_b, label_smoothing=eps))
    torch.testing.assert_close(mixed, separate)


def test_resized_crop_keeps_shape_and_full_scale_is_identity():
    x, _ = _batch(c=3)
    out = resized_crop(x, (0.3, 1.0), generator=_gen())
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    # at scale 1 only ratio 1 fits a square image: RandomResizedCrop falls back to the whole image
    assert torch.equal(resized_crop(x, (1.0, 1.0), generator=_gen()), x)


def test_resized_crop_matches_torchvision_per_box():
    x, _ = _batch(b=16, c=3)
    scale = (0.2, 0.9)
    top, left, h, w = _crop_boxes(16, 32, 32, scale, (3 / 4, 4 / 3), _gen(5))
    area = (h * w).float() / (32 * 32)
    assert ((area > scale[0] - 0.05) & (area < scale[1] + 0.05)).all()
    out = resized_crop(x, scale, generator=_gen(5))
    for i in range(16):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], antialias=True)
        assert (out[i].int() - ref.int()).abs().max() <= 1  # rounding only


def test_pipeline_with_resized_crop_is_reproducible_and_shaped():
    x, y = _batch(c=1)
    pipeline = build_train_augment(AugmentParams(resized_crop_scale=(0.6, 1.0)), n_classes=N_CLASSES)
    a, _ = pipeline(x, y, _gen(1))
    b, _ = pipeline(x, y, _gen(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)


def test_normalization_from_torchvision_weights_entry():
    assert normalization_for("mobilenet_v2", "IMAGENET1K_V1") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization_for("resnet18_small", "IMAGENET1K_V1") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization_for("efficientnet_v2_l", "IMAGENET1K_V1") == ((0.5,) * 3, (0.5,) * 3)
    assert normalization_for("efficientnet_v2_l", "DEFAULT") == ((0.5,) * 3, (0.5,) * 3)
    for other in (None, "/models/mine.pth", "pretrain"):
        assert normalization_for("mobilenet_v2", other) == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError):
        normalization_for("no_such_model", "IMAGENET1K_V1")
