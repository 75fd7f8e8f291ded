"""Temperature scaling and calibration figures (pure NumPy: no TensorFlow, no runtime).

A temperature T divides the logits before the softmax. It leaves the argmax, and so the
accuracy, unchanged, and turns over-confident scores (every wrong digit at 0.9996 or
more) into probabilities that a decoder can multiply into a postcode posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
# 1/T is searched in this range: beyond it the model is either all-uniform or a hard argmax,
# both of which mean the fit went wrong, not that the model needs it.
INVERSE_TEMPERATURE_RANGE = (0.02, 50.0)


def tempered_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) row by row, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of the true labels under softmax(logits / T)."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(scaled)), np.asarray(labels, dtype=int)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-9) -> float:
    """The T that minimises the NLL of ``labels`` under softmax(logits / T).

    The NLL is convex in beta = 1/T (a log-sum-exp of beta * logits minus a linear term):
    its slope is mean(E_p[z] - z_label) and its curvature mean(Var_p[z]) >= 0. Newton's method
    on beta, kept inside a bracket that bisection narrows, finds the one minimum in a few steps.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, classes) logits and N labels, got {logits.shape} and {labels.shape}")
    true_logit = logits[np.arange(len(labels)), labels]

    def slope_and_curvature(beta: float) -> tuple[float, float]:
        scaled = beta * logits
        p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mean = (p * logits).sum(axis=1)
        variance = (p * logits * logits).sum(axis=1) - mean * mean
        return float(np.mean(mean - true_logit)), float(np.mean(np.maximum(variance, 0.0)))

    low, high = INVERSE_TEMPERATURE_RANGE
    beta = 1.0
    for _ in range(200):
        slope, curvature = slope_and_curvature(beta)
        if slope > 0:
            high = beta
        else:
            low = beta
        step = slope / curvature if curvature > 0 else math.inf
        candidate = beta - step
        # Outside the bracket Newton is not to be trusted: bisect instead.
        beta_next = candidate if low < candidate < high else (low + high) / 2
        if abs(beta_next - beta) <= tolerance * beta or high - low <= tolerance * beta:
            beta = beta_next
            break
        beta = beta_next
    return 1.0 / beta


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin: (low, high], with its count, mean confidence and accuracy."""

    low: float
    high: float
    count: int
    mean_confidence: float
    accuracy: float


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Top-label reliability: digits grouped by confidence into ``bins`` equal-width bins on [0, 1].

    Bins are closed on the right ((i/B, (i+1)/B]); a confidence of exactly 0 joins the first.
    Empty bins have NaN mean confidence and accuracy.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidences.shape != correct.shape:
        raise ValueError(f"{confidences.shape} confidences but {correct.shape} outcomes")
    index = np.clip(np.ceil(confidences * bins).astype(int) - 1, 0, bins - 1)
    result = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        result.append(ReliabilityBin(
            low=i / bins, high=(i + 1) / bins, count=count,
            mean_confidence=float(confidences[members].mean()) if count else math.nan,
            accuracy=float(correct[members].mean()) if count else math.nan,
        ))
    return result


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the count-weighted mean |accuracy - mean confidence| over equal-width bins."""
    table = reliability_bins(confidences, correct, bins)
    total = sum(b.count for b in table)
    if total == 0:
        return 0.0
    return float(sum(b.count * abs(b.accuracy - b.mean_confidence) for b in table if b.count) / total)


# Bands near certainty, where the acceptance threshold lives: the 15 equal-width bins put
# nearly every digit in the top bin and cannot show whether 0.999 means one error in 1,000.
HIGH_CONFIDENCE_BANDS = ((0.0, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 0.9999), (0.9999, 1.0))


def high_confidence_bands(confidences: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Per band [low, high): digits, predicted error rate (1 - mean confidence) and observed errors."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rows = []
    for low, high in HIGH_CONFIDENCE_BANDS:
        members = (confidences >= low) & ((confidences < high) if high < 1.0 else (confidences <= high))
        count = int(members.sum())
        rows.append({
            "low": low, "high": high, "digits": count,
            "predicted_errors": round(float((1.0 - confidences[members]).sum()), 3),
            "observed_errors": int((~correct[members]).sum()),
        })
    return rows


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE, NLL and accuracy at T = 1 and at ``temperature``, and the reliability bins of both."""
    labels = np.asarray(labels, dtype=int)
    summary: dict = {"digits": int(len(labels))}
    for key, t in (("before", 1.0), ("after", temperature)):
        probabilities = tempered_softmax(logits, t)
        confidences = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
        summary[key] = {
            "temperature": t,
            "ece": expected_calibration_error(confidences, correct),
            "nll": negative_log_likelihood(logits, labels, t),
            "accuracy": float(correct.mean()),
            "bins": reliability_bins(confidences, correct),
            "bands": high_confidence_bands(confidences, correct),
        }
    return summary
