"""Accept a postcode for automatic sorting, or send it to human review (pure logic)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import numpy as np

from edge_agent.decoder import DecodePolicy, MisdirectBudget, decode
from edge_agent.sortplan import SortPlan
from edge_agent.types import DigitRead, Reason

DIGIT_THRESHOLD = "digit_threshold"  # decided digit by digit against the bundle's threshold (no plan)
SORT_PLAN = "sort_plan"  # decided on the chute posterior over the site's valid postcodes


@dataclass(frozen=True)
class Decision:
    postcode: str
    accepted: bool
    confidence: float  # product of digit confidences: the chance every digit is right
    digits: tuple[DigitRead, ...]
    reason: Reason | None
    decided_by: str = DIGIT_THRESHOLD
    chute: str | None = None
    chute_confidence: float | None = None
    alternatives: tuple[tuple[str, float], ...] = ()
    plan: dict[str, object] | None = None  # rows and hash of the plan that decided
    chute_threshold: float | None = None  # the bar chute_confidence was held to

    def plan_fields(self) -> dict[str, object]:
        """What a result says about how it was decided (and, with a plan, the chute)."""
        if self.decided_by != SORT_PLAN:
            return {"decided_by": self.decided_by}
        return {"decided_by": self.decided_by, "chute": self.chute,
                "chute_confidence": None if self.chute_confidence is None else round(self.chute_confidence, 6),
                "alternatives": [{"postcode": code, "probability": p} for code, p in self.alternatives],
                "chute_threshold": None if self.chute_threshold is None else round(self.chute_threshold, 6),
                "sort_plan": self.plan}


def chance_wrong(chute_confidence: float | None, confidence: float) -> float:
    """The chance an accepted answer itself gives that it goes wrong: 1 - its chute's posterior
    with a plan, 1 - the product of its digits' confidences without one."""
    sure = chute_confidence if chute_confidence is not None else confidence
    return min(1.0, max(0.0, 1.0 - float(sure)))


# A mark under this share of its row's median height is as often a piece of a digit (the stem
# of a 7 whose bar broke off, half of a 4) as a small digit: on 4,000 validation envelopes, 10
# of the 22 such marks were read wrong, most as a "1" at full confidence, against 1.7% of all
# marks. The classifier cannot know where its crop came from; the row can.
FRAGMENT_HEIGHT = 0.55
# Such a mark's probabilities are mixed this much with "any digit": its top digit falls to at
# most 0.55, about how often such marks were read right, so the read goes to review unless the
# directory leaves no doubt.
FRAGMENT_DOUBT = 0.5


# Marks the reader made to fill the row rather than found whole: a piece taken back from the
# row's gaps ("recovered"), or a mark cut in two only because the row was a digit short of a
# postcode ("split_to_count"). On 1,000 validation frames they were 14 of 4,950 marks, 4 of the
# 7 read confidently were wrong; with digits 24 px tall (400 frames) 99 marks, 9 of the 51 read
# confidently were wrong, and 3 of the 8 envelopes sorted to a wrong code held one. Left alone:
# a split of a mark far wider than a digit (touching digits: 82-90% right, no confident error)
# and two pieces joined into one digit ("merged", a pen lift: every such read accepted on
# validation was right, and doubting them cost 0.4 points of sorted mail).
DOUBTED_REPAIRS = frozenset({"recovered", "split_to_count"})


# Ink beside a mark that no mark took, as a share of the mark's own ink (LocatedDigits.left_behind):
# the rest of a digit the reader cut short (a 2 of which only the right edge was kept, read as a
# 1). On 1,000 validation frames (40-90 px), 8 of the 76 marks read confidently with 5% or more
# left behind were wrong, against 10 of the 4,524 with less; at 24 and 32 px, 23 of 42 against
# 32 of 2,990. The pipeline weighs it only without a sort plan (pipeline.DigitEvidence).
LEFT_BEHIND_DOUBT = 0.05
# With a sort plan only a "1" with at least this much of its own ink left beside it is doubted
# for it: a 1 is one stroke, so that much ink beside it in the row says it is the stem of a wider
# digit cut short (a 6 or a 4 read as a 1 at 0.9999). On validation envelopes (8,000 codes, two
# seeds) it removed the only two misdirects of the strict rule for 0-0.2 points of sorted mail;
# doubting every mark over 5% there cost 4 points (docs/MODELS.md sections 6 and 8).
STEM_LEFT_BEHIND = 0.5


def stem_left_behind(probabilities: np.ndarray, left_behind: tuple[float, ...]) -> tuple[float, ...]:
    """``left_behind`` kept only for marks read as a 1 with at least STEM_LEFT_BEHIND of it."""
    if len(left_behind) != len(probabilities):
        return ()
    tops = np.asarray(probabilities).argmax(axis=1) if len(probabilities) else ()
    return tuple(float(v) if v >= STEM_LEFT_BEHIND and int(top) == 1 else 0.0 for v, top in zip(left_behind, tops))


def with_row_doubt(probabilities: np.ndarray, boxes: tuple[tuple[int, int, int, int], ...],
                   repairs: tuple[str, ...] = (), left_behind: tuple[float, ...] = ()) -> np.ndarray:
    """The digit probabilities with the doubt the row adds: a mark far shorter than its row
    (``boxes``: (x, y, w, h) per digit), one the reader made to fill the row (``repairs``,
    ``LocatedDigits.repairs``) or one with at least ``LEFT_BEHIND_DOUBT`` of its own ink left
    beside it (``left_behind``) is mixed with "any digit" by ``FRAGMENT_DOUBT``, once.

    Rows of fewer than three marks have no height to compare with. The top digit of a doubted
    mark stays the top digit: only its confidence changes.
    """
    p = np.asarray(probabilities)
    doubted = np.zeros(len(p), bool)
    if len(boxes) >= 3 and len(boxes) == len(p):
        heights = [box[3] for box in boxes]
        # statistics.median of a handful of heights is np.median's value at a tenth of its cost.
        doubted |= np.array(heights, np.float64) < FRAGMENT_HEIGHT * float(statistics.median(heights))
    if len(repairs) == len(p):
        doubted |= np.array([r in DOUBTED_REPAIRS for r in repairs], bool)
    if len(left_behind) == len(p):
        doubted |= np.asarray(left_behind, np.float64) >= LEFT_BEHIND_DOUBT
    if not doubted.any():
        return p
    p = p.copy()
    p[doubted] = (1.0 - FRAGMENT_DOUBT) * p[doubted] + FRAGMENT_DOUBT / p.shape[1]
    return p


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


def decide_with_plan(
    labels: np.ndarray,
    probabilities: np.ndarray,
    expected_lengths: tuple[int, ...],
    plan: SortPlan,
    policy: DecodePolicy,
) -> Decision:
    """Sorted when the chute's posterior over the plan's valid postcodes reaches the policy's threshold.

    The digits still say what was read; the postcode becomes the most probable valid code of
    the chosen chute, so the sorting machine gets a code that exists (or a review).
    """
    digits_only = decide(labels, probabilities, expected_lengths, 0.0)
    base = dict(decided_by=SORT_PLAN, plan=plan.summary(), chute_threshold=policy.threshold)
    # One mark too many may be a stray mark: the decoder tries the read without each in turn.
    stray_mark = digits_only.reason is Reason.DIGIT_COUNT and len(labels) - 1 in expected_lengths
    if digits_only.reason in (Reason.NO_POSTCODE, Reason.DIGIT_COUNT) and not stray_mark:
        return Decision(digits_only.postcode, False, digits_only.confidence, digits_only.digits,
                        digits_only.reason, **base)
    verdict = decode(probabilities, plan, policy)
    return Decision(verdict.postcode, verdict.accepted, digits_only.confidence, digits_only.digits, verdict.reason,
                    chute=verdict.chute, chute_confidence=verdict.chute_confidence,
                    alternatives=verdict.alternatives, **{**base, "chute_threshold": verdict.threshold})


def decide_with_budget(
    labels: np.ndarray,
    probabilities: np.ndarray,
    expected_lengths: tuple[int, ...],
    plan: SortPlan,
    policy: DecodePolicy,
    budget: MisdirectBudget | None,
) -> Decision:
    """decide_with_plan held to the budget's bar (``policy``'s own without a budget); a read that
    found a chute feeds the budget, so reads decided in turn set the bar for the next."""
    if budget is None or not budget.spends_on(plan):
        return decide_with_plan(labels, probabilities, expected_lengths, plan, policy)
    decision = decide_with_plan(labels, probabilities, expected_lengths, plan,
                                replace(policy, spent_threshold=budget.threshold()))
    if decision.chute is not None:
        budget.observe(decision.chute_confidence)
    return decision
