"""The cost of sorting decisions: auto-sort rate, misdirects, reviews by reason, cost per 1,000 (pure).

A decision is judged the way the sorting office feels it: an accepted envelope is right only if
it reaches the chute its true postcode belongs to (with a plan; without one, if the postcode is
exactly right). Mail written with a postcode that is not in the plan has no right chute: any
automatic sort of it is a misdirect. A reviewed envelope costs a person's keying time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from edge_agent.decision import Decision, chance_wrong
from edge_agent.sortplan import SortPlan


@dataclass(frozen=True)
class CostModel:
    """What a decision costs, in the office's money (defaults: a keying desk at 1,600 items/hour)."""

    keying_seconds: float = 2.25  # manual keying time per reviewed envelope
    labour_per_hour: float = 30.0  # cost of one hour of a keying operator
    misdirect_cost: float = 1.50  # handling a letter that went to the wrong office (return, re-sort, delay)

    @property
    def review_cost(self) -> float:
        return self.keying_seconds / 3600.0 * self.labour_per_hour


def wilson_interval(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a rate of ``errors`` in ``n`` (0, 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = errors / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def poisson_at_least(observed: int, expected: float) -> float:
    """P(X >= observed) for X ~ Poisson(expected): how often chance alone gives that many or more."""
    if observed <= 0:
        return 1.0
    if expected <= 0.0:
        return 0.0
    term = math.exp(-expected)  # P(X = 0)
    below = term
    for k in range(1, observed):
        term *= expected / k
        below += term
    return max(0.0, 1.0 - below)


def is_misdirect(decision: Decision, truth: str, plan: SortPlan | None) -> bool:
    """An accepted decision that sends the envelope anywhere but its true postcode's chute."""
    if not decision.accepted:
        return False
    if plan is None or decision.chute is None:
        return decision.postcode != truth
    right = plan.chute_for(truth)
    return right is None or right != decision.chute


def score(decisions: list[Decision], truths: list[str], plan: SortPlan | None, cost: CostModel) -> dict:
    """The figures ``edge-agent evaluate`` prints (and the docs' comparison table is made of)."""
    if len(decisions) != len(truths):
        raise ValueError(f"{len(decisions)} decisions for {len(truths)} truths")
    n = len(decisions)
    accepted = sum(d.accepted for d in decisions)
    misdirects = sum(is_misdirect(d, t, plan) for d, t in zip(decisions, truths))
    reviews = Counter(d.reason.value for d in decisions if not d.accepted and d.reason is not None)
    invalid_truths = [i for i, t in enumerate(truths) if plan is not None and plan.chute_for(t) is None]
    exact_reads = sum(d.postcode == t for d, t in zip(decisions, truths))
    low, high = wilson_interval(misdirects, accepted)
    # The accepted reads' own posteriors promise this many misdirects. A spent bar (and the
    # target itself) rests on that promise: more observed than chance allows means the posteriors
    # are too sure for this mail (new writers, another camera), and the bar should not be spent.
    expected = sum(chance_wrong(d.chute_confidence, d.confidence) for d in decisions if d.accepted)
    per_item = ((n - accepted) * cost.review_cost + misdirects * cost.misdirect_cost) / max(n, 1)
    return {
        "envelopes": n,
        "auto_sort_rate": accepted / max(n, 1),
        "accepted": accepted,
        "misdirects": misdirects,
        "misdirect_rate": misdirects / max(accepted, 1),
        "misdirect_rate_95": [low, high],
        "precision": 1 - misdirects / max(accepted, 1),
        "misdirects_expected": round(expected, 3),
        "misdirects_by_chance": round(poisson_at_least(misdirects, expected), 6),
        "review_rate": (n - accepted) / max(n, 1),
        "reviews_by_reason": dict(sorted(reviews.items())),
        "postcode_exact_rate": exact_reads / max(n, 1),
        # Mail to a code that does not exist can never be sorted: the share of the rest that was.
        "auto_sort_rate_valid_mail": (accepted - sum(decisions[i].accepted for i in invalid_truths))
        / max(n - len(invalid_truths), 1),
        "invalid_envelopes": len(invalid_truths),
        "invalid_accepted": sum(decisions[i].accepted for i in invalid_truths),
        "cost_per_1000": round(per_item * 1000, 2),
        "cost_model": {"keying_seconds": cost.keying_seconds, "labour_per_hour": cost.labour_per_hour,
                       "misdirect_cost": cost.misdirect_cost},
    }
