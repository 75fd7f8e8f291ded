"""The sort-plan decoder: posteriors checked by hand on tiny plans, and its invariants by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.decision import decide_with_budget, decide_with_plan
from edge_agent.decoder import (PROBABILITY_FLOOR, SPARSE_PLAN_SHARE, DecodePolicy, MisdirectBudget, decode, floored,
                                misdirect_budget, posterior, spent_threshold)
from edge_agent.sortplan import SortPlanError, parse_sort_plan
from edge_agent.types import Reason

POLICY = DecodePolicy(target_misdirect_rate=1e-4, invalid_prior=0.01)


def plan_of(rows: str, lengths=(2,)):
    return parse_sort_plan(("postcode,chute\n" + rows).encode(), "test", lengths)


def probs(*positions: dict[int, float]) -> np.ndarray:
    """Per-position probabilities from {digit: p}; the rest shared equally."""
    out = np.zeros((len(positions), 10))
    for i, given_p in enumerate(positions):
        rest = (1.0 - sum(given_p.values())) / (10 - len(given_p))
        out[i] = rest
        for digit, p in given_p.items():
            out[i, digit] = p
    return out


def test_two_valid_codes_split_by_one_digit_are_sorted_at_chute_level():
    plan = plan_of("12,A\n13,A\n45,B\n")
    p = probs({1: 0.9, 4: 0.1}, {2: 0.5, 3: 0.5})
    # By hand (the floor changes the 6th decimal at most): q(12) = q(13) = 0.45, q(45) ~ 0;
    # valid weight 0.99/3, invalid weight 0.01/97 on the remaining mass 0.1.
    valid = 0.9 * 0.99 / 3
    invalid = 0.1 * 0.01 / 97
    expected_a = valid / (valid + invalid)
    verdict = decode(p, plan, POLICY)
    assert verdict.accepted and verdict.chute == "A" and verdict.reason is None
    assert verdict.chute_confidence == pytest.approx(expected_a, abs=1e-5)
    assert verdict.invalid_probability == pytest.approx(invalid / (valid + invalid), rel=1e-3)
    # Neither code alone is sure: a digit-level decision would have sent it to review.
    assert max(prob for _, prob in verdict.alternatives) < 0.51
    assert verdict.postcode in ("12", "13")


def test_a_confident_read_of_a_code_that_does_not_exist_goes_to_review():
    plan = plan_of("12,A\n13,A\n45,B\n")
    p = probs({4: 0.999}, {6: 0.999})
    verdict = decode(p, plan, POLICY)
    # q(45) = 0.999 * 0.001/9; the invalid hypothesis keeps almost all the rest.
    q45 = 0.999 * 0.001 / 9
    valid = q45 * 0.99 / 3
    invalid = (1 - q45) * 0.01 / 97
    assert verdict.invalid_probability == pytest.approx(invalid / (valid + invalid), rel=1e-3)
    assert not verdict.accepted and verdict.reason is Reason.INVALID_POSTCODE and verdict.chute is None
    assert verdict.postcode == "46"  # what was written, not its nearest valid neighbour


def test_a_one_digit_doubt_between_two_chutes_is_ambiguous():
    plan = plan_of("12,A\n17,B\n")
    verdict = decode(probs({1: 0.9999}, {2: 0.7, 7: 0.3}), plan, POLICY)
    assert not verdict.accepted and verdict.reason is Reason.AMBIGUOUS
    assert verdict.chute == "A" and verdict.chute_confidence == pytest.approx(0.7, abs=1e-3)


def test_prefix_rows_longest_match_and_exact_overrides():
    plan = plan_of("1*,X\n12*,Y\n123,Z\n", lengths=(3,))
    assert plan.by_length[3].valid_count == 100  # every 1xx, once
    assert plan.chute_for("123") == "Z" and plan.chute_for("124") == "Y" and plan.chute_for("199") == "X"
    assert plan.chute_for("200") is None
    sure_x = decode(probs({1: 1 - 1e-9}, {5: 1 - 1e-9}, {5: 1 - 1e-9}), plan, POLICY)
    assert sure_x.accepted and sure_x.chute == "X" and sure_x.postcode == "155"
    sure_y = decode(probs({1: 1 - 1e-9}, {2: 1 - 1e-9}, {9: 1 - 1e-9}), plan, POLICY)
    assert sure_y.accepted and sure_y.chute == "Y"
    # Half 123 (chute Z), half 133 (region 1*, chute X): by hand 0.5 / 0.5.
    split = posterior(probs({1: 1.0}, {2: 0.5, 3: 0.5}, {3: 1.0}), plan, POLICY)
    by_chute = dict(zip(plan.chutes, split.chutes))
    assert by_chute["Z"] == pytest.approx(0.5, abs=1e-4) and by_chute["X"] == pytest.approx(0.5, abs=1e-4)
    assert by_chute["Y"] == pytest.approx(0.0, abs=1e-4)


def test_an_empty_plan_is_refused():
    with pytest.raises(SortPlanError, match="no postcodes"):
        plan_of("")


def test_without_a_digit_count_the_plan_is_not_asked():
    plan = plan_of("12345,A\n", lengths=(5,))
    four = probs(*([{1: 0.99}] * 4))
    decision = decide_with_plan(four.argmax(axis=1), four, (5,), plan, POLICY)
    assert decision.reason is Reason.DIGIT_COUNT and not decision.accepted
    assert decision.plan_fields()["decided_by"] == "sort_plan"


# -- invariants ----------------------------------------------------------------------------

digit_rows = st.lists(st.floats(0.0, 1.0), min_size=10, max_size=10).filter(lambda r: sum(r) > 1e-3)


@st.composite
def reads_and_plans(draw, length=3):
    rows = [draw(digit_rows) for _ in range(length)]
    p = np.array(rows) / np.array(rows).sum(axis=1, keepdims=True)
    codes = draw(st.sets(st.integers(0, 10 ** length - 1), min_size=1, max_size=40))
    chutes = draw(st.lists(st.sampled_from("ABCD"), min_size=len(codes), max_size=len(codes)))
    text = "".join(f"{c:0{length}d},{chute}\n" for c, chute in zip(sorted(codes), chutes))
    prefix = draw(st.one_of(st.none(), st.integers(0, 9)))
    if prefix is not None and not any(f"{c:0{length}d}".startswith(str(prefix)) for c in codes):
        text += f"{prefix}*,P\n"
    return p, plan_of(text, lengths=(length,)), codes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads_and_plans())
def test_posteriors_sum_to_one(case):
    p, plan, _ = case
    post = posterior(p, plan, POLICY)
    assert float(post.chutes.sum()) + post.invalid == pytest.approx(1.0, abs=1e-9)
    assert np.all(post.chutes >= 0) and 0.0 <= post.invalid <= 1.0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads_and_plans(), st.integers(0, 999))
def test_adding_a_code_the_read_rules_out_changes_no_decision(case, extra):
    """A new valid code that the read gives (next to) no probability does not move the decision."""
    p, plan, codes = case
    code = f"{extra:03d}"
    assume(extra not in codes and plan.chute_for(code) is None)
    p = floored(p)
    # The read rules the code out: every one of its digits at the floor.
    for i, digit in enumerate(code):
        moved = p[i, int(digit)] - PROBABILITY_FLOOR
        p[i, int(digit)] = PROBABILITY_FLOOR
        p[i, (int(digit) + 1) % 10] += moved
    before = decode(p, plan, POLICY)
    # Away from the threshold: one more code moves the prior's odds (valid : invalid) by a
    # factor of about 1 + 1/|V|, so posteriors near a decision edge move by up to ~1/|V|.
    margin = max(0.05, 1.0 / len(codes))
    assume(abs(before.chute_confidence - POLICY.threshold) > margin and abs(before.invalid_probability - 0.5) > margin)
    rows = "".join(f"{c},{ch}\n" for c, ch in plan.exact.items()) + "".join(f"{pfx}*,{ch}\n" for pfx, ch in
                                                                           plan.prefixes.items())
    bigger = plan_of(rows + f"{code},A\n", lengths=(3,))
    after = decode(p, bigger, POLICY)
    assert (after.accepted, after.chute, after.reason) == (before.accepted, before.chute, before.reason)


@given(st.floats(1e-9, 0.5), st.floats(1e-9, 0.5))
def test_threshold_is_monotone_in_the_target_rate(a, b):
    low, high = sorted((a, b))
    assert DecodePolicy(target_misdirect_rate=low).threshold >= DecodePolicy(target_misdirect_rate=high).threshold


@settings(max_examples=100, deadline=None)
@given(reads_and_plans(), st.floats(1e-6, 0.1), st.floats(1e-6, 0.1))
def test_a_looser_target_never_rejects_what_a_stricter_one_accepts(case, a, b):
    p, plan, _ = case
    strict, loose = sorted((a, b))
    if decode(p, plan, DecodePolicy(target_misdirect_rate=strict)).accepted:
        assert decode(p, plan, DecodePolicy(target_misdirect_rate=loose)).accepted


# ------------------------------------------------ a read with one mark too many (digit count)

SPECK = {d: 0.1 for d in range(9)}  # a stray mark: the classifier has no idea what it is (0.1 each)


def test_a_stray_mark_is_dropped_where_the_directory_says_and_the_chute_is_sorted():
    """Five marks for a plan of four-digit codes: only without the speck is it a valid code."""
    plan = plan_of("1234,A\n9999,B\n", lengths=(4,))
    p = probs({1: 0.999}, {2: 0.999}, SPECK, {3: 0.999}, {4: 0.999})
    decision = decide_with_plan(p.argmax(axis=1), p, (4,), plan, POLICY)
    assert decision.accepted and decision.chute == "A" and decision.postcode == "1234"
    assert decision.chute_confidence > 0.9999 and decision.alternatives[0][0] == "1234"
    assert len(decision.digits) == 5  # what was seen is still reported, speck included


def test_two_ways_of_dropping_a_mark_to_different_chutes_go_to_review_as_digit_count():
    """Dropping the first mark reads 2345 (chute A), dropping the last reads 1234 (chute B)."""
    plan = plan_of("2345,A\n1234,B\n", lengths=(4,))
    p = probs({1: 0.999}, {2: 0.999}, {3: 0.999}, {4: 0.999}, {5: 0.999})
    decision = decide_with_plan(p.argmax(axis=1), p, (4,), plan, POLICY)
    assert not decision.accepted and decision.reason is Reason.DIGIT_COUNT
    assert decision.chute_confidence == pytest.approx(0.5, abs=0.01)
    assert {code for code, _ in decision.alternatives} == {"2345", "1234"}


def test_a_stray_mark_beside_a_code_that_does_not_exist_is_not_sorted():
    plan = plan_of("1234,A\n", lengths=(4,))
    p = probs({5: 0.999}, {6: 0.999}, SPECK, {7: 0.999}, {8: 0.999})
    decision = decide_with_plan(p.argmax(axis=1), p, (4,), plan, POLICY)
    assert not decision.accepted and decision.reason is Reason.DIGIT_COUNT


def test_two_marks_too_many_or_one_too_few_still_go_to_review_unread():
    plan = plan_of("1234,A\n", lengths=(4,))
    for p in (probs(*[{d: 0.999} for d in (1, 2, 3, 4, 5, 6)]), probs(*[{d: 0.999} for d in (1, 2, 3)])):
        decision = decide_with_plan(p.argmax(axis=1), p, (4,), plan, POLICY)
        assert not decision.accepted and decision.reason is Reason.DIGIT_COUNT and decision.chute is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads_and_plans(length=3), st.lists(st.floats(0.0, 1.0), min_size=10, max_size=10).filter(
    lambda r: sum(r) > 1e-3), st.integers(0, 3))
def test_the_stray_mark_mixture_sums_to_one(case, extra, where):
    from edge_agent.decoder import posterior_with_a_stray_mark

    p, plan, _ = case
    four = np.insert(p, where, np.array(extra) / sum(extra), axis=0)
    post = posterior_with_a_stray_mark(four, plan, POLICY)
    assert float(post.chutes.sum()) + post.invalid == pytest.approx(1.0, abs=1e-9)
    assert np.all(post.chutes >= 0) and 0.0 <= post.invalid <= 1.0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads_and_plans())
def test_code_likelihoods_are_the_row_products_to_the_last_bit(case):
    """The decoder gathers a position at a time (speed); it must equal prod_i p_i(c_i) exactly."""
    from edge_agent.decoder import _code_likelihoods

    p, plan, _ = case
    index = plan.by_length[3]
    p = floored(p)
    assert np.array_equal(_code_likelihoods(p, index), np.prod(p[np.arange(3), index.codes], axis=1))


# The target spent over the mail (MisdirectBudget, sort_plan.acceptance = "spent").

def test_spent_threshold_by_hand():
    # Sorted posteriors 1.0, 0.999, 0.998, 0.99, 0.9: running mean doubt 0, 0.0005, 0.001,
    # 0.00325, 0.0226. Within 0.0015: the first three, so the bar is 0.998.
    posteriors = [0.9, 0.998, 1.0, 0.99, 0.999]
    assert spent_threshold(posteriors, 1.5e-3, floor=0.95, strict=0.9999) == pytest.approx(0.998)
    # Never below the floor, never above the strict bar, strict when nothing is known.
    assert spent_threshold(posteriors, 0.05, floor=0.99, strict=0.9999) == 0.99
    assert spent_threshold([1.0, 1.0], 1e-3, floor=0.99, strict=0.999) == 0.999
    assert spent_threshold([], 1e-3, floor=0.99, strict=0.999) == 0.999
    assert spent_threshold([0.5, 0.6], 1e-3, floor=0.99, strict=0.999) == 0.999
    # A bar accepts every read equal to it: two at 0.95 together break a budget one alone keeps.
    assert spent_threshold([1.0, 0.95, 0.95], 0.03, floor=0.0, strict=1.0) == 1.0


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200), st.floats(1e-6, 0.1), st.floats(1e-6, 0.1))
def test_a_larger_budget_never_raises_the_spent_bar(posteriors, a, b):
    low, high = sorted((a, b))
    loose = spent_threshold(posteriors, high, floor=0.9, strict=0.999)
    tight = spent_threshold(posteriors, low, floor=0.9, strict=0.999)
    assert 0.9 <= loose <= tight <= 0.999


MOSTLY_SURE = st.lists(st.one_of(st.just(1.0), st.floats(0.98, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=300)


@given(MOSTLY_SURE, st.floats(1e-5, 0.05))
def test_the_reads_over_the_spent_bar_keep_the_budget(posteriors, budget):
    bar = spent_threshold(posteriors, budget, floor=0.0, strict=1.0)
    above = [p for p in posteriors if p >= bar]
    if above:  # at the strict bar (1.0) there may be none
        assert np.mean([1.0 - p for p in above]) <= budget + 1e-12


def sure_mail(budget: MisdirectBudget, n: int) -> None:
    """n reads, 24 in 25 at 0.99999 and 1 in 25 at 0.995: a quarter of 1 in 1,000 spent over
    them allows down to 0.995 (mean doubt 0.00021)."""
    for i in range(n):
        budget.observe(0.995 if i % 25 == 24 else 0.99999)


def test_the_budget_holds_the_strict_bar_until_enough_reads_are_known():
    budget = MisdirectBudget(1e-3, window=400, refresh_every=1)
    assert budget.min_reads == 100 and budget.threshold() == pytest.approx(0.999)
    sure_mail(budget, 99)
    assert budget.threshold() == pytest.approx(0.999)
    sure_mail(budget, 1)
    assert budget.threshold() == pytest.approx(0.995)


def test_the_spent_bar_tightens_by_itself_when_the_mail_gets_harder_and_resets_to_strict():
    budget = MisdirectBudget(1e-3, window=400, refresh_every=1)
    sure_mail(budget, 400)
    assert budget.threshold() == pytest.approx(0.995)
    for _ in range(100):  # a quarter of the window now reads at 0.995: no longer all spendable
        budget.observe(0.995)
    assert budget.threshold() == pytest.approx(0.999)
    budget.reset()
    assert budget.reads() == 0 and budget.threshold() == pytest.approx(0.999)


def test_the_reads_a_bar_rests_on_are_taken_back_whole_and_set_the_same_bar():
    """recent/restore carry the window across a restart: the restored budget holds the bar the
    kept one held (at once, not after the next refresh), and a window too long keeps its newest."""
    kept = MisdirectBudget(1e-3, window=400, refresh_every=1)
    sure_mail(kept, 450)
    posteriors, observed = kept.recent()
    assert len(posteriors) == 400 and observed == 450
    again = MisdirectBudget(1e-3, window=400, refresh_every=25)
    again.restore(posteriors)
    assert again.reads() == 400 and again.threshold() == kept.threshold() == pytest.approx(0.995)
    narrower = MisdirectBudget(1e-3, window=100)
    narrower.restore(posteriors)
    assert narrower.recent()[0] == posteriors[-100:]
    few = MisdirectBudget(1e-3, window=400)
    few.restore(posteriors[:50])  # under min_reads: strict, as before those reads were known
    assert few.reads() == 50 and few.threshold() == pytest.approx(0.999)


@pytest.mark.parametrize("bad", [[0.5, float("nan")], [1.5], [-0.1]])
def test_a_window_of_anything_but_probabilities_is_refused_and_the_reads_kept(bad):
    budget = MisdirectBudget(1e-3, window=400, refresh_every=1)
    sure_mail(budget, 200)
    with pytest.raises(ValueError, match="from 0 to 1"):
        budget.restore(bad)
    assert budget.reads() == 200 and budget.threshold() == pytest.approx(0.995)


def test_the_spent_bar_never_goes_below_its_floor():
    budget = MisdirectBudget(0.009, window=500, refresh_every=1)  # strict bar 0.991
    for _ in range(400):
        budget.observe(1.0)
    for _ in range(20):  # spendable (mean doubt 0.0007 of 0.00225), but below the floor
        budget.observe(0.985)
    assert budget.threshold() == pytest.approx(0.99)


def test_the_acceptance_setting_picks_the_bar():
    assert misdirect_budget("per_item", 1e-3, 2000) is None
    spent = misdirect_budget("spent", 1e-3, 2000)
    assert spent.window == 2000 and spent.min_reads == 500 and spent.threshold() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="acceptance"):
        misdirect_budget("loose", 1e-3, 2000)


def test_a_spent_bar_never_loosens_the_policy_beyond_its_strict_bar():
    assert DecodePolicy(1e-3, spent_threshold=0.9999).threshold == pytest.approx(0.999)
    assert DecodePolicy(1e-3, spent_threshold=0.995).threshold == pytest.approx(0.995)
    assert DecodePolicy(1e-3).threshold == DecodePolicy(1e-3).strict_threshold


def test_a_decision_says_which_bar_it_was_held_to():
    plan = plan_of("12,A\n13,A\n45,B\n")
    read = probs({1: 0.999}, {2: 0.5, 3: 0.497})
    strict = decide_with_plan(np.array([1, 2]), read, (2,), plan, DecodePolicy(1e-3))
    spent = decide_with_plan(np.array([1, 2]), read, (2,), plan, DecodePolicy(1e-3, spent_threshold=0.99))
    assert strict.plan_fields()["chute_threshold"] == pytest.approx(0.999)
    assert spent.plan_fields()["chute_threshold"] == pytest.approx(0.99)


def test_a_plans_valid_share_counts_its_codes_and_the_codes_under_its_prefixes():
    assert plan_of("12,A\n13,A\n45,B\n").valid_share == pytest.approx(3 / 100)
    assert plan_of("1*,A\n12,B\n45,B\n").valid_share == pytest.approx(11 / 100)  # 12 is under 1*
    mixed = parse_sort_plan(b"postcode,chute\n75*,A\n01234,B\n", "test", (4, 5))
    assert mixed.valid_share == pytest.approx(1001 / 100_000)  # the larger share: 75xxx and 01234 of five digits


def test_auto_acceptance_spends_only_over_a_sparse_plan():
    auto = misdirect_budget("auto", 1e-3, 2000)
    assert auto.sparse_plans_only and not misdirect_budget("spent", 1e-3, 2000).sparse_plans_only
    sparse = plan_of("12,A\n13,A\n45,B\n")  # 3% of the two-digit codes
    dense = plan_of("1*,A\n2*,B\n3*,C\n")  # 30%
    assert auto.spends_on(sparse) and not auto.spends_on(dense)
    assert misdirect_budget("spent", 1e-3, 2000).spends_on(dense)
    edge = plan_of("".join(f"{n:02d},A\n" for n in range(10)))  # exactly SPARSE_PLAN_SHARE
    assert edge.valid_share == pytest.approx(SPARSE_PLAN_SHARE) and auto.spends_on(edge)


def test_under_auto_a_dense_plans_reads_are_held_to_the_strict_bar_and_never_feed_the_budget():
    read = probs({1: 0.999}, {2: 0.5, 3: 0.497})
    for plan, spends in ((plan_of("12,A\n13,A\n45,B\n"), True), (plan_of("1*,A\n2*,B\n3*,C\n"), False)):
        budget = MisdirectBudget(1e-3, window=100, min_reads=0, sparse_plans_only=True)
        budget._bar = 0.99  # as if the recent reads had loosened it
        decision = decide_with_budget(np.array([1, 2]), read, (2,), plan, DecodePolicy(1e-3), budget)
        assert decision.chute_threshold == pytest.approx(0.99 if spends else 0.999)
        assert budget.reads() == (1 if spends else 0)


def test_a_read_whose_digits_spell_no_valid_code_is_held_to_the_strict_bar():
    """Mail written to a code that does not exist reads as that code, and its uncertain digit's
    valid neighbours can still carry one chute over a spent bar: such a read needs the strict bar."""
    plan = plan_of("12,A\n13,A\n45,B\n")
    policy = DecodePolicy(1e-3, invalid_prior=0.5, spent_threshold=0.97)
    spells_14 = probs({1: 0.999}, {4: 0.4, 2: 0.3, 3: 0.297})
    spells_12 = probs({1: 0.999}, {2: 0.4, 4: 0.3, 3: 0.297})
    invalid_read = decode(spells_14, plan, policy)
    assert invalid_read.chute == "A" and invalid_read.chute_confidence > 0.97  # over the spent bar
    assert not invalid_read.accepted and invalid_read.reason is Reason.AMBIGUOUS
    assert invalid_read.threshold == pytest.approx(0.999)
    valid_read = decode(spells_12, plan, policy)
    assert valid_read.accepted and valid_read.chute == "A" and valid_read.threshold == pytest.approx(0.97)
    # The result says which bar the read was held to.
    decision = decide_with_plan(np.array([1, 4]), spells_14, (2,), plan, policy)
    assert not decision.accepted and decision.plan_fields()["chute_threshold"] == pytest.approx(0.999)
