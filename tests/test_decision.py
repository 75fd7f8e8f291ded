"""Accept or review: any doubt goes to a human, never to a wrong bin."""

import numpy as np

from edge_agent.decision import decide
from edge_agent.types import Reason


def probs(*confidences):
    rows = []
    for digit, conf in confidences:
        row = np.full(10, (1 - conf) / 9)
        row[digit] = conf
        rows.append(row)
    return np.argmax(rows, axis=1), np.array(rows)


def test_confident_five_digits_accepted():
    labels, p = probs((1, 0.999), (2, 0.9995), (3, 0.999), (4, 0.9999), (5, 0.998))
    d = decide(labels, p, (5,), 0.99)
    assert d.accepted and d.postcode == "12345" and d.reason is None
    assert abs(d.confidence - np.prod([0.999, 0.9995, 0.999, 0.9999, 0.998])) < 1e-9


def test_one_doubtful_digit_sends_to_review():
    labels, p = probs((1, 0.999), (7, 0.6), (3, 0.999), (4, 0.999), (5, 0.999))
    d = decide(labels, p, (5,), 0.99)
    assert not d.accepted and d.reason is Reason.LOW_CONFIDENCE and d.postcode == "17345"


def test_wrong_digit_count_is_review_even_if_confident():
    labels, p = probs((1, 0.9999), (2, 0.9999), (3, 0.9999), (4, 0.9999))
    assert decide(labels, p, (5,), 0.5).reason is Reason.DIGIT_COUNT
    assert decide(labels, p, (4, 5), 0.5).accepted


def test_nothing_found():
    d = decide(np.zeros(0, int), np.zeros((0, 10)), (5,), 0.9)
    assert d.reason is Reason.NO_POSTCODE and d.postcode == "" and d.confidence == 0.0
