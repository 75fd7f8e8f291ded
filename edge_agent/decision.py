"""Accept a postcode for automatic sorting, or send it to human review (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.types import DigitRead, Reason


@dataclass(frozen=True)
class Decision:
    postcode: str
    accepted: bool
    confidence: float  # product of digit confidences: the chance every digit is right
    digits: tuple[DigitRead, ...]
    reason: Reason | None


def decide(
    labels: np.ndarray,
    probabilities: np.ndarray,
    expected_lengths: tuple[int, ...],
    acceptance_threshold: float,
) -> Decision:
    """Accepted only when the digit count is allowed and every digit clears the threshold.

    A misdirected letter costs far more than a manual look, so any doubt is a review.
    """
    confidences = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    digits = tuple(DigitRead(int(d), float(c)) for d, c in zip(labels, confidences))
    postcode = "".join(str(d.digit) for d in digits)
    confidence = float(np.prod(confidences)) if len(digits) else 0.0
    if not digits:
        return Decision("", False, 0.0, (), Reason.NO_POSTCODE)
    if len(digits) not in expected_lengths:
        return Decision(postcode, False, confidence, digits, Reason.DIGIT_COUNT)
    if min(d.confidence for d in digits) < acceptance_threshold:
        return Decision(postcode, False, confidence, digits, Reason.LOW_CONFIDENCE)
    return Decision(postcode, True, confidence, digits, None)
