"""tasks.metrics against values computed by hand on tiny fixed examples, and against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from tasks.metrics import (
    bootstrap_intervals,
    calibration,
    classification_metrics,
    confident_mistakes,
    softmax,
    top_k_accuracy,
)

Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])
# confusion: [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_classification_metrics_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["confusion_matrix_normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 0.5])
    assert [pc[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [pc[c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [pc[c]["support"] for c in "abc"] == [3, 2, 1]
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def test_classification_metrics_match_sklearn_on_random_labels():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    m = classification_metrics(y, p, [str(i) for i in range(7)])
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()


def test_top_k_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 1])
    assert top_k_accuracy(y, probs, 1) == 0.0
    assert top_k_accuracy(y, probs, 2) == pytest.approx(1 / 3)
    assert top_k_accuracy(y, probs, 3) == 1.0
    assert top_k_accuracy(y, probs, 10) == 1.0  # k above the class count: all of them
    assert top_k_accuracy(y, probs, 2) == pytest.approx(skm.top_k_accuracy_score(y, probs, k=2))


CAL_PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
CAL_Y = np.array([0, 1, 1, 0])  # correct, wrong (conf .6), correct, wrong (conf .8)


def test_calibration_by_hand():
    two = calibration(CAL_Y, CAL_PROBS, 2)
    assert two["ece"] == pytest.approx(0.25)  # one bin: accuracy .5, confidence .75
    assert two["bins"][0]["count"] == 0 and two["bins"][1]["count"] == 4
    five = calibration(CAL_Y, CAL_PROBS, 5)
    # (.4,.6]: {.6 wrong} gap .6; (.6,.8]: {.7 ok, .8 wrong} gap .25; (.8,1]: {.9 ok} gap .1
    assert [b["count"] for b in five["bins"]] == [0, 0, 1, 2, 1]
    assert five["ece"] == pytest.approx(0.25 * 0.6 + 0.5 * 0.25 + 0.25 * 0.1)
    assert five["mce"] == pytest.approx(0.6)
    assert five["bins"][3]["accuracy"] == 0.5 and five["bins"][3]["confidence"] == pytest.approx(0.75)


def test_perfectly_calibrated_has_zero_ece():
    probs = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 2)
    assert calibration(np.array([0, 0, 0, 1, 1]), probs, 10)["ece"] == 0.0


def test_confident_mistakes_most_confident_first():
    assert confident_mistakes(CAL_Y, CAL_PROBS, 5) == [3, 1]
    assert confident_mistakes(CAL_Y, CAL_PROBS, 1) == [3]
    assert confident_mistakes(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), 5) == []


def test_softmax_rows_sum_to_one_and_keep_order():
    p = softmax(np.array([[1000.0, 0.0], [1.0, 2.0]]))  # large logits must not overflow
    assert np.allclose(p.sum(1), 1) and p[0, 0] == pytest.approx(1.0) and p[1, 1] > p[1, 0]


def test_bootstrap_intervals_bracket_the_estimate_and_repeat():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    pred = np.where(rng.random(2000) < 0.8, y, rng.integers(0, 5, 2000))
    a = bootstrap_intervals(y, pred, 5, n=300, ci=0.95, seed=1)
    assert a == bootstrap_intervals(y, pred, 5, n=300, ci=0.95, seed=1)
    point = classification_metrics(y, pred, list("abcde"))
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        lo, hi = a[name]
        assert lo < point[name] < hi
        assert 0.01 < hi - lo < 0.08  # about ±1.96·sqrt(.83·.17/2000) ≈ ±0.016 for accuracy
    narrow = bootstrap_intervals(y, pred, 5, n=300, ci=0.5, seed=1)
    assert narrow["accuracy"][1] - narrow["accuracy"][0] < a["accuracy"][1] - a["accuracy"][0]
    assert bootstrap_intervals(y, y, 5, n=50, ci=0.95)["accuracy"] == [1.0, 1.0]
    assert bootstrap_intervals(y, pred, 5, n=0, ci=0.95) == {}
