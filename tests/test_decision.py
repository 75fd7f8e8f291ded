"""Accept or review: any doubt goes to a human, never to a wrong bin."""

import numpy as np

from edge_agent.decision import (DOUBTED_REPAIRS, FRAGMENT_DOUBT, FRAGMENT_HEIGHT, LEFT_BEHIND_DOUBT,
                                 STEM_LEFT_BEHIND, decide, decide_with_plan, stem_left_behind, with_row_doubt)
from edge_agent.decoder import DecodePolicy
from edge_agent.sortplan import parse_sort_plan
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


# -- doubt from the row's geometry ------------------------------------------------------------

ROW = ((10, 20, 30, 60), (50, 22, 30, 58), (90, 21, 28, 61), (130, 20, 30, 60), (170, 19, 31, 62))


def test_a_mark_far_shorter_than_its_row_loses_its_certainty():
    labels, p = probs((7, 0.999), (1, 0.99999), (9, 0.9999), (9, 0.9999), (7, 0.9999))
    boxes = ((10, 20, 30, 60), (55, 45, 6, 29)) + ROW[2:]  # a stem, half as tall as the digits
    doubted = with_row_doubt(p, boxes)
    assert np.array_equal(doubted.argmax(axis=1), labels)  # the read stays the read
    assert doubted[1].max() <= 1 - FRAGMENT_DOUBT + FRAGMENT_DOUBT / 10 + 1e-12
    assert np.allclose(doubted[1].sum(), 1.0)
    assert np.array_equal(np.delete(doubted, 1, axis=0), np.delete(p, 1, axis=0))  # the others untouched
    assert decide(labels, p, (5,), 0.99).accepted
    assert decide(labels, doubted, (5,), 0.99).reason is Reason.LOW_CONFIDENCE


def test_rows_of_even_marks_and_short_rows_are_left_alone():
    labels, p = probs((1, 0.9999), (2, 0.9999), (3, 0.9999), (4, 0.9999), (5, 0.9999))
    assert with_row_doubt(p, ROW) is p
    # The cut is a share of the median: a mark just above it keeps its confidence.
    tall_enough = ROW[:1] + ((50, 22, 30, int(FRAGMENT_HEIGHT * 60) + 1),) + ROW[2:]
    assert np.array_equal(with_row_doubt(p, tall_enough), p)
    two = probs((1, 0.9999), (2, 0.9999))[1]
    assert with_row_doubt(two, ((0, 0, 10, 60), (20, 0, 5, 10))) is two  # no row to compare with


def test_a_fragment_read_with_a_plan_goes_to_review_not_to_a_neighbours_chute():
    """The case behind this rule (validation): a 7 whose bar broke off, its stem read as a 1 at full
    confidence, and 10997 a valid code in another chute than the written 70997."""
    plan = parse_sort_plan(b"postcode,chute\n10997,A\n70997,B\n")
    labels, p = probs((1, 0.99999), (0, 0.9999), (9, 0.9999), (9, 0.9999), (7, 0.9999))
    policy = DecodePolicy(target_misdirect_rate=1e-3, invalid_prior=0.01)
    assert decide_with_plan(labels, p, (5,), plan, policy).accepted  # the stem alone fools it
    stem = ((12, 40, 5, 28),) + ROW[1:]
    decision = decide_with_plan(labels, with_row_doubt(p, stem), (5,), plan, policy)
    assert not decision.accepted and decision.reason is Reason.AMBIGUOUS


def test_a_mark_the_reader_made_to_fill_the_row_loses_its_certainty_once():
    """Recovered and split-to-count marks are doubted like a fragment; a plain split of a wide
    mark (touching digits), two pieces merged into one digit and marks as found are not. A short mark that was also mended is
    doubted once, not twice."""
    labels, p = probs((2, 0.9999), (5, 0.9999), (7, 0.9999), (2, 0.9999), (9, 0.9999))
    assert with_row_doubt(p, ROW, ("", "split", "merged", "", "")) is p
    for repair in sorted(DOUBTED_REPAIRS):
        doubted = with_row_doubt(p, ROW, ("", "", "", repair, ""))
        assert np.array_equal(doubted.argmax(axis=1), labels)
        assert np.isclose(doubted[3].max(), (1 - FRAGMENT_DOUBT) * 0.9999 + FRAGMENT_DOUBT / 10)
        assert np.array_equal(np.delete(doubted, 3, axis=0), np.delete(p, 3, axis=0))
        assert decide(labels, doubted, (5,), 0.99).reason is Reason.LOW_CONFIDENCE
    short_and_mended = ROW[:3] + ((130, 40, 30, 20),) + ROW[4:]
    once = with_row_doubt(p, short_and_mended, ("", "", "", "recovered", ""))
    assert np.isclose(once[3].max(), (1 - FRAGMENT_DOUBT) * 0.9999 + FRAGMENT_DOUBT / 10)
    # Repairs that do not match the digits (an older reader's result) are ignored, not misapplied.
    assert with_row_doubt(p, ROW, ("recovered",)) is p


def test_a_mark_with_ink_left_beside_it_loses_its_certainty():
    """The rest of a digit cut short lies beside the mark: at LEFT_BEHIND_DOUBT of the mark's own
    ink or more the mark is doubted; less (specks, anti-aliasing) leaves it alone."""
    labels, p = probs((2, 0.9999), (1, 0.9999), (7, 0.9999), (0, 0.9999), (9, 0.9999))
    below = (0.0, LEFT_BEHIND_DOUBT * 0.99, 0.0, 0.0, 0.0)
    assert with_row_doubt(p, ROW, left_behind=below) is p
    doubted = with_row_doubt(p, ROW, left_behind=(0.0, LEFT_BEHIND_DOUBT, 0.0, 0.0, 0.0))
    assert np.array_equal(doubted.argmax(axis=1), labels)
    assert np.isclose(doubted[1].max(), (1 - FRAGMENT_DOUBT) * 0.9999 + FRAGMENT_DOUBT / 10)
    assert decide(labels, doubted, (5,), 0.99).reason is Reason.LOW_CONFIDENCE
    assert with_row_doubt(p, ROW, left_behind=(1.0,)) is p  # not one value per digit: ignored


def test_ink_left_beside_a_mark_is_weighed_without_a_sort_plan_and_beside_a_one_with_one():
    """With a plan the directory is the second opinion on a digit; without one the reader's own
    evidence of a digit cut short sends the read to review. With a plan a "1" with half its own
    ink or more beside it is still doubted: that is the stem of a wider digit."""
    from edge_agent.pipeline import DigitEvidence
    from edge_agent.types import LocatedDigits

    labels, p = probs((2, 0.9999), (1, 0.9999), (7, 0.9999), (0, 0.9999), (9, 0.9999))

    def evidence(left_behind):
        located = LocatedDigits(np.zeros((5, 28, 28), np.uint8), ROW, left_behind=left_behind)
        return DigitEvidence(located, labels, p, (0.0, 0.0))

    some_ink = evidence((0.0, 0.4, 0.0, 0.0, 0.0))
    assert np.array_equal(some_ink.probabilities(with_plan=True), p)
    alone = some_ink.probabilities(with_plan=False)
    assert alone[1].max() < 0.6 and np.array_equal(np.delete(alone, 1, axis=0), np.delete(p, 1, axis=0))
    stem = evidence((0.0, STEM_LEFT_BEHIND, 0.0, 0.0, 0.0)).probabilities(with_plan=True)
    assert stem[1].max() < 0.6 and np.array_equal(np.delete(stem, 1, axis=0), np.delete(p, 1, axis=0))
    # The same ink beside a 2 (not one stroke) leaves it to the directory.
    beside_a_two = evidence((0.9, 0.0, 0.0, 0.0, 0.0)).probabilities(with_plan=True)
    assert np.array_equal(beside_a_two, p)


def test_stem_left_behind_keeps_only_ones_with_half_their_ink_beside_them():
    _, p = probs((1, 0.99), (1, 0.99), (7, 0.99))
    assert stem_left_behind(p, (0.6, 0.49, 0.9)) == (0.6, 0.0, 0.0)
    assert stem_left_behind(p, (0.6,)) == ()  # not one value per digit: ignored
