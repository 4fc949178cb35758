import numpy as np
import pytest

from crosssim.metrics import (atc_estimate, atc_threshold, balanced_accuracy, binary_auc, confidence_histogram,
                              confusion_matrix, expected_calibration_error, macro_auc)


def test_confusion_and_balanced_accuracy():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 1, 1])
    assert confusion_matrix(y, p, 2).tolist() == [[2, 1], [0, 1]]
    assert balanced_accuracy(y, p, 2) == pytest.approx((2 / 3 + 1) / 2)


AUC_CASES = [
    (np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool), 0.75),
    (np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 0, 1, 1], bool), 0.5),
    (np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool), 1.0),
]


@pytest.mark.parametrize("scores,positive,expected", AUC_CASES)
def test_binary_auc(scores, positive, expected):
    assert binary_auc(scores, positive) == pytest.approx(expected)


def test_macro_auc_perfect_probs():
    y = np.array([0, 1, 2, 0])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert macro_auc(y, probs) == pytest.approx(1.0)


def test_atc_threshold_reproduces_accuracy_on_its_own_data():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 5000)
    acc = 0.72
    threshold = atc_threshold(confidence_histogram(confidence), acc)
    assert atc_estimate(confidence, threshold) == pytest.approx(acc, abs=0.01)
    assert atc_threshold(confidence_histogram(confidence), 1.0) <= 0.31


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    conf = np.full(1000, 0.9)
    assert expected_calibration_error(conf, np.arange(1000) % 10 != 0) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(conf, np.zeros(1000, bool)) == pytest.approx(0.9)
