"""Temperature scaling and calibration error: pure NumPy, on synthetic logits and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantize.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    high_confidence_bands,
    negative_log_likelihood,
    reliability_bins,
    tempered_softmax,
)


def sampled_labels(true_logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(true_logits): the true logits are then perfectly calibrated."""
    probabilities = tempered_softmax(true_logits)
    cumulative = probabilities.cumsum(axis=1)
    draws = rng.uniform(size=(len(true_logits), 1))
    return np.minimum((draws > cumulative).sum(axis=1), true_logits.shape[1] - 1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_temperature):
    """A model whose logits are T times too large (or small) gets that T back."""
    rng = np.random.default_rng(3)
    true_logits = rng.normal(0.0, 2.0, size=(40_000, 10))
    labels = sampled_labels(true_logits, rng)
    model_logits = true_logits * true_temperature
    fitted = fit_temperature(model_logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.04)


def test_fitted_temperature_minimises_the_nll_and_keeps_the_argmax():
    rng = np.random.default_rng(5)
    true_logits = rng.normal(0.0, 3.0, size=(5_000, 10))
    labels = sampled_labels(true_logits, rng)
    logits = true_logits * 3.0  # over-confident
    fitted = fit_temperature(logits, labels)
    best = negative_log_likelihood(logits, labels, fitted)
    for other in (1.0, fitted * 0.9, fitted * 1.1):
        assert best <= negative_log_likelihood(logits, labels, other)
    np.testing.assert_array_equal(tempered_softmax(logits, fitted).argmax(axis=1), logits.argmax(axis=1))


def test_fit_refuses_mismatched_input():
    with pytest.raises(ValueError, match="logits and N labels"):
        fit_temperature(np.zeros((3, 10)), np.zeros(2, int))


def test_tempered_softmax_at_one_is_the_softmax():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    plain = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tempered_softmax(logits), plain)
    hotter = tempered_softmax(logits, 2.0)
    np.testing.assert_allclose(hotter[0], np.exp([1.0, 0.5, 0.0]) / np.exp([1.0, 0.5, 0.0]).sum())
    np.testing.assert_allclose(hotter[1], [1 / 3] * 3)


def test_ece_is_zero_when_confidence_matches_accuracy():
    # Ten digits at 0.8, eight of them right; ten at 1.0, all right.
    confidences = np.r_[np.full(10, 0.8), np.full(10, 1.0)]
    correct = np.r_[np.ones(8, bool), np.zeros(2, bool), np.ones(10, bool)]
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_confident_mistakes_is_their_confidence():
    assert expected_calibration_error(np.full(4, 0.9), np.zeros(4, bool)) == pytest.approx(0.9)


def test_ece_weights_bins_by_their_digits():
    # Bin of 0.95: 3 digits, all wrong (gap 0.95). Bin of 0.5: 1 digit, right (gap 0.5).
    confidences = np.array([0.95, 0.95, 0.95, 0.5])
    correct = np.array([False, False, False, True])
    assert expected_calibration_error(confidences, correct) == pytest.approx((3 * 0.95 + 0.5) / 4)


def test_ece_averages_within_a_bin_before_comparing():
    # 0.94 and 0.96 share the bin (14/15, 1]: mean confidence 0.95, accuracy 0.5.
    confidences = np.array([0.94, 0.96])
    correct = np.array([True, False])
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.45)
    # With 2 bins the same pair is still one bin; with 100 bins they split: |1-0.94| and |0-0.96|.
    assert expected_calibration_error(confidences, correct, bins=100) == pytest.approx((0.06 + 0.96) / 2)


def test_bins_are_closed_on_the_right_and_zero_joins_the_first():
    bins = reliability_bins(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0]), np.array([True, True, False, True]))
    assert len(bins) == 15
    assert [b.count for b in bins[:2]] == [2, 1] and bins[-1].count == 1
    assert bins[0].accuracy == 1.0 and bins[1].accuracy == 0.0
    assert math.isnan(bins[5].mean_confidence) and bins[5].count == 0


def test_ece_of_nothing_is_zero():
    assert expected_calibration_error(np.zeros(0), np.zeros(0, bool)) == 0.0


def test_high_confidence_bands_count_every_digit_once():
    confidences = np.array([0.5, 0.95, 0.995, 0.9995, 0.99995, 1.0])
    correct = np.array([False, True, False, True, True, True])
    bands = high_confidence_bands(confidences, correct)
    assert [b["digits"] for b in bands] == [1, 1, 1, 1, 2]
    assert [b["observed_errors"] for b in bands] == [1, 0, 1, 0, 0]
    assert bands[0]["predicted_errors"] == pytest.approx(0.5)


def test_summary_reports_before_and_after():
    rng = np.random.default_rng(11)
    true_logits = rng.normal(0.0, 2.0, size=(20_000, 10))
    labels = sampled_labels(true_logits, rng)
    logits = true_logits * 2.0
    summary = calibration_summary(logits, labels, fit_temperature(logits, labels))
    assert summary["digits"] == 20_000
    assert summary["after"]["ece"] < summary["before"]["ece"] / 3
    assert summary["after"]["nll"] < summary["before"]["nll"]
    assert summary["after"]["accuracy"] == summary["before"]["accuracy"]
