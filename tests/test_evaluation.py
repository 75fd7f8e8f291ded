"""The cost of decisions: scoring by hand-made cases, and `edge-agent evaluate` on rendered frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge_agent.decision import SORT_PLAN, Decision, chance_wrong
from edge_agent.evaluation import CostModel, poisson_at_least, score, wilson_interval
from edge_agent.render import load_demo_digits, render_postcode_frame
from edge_agent.sortplan import parse_sort_plan
from edge_agent.types import Reason
from tests.paths import ROOT

PLAN = parse_sort_plan(b"postcode,chute\n12345,A\n12346,A\n55555,B\n")


def accepted(postcode: str, chute: str | None = None) -> Decision:
    return Decision(postcode, True, 0.99, (), None, decided_by=SORT_PLAN if chute else "digit_threshold",
                    chute=chute)


def review(reason: Reason) -> Decision:
    return Decision("", False, 0.0, (), reason)


def test_scoring_by_hand():
    decisions = [accepted("12345", "A"), accepted("12346", "A"), accepted("55555", "B"),
                 review(Reason.AMBIGUOUS), review(Reason.INVALID_POSTCODE), accepted("55555", "B")]
    truths = ["12345", "12345", "55555", "12345", "99999", "99998"]
    cost = CostModel(keying_seconds=3.6, labour_per_hour=10.0, misdirect_cost=2.0)  # 0.01 per review
    report = score(decisions, truths, PLAN, cost)
    # The second is the wrong code but the right chute: not a misdirect. The last was mail to a
    # code that does not exist, sorted anyway: a misdirect.
    assert report["accepted"] == 4 and report["misdirects"] == 1
    assert report["auto_sort_rate"] == pytest.approx(4 / 6) and report["misdirect_rate"] == pytest.approx(0.25)
    assert report["reviews_by_reason"] == {"ambiguous": 1, "invalid_postcode": 1}
    assert report["invalid_envelopes"] == 2 and report["invalid_accepted"] == 1
    assert report["auto_sort_rate_valid_mail"] == pytest.approx(3 / 4)  # of the 4 to valid codes
    assert report["cost_per_1000"] == pytest.approx((2 * 0.01 + 1 * 2.0) / 6 * 1000, abs=0.01)


def test_without_a_plan_only_the_exact_postcode_counts():
    report = score([accepted("12346"), accepted("12345")], ["12345", "12345"], None, CostModel())
    assert report["misdirects"] == 1 and report["invalid_envelopes"] == 0


def test_the_misdirects_the_posteriors_expect_against_those_observed():
    """What the accepted reads' own posteriors promise (the chute's with a plan, the digits'
    product without), and how often chance alone gives as many misdirects as were observed."""
    sure = Decision("12345", True, 0.5, (), None, decided_by=SORT_PLAN, chute="A", chute_confidence=0.999)
    doubtful = Decision("55555", True, 0.5, (), None, decided_by=SORT_PLAN, chute="B", chute_confidence=0.99)
    no_plan = Decision("12345", True, 0.98, (), None)
    reviewed = Decision("12346", False, 0.2, (), Reason.AMBIGUOUS, decided_by=SORT_PLAN, chute="A",
                        chute_confidence=0.6)
    assert chance_wrong(sure.chute_confidence, sure.confidence) == pytest.approx(0.001)
    assert chance_wrong(no_plan.chute_confidence, no_plan.confidence) == pytest.approx(0.02)
    report = score([sure, doubtful, reviewed], ["12345", "55555", "12346"], PLAN, CostModel())
    assert report["misdirects"] == 0 and report["misdirects_expected"] == pytest.approx(0.011)  # reviews promise nothing
    assert report["misdirects_by_chance"] == 1.0
    report = score([sure, doubtful], ["12345", "12345"], PLAN, CostModel())  # the second went to B
    assert report["misdirects"] == 1
    assert report["misdirects_by_chance"] == pytest.approx(1 - np.exp(-0.011), abs=1e-6)


def test_poisson_tail_by_hand():
    assert poisson_at_least(0, 3.0) == 1.0 and poisson_at_least(1, 0.0) == 0.0
    assert poisson_at_least(2, 0.6) == pytest.approx(1 - np.exp(-0.6) * 1.6)
    assert poisson_at_least(3, 1.0) == pytest.approx(1 - np.exp(-1.0) * 2.5)
    tails = [poisson_at_least(k, 2.0) for k in range(8)]
    assert all(a > b for a, b in zip(tails, tails[1:]))  # more observed: less likely by chance


def test_wilson_interval():
    low, high = wilson_interval(0, 1000)
    assert low == 0.0 and high == pytest.approx(0.00383, abs=1e-4)
    low, high = wilson_interval(6, 1443)
    assert low < 6 / 1443 < high
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_evaluate_command_on_rendered_frames(tmp_path):
    digits = load_demo_digits()
    rng = np.random.default_rng(4)
    frames = tmp_path / "frames"
    frames.mkdir()
    rows, codes = ["file,postcode"], []
    for n in range(6):
        picks = rng.integers(0, len(digits), 5)
        code = "".join(str(int(d)) for d in digits.labels[picks])
        name = f"f{n}.png"
        cv2.imwrite(str(frames / name), render_postcode_frame(list(digits.images[picks]), rng))
        rows.append(f"{name},{code}")
        codes.append(code)
    # A frame that cannot be decoded is one more envelope for review (bad_frame), not a crash.
    (frames / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rows.append(f"torn.png,{codes[0]}")
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")
    # The first five codes exist (two chutes); the sixth envelope is addressed to a code that does not.
    plan = "postcode,chute\n" + "".join(f"{c},{'A' if i % 2 else 'B'}\n" for i, c in enumerate(codes[:5]))
    (tmp_path / "plan.csv").write_text(plan)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "evaluate", str(frames), "--truth",
                             str(tmp_path / "truth.csv"), "--sort-plan", str(tmp_path / "plan.csv"), "--json"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["envelopes"] == 7 and report["decided_by"] == "sort_plan"
    assert report["bad_frames"] == 1 and report["reviews_by_reason"]["bad_frame"] == 1
    assert "1 frame(s) could not be decoded" in result.stderr and "torn.png" in result.stderr
    assert report["invalid_envelopes"] == 1 and report["invalid_accepted"] == 0
    assert report["misdirects"] == 0
    # Five codes of 100,000: a sparse plan, so the default "auto" spends the target over the reads,
    # as a running agent whose bar rests on mail it read before.
    assert report["acceptance_setting"] == "auto" and report["acceptance"] == "spent" and report["start"] == "warm"
    cold = subprocess.run([sys.executable, "-m", "edge_agent.cli", "evaluate", str(frames), "--truth",
                           str(tmp_path / "truth.csv"), "--sort-plan", str(tmp_path / "plan.csv"), "--json",
                           "--cold"], capture_output=True, text=True, timeout=120, env=env)
    assert cold.returncode == 0, cold.stderr
    assert json.loads(cold.stdout)["start"] == "cold"
    strict = subprocess.run([sys.executable, "-m", "edge_agent.cli", "evaluate", str(frames), "--truth",
                             str(tmp_path / "truth.csv"), "--sort-plan", str(tmp_path / "plan.csv"), "--json",
                             "--acceptance", "per_item"], capture_output=True, text=True, timeout=120, env=env)
    assert strict.returncode == 0, strict.stderr
    assert json.loads(strict.stdout)["acceptance"] == "per_item"
    text = subprocess.run([sys.executable, "-m", "edge_agent.cli", "evaluate", str(frames), "--truth",
                           str(tmp_path / "truth.csv")], capture_output=True, text=True, timeout=120, env=env)
    assert text.returncode == 0 and "auto-sorted" in text.stdout and "cost per 1,000" in text.stdout


def test_the_reader_spends_the_target_over_its_reads_and_starts_strict_again_on_a_new_plan_or_model():
    """PostcodeReader with a MisdirectBudget: each decision carries the bar it was held to (strict
    until enough reads are known), every read with a chute feeds the bar, and a new plan or
    model empties it: a posterior under another plan or model means something else."""
    from edge_agent.decoder import DecodePolicy, MisdirectBudget
    from edge_agent.loader import load_bundle
    from edge_agent.pipeline import PostcodeReader
    from edge_agent.reader import ReaderConfig
    from tests.paths import SHIPPED_BUNDLE

    digits = load_demo_digits()
    rng = np.random.default_rng(8)
    frames, codes = [], []
    for _ in range(4):
        picks = rng.integers(0, len(digits), 5)
        codes.append("".join(str(int(d)) for d in digits.labels[picks]))
        frames.append(render_postcode_frame(list(digits.images[picks]), rng))
    plan = parse_sort_plan(("postcode,chute\n" + "".join(f"{c},{c[:2]}\n" for c in codes)).encode())
    budget = MisdirectBudget(1e-3, window=100, min_reads=2, refresh_every=1)
    model = load_bundle(SHIPPED_BUNDLE)
    reader = PostcodeReader(model, ReaderConfig(), plan=plan, policy=DecodePolicy(1e-3), budget=budget)
    first = reader.read_image(frames[0]).decision
    assert first.plan_fields()["chute_threshold"] == pytest.approx(0.999)  # nothing known yet: strict
    for frame in frames[1:]:
        reader.read_image(frame)
    with_chute = sum(1 for f in frames if reader.read_image(f).decision.chute is not None)
    assert with_chute >= 3 and budget.reads() == 2 * with_chute  # each frame read twice
    assert 0.99 <= budget.threshold() <= 0.999
    reader.swap_plan(plan)
    assert budget.reads() == 0 and budget.threshold() == pytest.approx(0.999)
    reader.read_image(frames[0])
    reader.swap_model(model)
    assert budget.reads() == 0
