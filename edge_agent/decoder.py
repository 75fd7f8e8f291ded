"""From per-digit probabilities to a chute: the posterior over the site's valid postcodes (pure).

The classifier gives, for each of the L digit positions, a (calibrated) probability for each
digit 0-9. Reading positions as independent, a written string s has likelihood
q(s) = prod_i p_i(s_i), and those q sum to one over all 10^L strings. The sort plan adds what
a reader alone cannot know: which strings are postcodes. The prior puts 1 - e on the valid
codes (uniform over them: no traffic statistics are assumed) and e on "not a valid
postcode" (mail to a code that does not exist, spread over the invalid strings), so

    P(code c | image)  is proportional to  q(c) (1 - e) / |V|        for every valid c,
    P(invalid | image) is proportional to  (1 - sum_V q) e / (10^L - |V|).

The valid codes are enumerated exactly (an (n, L) gather, about a millisecond for 30,000
codes); a region prefix row contributes the product of its prefix digits' probabilities, the
whole mass of its completions. The posterior of a chute is the sum over its codes, and the
item is sorted only when that reaches 1 - target misdirect rate: with calibrated probabilities,
that is the promised misdirect rate among the accepted items. A confident read of a code that
does not exist keeps its mass on "invalid" and is never pulled onto its nearest valid
neighbour; a read whose most likely digits spell no valid code is held to 1 - target even where
a bar spent over the mail (MisdirectBudget) would let it through.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_agent.sortplan import LengthIndex, SortPlan
from edge_agent.types import Reason

# No digit is ever impossible: a floor keeps one overconfident wrong digit from ruling out the
# truth (and every valid code with it). Far below any probability a calibrated model reports.
PROBABILITY_FLOOR = 1e-6


@dataclass(frozen=True)
class DecodePolicy:
    """How sure the posterior must be, and how often mail is addressed to codes that do not exist."""

    target_misdirect_rate: float = 1e-3  # accepted items sorted to a wrong chute, at most
    invalid_prior: float = 0.05  # share of mail written with a postcode the directory does not have (see config)
    # A bar set from the site's recent reads (MisdirectBudget), between the floor and the strict bar.
    spent_threshold: float | None = None

    @property
    def strict_threshold(self) -> float:
        """Every item on its own at most ``target`` likely to be wrong (monotone in the target)."""
        return 1.0 - self.target_misdirect_rate

    @property
    def threshold(self) -> float:
        """The chute posterior needed to sort automatically: the spent bar where one is set,
        never above the strict one."""
        if self.spent_threshold is None:
            return self.strict_threshold
        return min(self.strict_threshold, self.spent_threshold)


def spent_threshold(chute_posteriors, budget: float, floor: float, strict: float) -> float:
    """The loosest bar t (not below ``floor``, not above ``strict``) at which the reads accepted,
    those with a chute posterior p >= t, are wrong ``budget`` of the time on average:
    mean(1 - p | p >= t) <= budget. Holds as far as the posteriors are calibrated."""
    p = np.sort(np.asarray(chute_posteriors, np.float64))[::-1]
    if not len(p):
        return strict
    # Adding less sure items never lowers the running mean of (1 - p): the last index within the
    # budget is the loosest bar that keeps it.
    mean_wrong = np.cumsum(1.0 - p) / np.arange(1, len(p) + 1)
    # A bar accepts every read equal to it: only the last of equal posteriors may set it.
    last_of_equals = np.append(p[:-1] > p[1:], True)
    within = np.flatnonzero((mean_wrong <= budget) & last_of_equals)
    if not len(within):
        return strict
    return float(min(strict, max(floor, p[within[-1]])))


# Spend only this share of the target: on validation envelopes the reads between 0.98 and 0.999
# were wrong 2-4 times as often as their posteriors said (2 of 168 at 8,000 codes; at 30,000, mail
# to codes that do not exist read as a valid neighbour at 0.99-0.998). With the whole target
# spent, 2 of 1,746 sorted were wrong (99.89%); with a quarter, 1 of 1,725 (docs/MODELS.md, 8).
SPENT_SHARE = 0.25
# No item is sorted below this chute posterior, however sure the rest of the mail is.
SPENT_FLOOR = 0.99


# "auto" spends the target only over a sparse plan: one whose valid codes are at most this share
# of the codes of their length. There a misread mostly lands on a code that does not exist and
# goes to review, so the reads between the bars are seldom wrong: with about 8,000 codes (8%)
# the spent bar sorted 86-88% of validation envelopes (seeds 11 and 12, by three reader versions)
# and 86.9% of t10k ones, 1 misdirect in about 12,000 sorted. With about 30,000 (30%) a misread is a valid
# neighbour three times as often: 6 of 7,808 validation envelopes sorted were wrong (99.92%), two
# seeds 99.87%, t10k 99.73% (docs/MODELS.md, section 8). Between the two nothing was measured.
SPARSE_PLAN_SHARE = 0.10
ACCEPTANCES = ("auto", "spent", "per_item")


def misdirect_budget(acceptance: str, target_misdirect_rate: float, window: int) -> MisdirectBudget | None:
    """The bar a site's ``sort_plan.acceptance`` asks for: a MisdirectBudget for "spent" and for
    "auto" (which spends it only over sparse plans), None (every item held to the strict bar) for
    "per_item"."""
    if acceptance == "per_item":
        return None
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCES)}, not {acceptance!r}")
    return MisdirectBudget(target_misdirect_rate, window=window,
                           sparse_plans_only=acceptance == "auto")


class MisdirectBudget:
    """The target misdirect rate spent over the mail instead of asked of every item.

    A strict bar asks each sorted item to be 1 - target sure; then most sorted mail is far
    surer and the rate promised is not used. This keeps the chute posteriors of the site's recent
    reads (those that found a chute) and sets the bar where the reads above it are, on average,
    wrong ``share`` x target of the time. The bar only loosens from the strict one when the bulk
    of the mail is very sure, and tightens by itself when images get worse. Until ``min_reads``
    reads are known (after a start, a model swap or a new plan) the strict bar holds.
    Thread-safe: readers observe while others ask for the bar.
    """

    def __init__(self, target_misdirect_rate: float, window: int = 2000, min_reads: int | None = None,
                 share: float = SPENT_SHARE, floor: float = SPENT_FLOOR, refresh_every: int = 25,
                 sparse_plans_only: bool = False) -> None:
        """``sparse_plans_only`` ("auto"): plans with more than SPARSE_PLAN_SHARE of their codes
        valid hold every item to the strict bar (``spends_on``)."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.sparse_plans_only = sparse_plans_only
        self.target = target_misdirect_rate
        self.window = int(window)
        self.min_reads = self.window // 4 if min_reads is None else int(min_reads)
        self.share = share
        self.floor = floor
        self._refresh_every = max(1, int(refresh_every))
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=self.window)
        self._since_refresh = 0
        self._observed = 0
        self._bar = self.strict

    @property
    def strict(self) -> float:
        return 1.0 - self.target

    def spends_on(self, plan: SortPlan) -> bool:
        """Whether reads decided against ``plan`` are held to the spent bar (else to the strict one)."""
        return not self.sparse_plans_only or plan.valid_share <= SPARSE_PLAN_SHARE

    def observe(self, chute_posterior: float) -> None:
        """One read's chosen-chute posterior (reads without a chute are not mail it could sort)."""
        with self._lock:
            self._recent.append(float(chute_posterior))
            self._observed += 1
            self._since_refresh += 1
            if self._since_refresh >= self._refresh_every:  # the sort is ~0.1 ms: not every read
                self._refresh()

    def threshold(self) -> float:
        with self._lock:
            return self._bar

    def reads(self) -> int:
        with self._lock:
            return len(self._recent)

    def reset(self) -> None:
        """Forget the reads (a new model or plan changes what a posterior means): strict again."""
        with self._lock:
            self._recent.clear()
            self._since_refresh = 0
            self._bar = self.strict

    def recent(self) -> tuple[list[float], int]:
        """The chute posteriors the bar rests on, oldest first, and how many reads were ever
        observed (it only grows: whether the window changed since it was last kept)."""
        with self._lock:
            return list(self._recent), self._observed

    def restore(self, posteriors: list[float]) -> None:
        """Take back the posteriors ``recent`` gave (kept across a restart, for the same model,
        plan and prior): the bar is spent from the first read instead of strict for ``min_reads``.
        Raises ValueError, keeping the reads it has, unless every value is a probability."""
        values = [float(p) for p in posteriors]
        if not all(0.0 <= p <= 1.0 for p in values):  # also refuses NaN
            raise ValueError("chute posteriors must be numbers from 0 to 1")
        with self._lock:
            self._recent.clear()
            self._recent.extend(values[-self.window:])
            self._since_refresh = 0
            self._refresh()

    def _refresh(self) -> None:
        self._since_refresh = 0
        if len(self._recent) < self.min_reads:
            self._bar = self.strict
        else:
            self._bar = spent_threshold(self._recent, self.share * self.target, self.floor, self.strict)


@dataclass(frozen=True)
class PlanDecision:
    """The decoder's verdict for one read."""

    postcode: str  # the most probable valid code in the chosen chute (the read digits if none)
    chute: str | None
    chute_confidence: float  # posterior of the chosen chute
    invalid_probability: float  # posterior of "not a valid postcode"
    alternatives: tuple[tuple[str, float], ...]  # the top valid codes with their posteriors
    accepted: bool
    reason: Reason | None
    threshold: float  # the chute posterior this read needed to be sorted


def floored(probabilities: np.ndarray) -> np.ndarray:
    """Rows renormalised after flooring every probability at PROBABILITY_FLOOR."""
    p = np.maximum(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR)
    return p / p.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Posterior:
    """Posterior over the chutes and "not a valid postcode" for one read (they sum to one)."""

    read: str  # the most probable digit at each position
    chutes: np.ndarray  # posterior of each of the plan's chutes (plan.chutes order)
    invalid: float
    alternatives: tuple[tuple[str, float], ...]
    # How well the read fits the prior (valid codes and "invalid" weighted): sum over strings of
    # prior x q. Compares readings of the same frame (which crop is a stray mark), nothing else.
    evidence: float = 0.0


def posterior(probabilities: np.ndarray, plan: SortPlan, policy: DecodePolicy) -> Posterior:
    """Chute and invalid posteriors for per-position digit probabilities (shape (L, 10))."""
    p = floored(probabilities)
    length = p.shape[0]
    read = "".join(str(int(d)) for d in p.argmax(axis=1))
    index = plan.by_length.get(length)
    nothing = Posterior(read, np.zeros(len(plan.chutes)), 1.0, ())
    if index is None or index.valid_count == 0:
        return nothing
    code_q = _code_likelihoods(p, index)
    prefix_q = np.array([_prefix_mass(p, prefix) for prefix in index.prefixes])
    region_q = _exclusive_region_mass(index, code_q, prefix_q)
    # Exact codes under a prefix are among its completions: counted once, in code_q.
    valid_mass = float(code_q.sum() + region_q.sum())
    valid_weight = (1.0 - policy.invalid_prior) / index.valid_count
    invalid_count = 10 ** length - index.valid_count
    invalid_weight = policy.invalid_prior / invalid_count if invalid_count > 0 else 0.0
    invalid_mass = max(0.0, 1.0 - valid_mass) * invalid_weight
    total = valid_mass * valid_weight + invalid_mass
    if total <= 0.0:
        return nothing
    scale = valid_weight / total
    chute_mass = np.bincount(index.code_chutes, weights=code_q, minlength=len(plan.chutes)).astype(np.float64)
    if len(index.prefixes):
        chute_mass += np.bincount(index.prefix_chutes, weights=region_q, minlength=len(plan.chutes))
    return Posterior(read, chute_mass * scale, invalid_mass / total, _alternatives(p, index, plan, code_q, scale),
                     total)


def posterior_with_a_stray_mark(probabilities: np.ndarray, plan: SortPlan, policy: DecodePolicy) -> Posterior:
    """The posterior for a read with one mark more than the plan's codes have (a speck, a
    stroke of a box, a digit cut in two that was not merged back).

    Each mark in turn is taken as the stray one, equally likely a priori, and what it read says
    nothing about the code; the reading of the other marks is decoded as usual. The hypotheses
    are weighed by how well their readings fit the plan (``Posterior.evidence``), so the
    directory picks which mark to drop, and the posterior is their mixture: two readings that
    point to different chutes leave neither sure enough to sort.
    """
    p = np.asarray(probabilities, np.float64)
    readings = [posterior(np.delete(p, k, axis=0), plan, policy) for k in range(p.shape[0])]
    weights = np.array([r.evidence for r in readings])
    if not len(readings) or weights.sum() <= 0.0:
        return Posterior("".join(str(int(d)) for d in p.argmax(axis=1)), np.zeros(len(plan.chutes)), 1.0, ())
    weights = weights / weights.sum()
    chutes = np.sum([w * r.chutes for w, r in zip(weights, readings)], axis=0)
    invalid = float(sum(w * r.invalid for w, r in zip(weights, readings)))
    merged: dict[str, float] = {}
    for w, r in zip(weights, readings):
        for code, probability in r.alternatives:
            merged[code] = merged.get(code, 0.0) + w * probability
    alternatives = tuple((code, round(q, 6)) for code, q in sorted(merged.items(), key=lambda kv: -kv[1])[:3])
    best = readings[int(np.argmax(weights))]
    return Posterior(best.read, chutes, invalid, alternatives, float(np.dot(weights, [r.evidence for r in readings])))


def decode(probabilities: np.ndarray, plan: SortPlan, policy: DecodePolicy) -> PlanDecision:
    """Posterior over the plan's codes of the read's length; accept, or review with the reason.

    A read one mark longer than the plan's codes is decoded with that mark left out in turn
    (``posterior_with_a_stray_mark``): it is sorted if the mixture is sure of a chute, else it
    goes to review as ``digit_count``.
    """
    length = len(probabilities)
    if length not in plan.by_length and length - 1 in plan.by_length:
        post = posterior_with_a_stray_mark(probabilities, plan, policy)
        verdict = _verdict(post, plan, policy)
        if verdict.accepted:
            return verdict
        return PlanDecision(verdict.postcode, verdict.chute, verdict.chute_confidence, verdict.invalid_probability,
                            verdict.alternatives, False, Reason.DIGIT_COUNT, verdict.threshold)
    return _verdict(posterior(probabilities, plan, policy), plan, policy)


def _verdict(post: Posterior, plan: SortPlan, policy: DecodePolicy) -> PlanDecision:
    # A spent bar rests on the posteriors being right on average over the mail. A read whose own
    # digits spell no valid code is sorted only on its alternatives' strength, and mail written
    # to a code that does not exist reads exactly so: such a read is held to the strict bar.
    bar = policy.threshold if plan.chute_for(post.read) is not None else policy.strict_threshold
    if not len(plan.chutes) or post.invalid >= 1.0:
        return PlanDecision(post.read, None, 0.0, post.invalid, post.alternatives, False, Reason.INVALID_POSTCODE, bar)
    best = int(np.argmax(post.chutes))
    best_post = float(post.chutes[best])
    chute = plan.chutes[best]
    if post.invalid >= best_post:
        # Most likely the writer used a code that does not exist: never forced onto a neighbour.
        return PlanDecision(post.read, None, best_post, post.invalid, post.alternatives, False,
                            Reason.INVALID_POSTCODE, bar)
    in_chute = [code for code, _ in post.alternatives if plan.chute_for(code) == chute]
    postcode = in_chute[0] if in_chute else post.read
    if best_post >= bar:
        return PlanDecision(postcode, chute, best_post, post.invalid, post.alternatives, True, None, bar)
    return PlanDecision(postcode, chute, best_post, post.invalid, post.alternatives, False, Reason.AMBIGUOUS, bar)


def _code_likelihoods(p: np.ndarray, index: LengthIndex) -> np.ndarray:
    """q(c) = prod_i p_i(c_i) for every exact code, a position at a time: one contiguous gather
    per position instead of an (n, L) fancy index (1.1 -> 0.2 ms for 30,000 codes), multiplied
    in the same order as a row product, so the result is the same to the last bit."""
    if not len(index.codes):
        return np.zeros(0)
    flat = np.ascontiguousarray(p, np.float64).ravel()
    rows = index.flat_positions
    q = np.take(flat, rows[0])
    for row in rows[1:]:
        q *= np.take(flat, row)
    return q


def _prefix_mass(p: np.ndarray, prefix: str) -> float:
    """The probability that the written string starts with ``prefix`` (all its completions together)."""
    return float(np.prod([p[i, int(d)] for i, d in enumerate(prefix)]))


def _exclusive_region_mass(index: LengthIndex, code_q: np.ndarray, prefix_q: np.ndarray) -> np.ndarray:
    """Mass of the completions each prefix decides: minus longer prefixes and exact codes under it."""
    if not len(index.prefixes):
        return np.zeros(0)
    region = prefix_q.copy()
    for child, parent in enumerate(index.prefix_parent):
        if parent >= 0:
            region[parent] -= prefix_q[child]
    covered = index.code_cover >= 0
    if covered.any():
        region -= np.bincount(index.code_cover[covered], weights=code_q[covered], minlength=len(region))
    return np.maximum(region, 0.0)


def _alternatives(p: np.ndarray, index: LengthIndex, plan: SortPlan, code_q: np.ndarray,
                  scale: float, top: int = 3) -> tuple[tuple[str, float], ...]:
    """The most probable valid codes: exact ones, and each region's most probable completion."""
    candidates: list[tuple[float, str]] = []
    if len(code_q):
        best = np.argpartition(-code_q, min(top, len(code_q) - 1))[:top] if len(code_q) > top \
            else np.arange(len(code_q))
        candidates += [(float(code_q[i]), "".join(map(str, index.codes[i]))) for i in best]
    for prefix in index.prefixes:
        tail = p[len(prefix):].argmax(axis=1)
        code = prefix + "".join(str(int(d)) for d in tail)
        if code in plan.exact or plan.covering_prefix(code) != prefix:
            continue  # decided by an exact row or a longer prefix: listed through those
        candidates.append((float(np.prod(p[np.arange(p.shape[0]), [int(c) for c in code]])), code))
    candidates.sort(key=lambda item: -item[0])
    return tuple((code, round(q * scale, 6)) for q, code in candidates[:top])
