"""Observability: PSI, input quality, the sliding window, the site's reference and drift alarms."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import ObservabilityConfig
from edge_agent.observability import (
    CONFIDENCE_EDGES,
    DriftMonitor,
    InputQuality,
    ObservedRead,
    ReadAggregates,
    ReadWindow,
    Reference,
    TrainingBaseline,
    confidence_bin,
    input_quality,
    population_stability_index,
)
from edge_agent.types import DigitRead, PostcodeRead, Reason
from tests.paths import SHIPPED_BUNDLE

psi = population_stability_index
NORMAL = InputQuality(brightness=150.0, contrast=40.0, sharpness=1000.0, inverted=False)
SMALL = ObservabilityConfig(window_reads=200, reference_reads=200, min_reads=100)


def read(digits, confidence=0.999, accepted=True, reason=None, quality=NORMAL, height=60.0) -> ObservedRead:
    digits = tuple(digits)
    return ObservedRead(digits, (confidence,) * len(digits), accepted, reason, quality,
                        height if digits else None)


def uniform_read(i: int, **kwargs) -> ObservedRead:
    """Read i of a cycle in which every digit is equally common overall and at every position."""
    return read(((i + 3 * j) % 10 for j in range(5)), **kwargs)


def two_class_read(i: int, **kwargs) -> ObservedRead:
    """Only 1s and 7s, as many of each over two reads."""
    return read((1, 7, 1, 7, 1) if i % 2 else (7, 1, 7, 1, 7), **kwargs)


def monitor_with_reference(config: ObservabilityConfig = SMALL) -> tuple[DriftMonitor, float]:
    """A monitor whose reference (and window) hold config.reference_reads uniform reads; the time after."""
    monitor = DriftMonitor(config, model_version="1.0.0")
    for i in range(config.reference_reads):
        monitor.observe(uniform_read(i), now=float(i))
    assert monitor.reference.complete
    return monitor, float(config.reference_reads)


# --- population stability index ---------------------------------------------------------

def test_psi_of_identical_distributions_is_zero():
    assert psi([0.1] * 10, [0.1] * 10) == 0.0
    assert psi([3, 0, 5], [3, 0, 5]) == 0.0


def test_psi_two_bins_by_hand():
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5) = 0.3 (ln 1.6 - ln 0.4) = 0.3 ln 4
    assert psi([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3 * math.log(4), abs=1e-9)
    assert psi([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.415888308335967, abs=1e-9)


def test_psi_of_an_empty_window_is_nan():
    assert math.isnan(psi([1] * 10, [0] * 10))
    assert math.isnan(psi([0] * 10, [1] * 10))


def test_psi_single_class_against_uniform_by_hand():
    # Observed [1, 0 x 9]: the nine empty bins are floored to 1e-4, then all renormalised by 1.0009.
    o_hit, o_empty = 1 / 1.0009, 1e-4 / 1.0009
    expected = (o_hit - 0.1) * math.log(o_hit / 0.1) + 9 * (o_empty - 0.1) * math.log(o_empty / 0.1)
    assert psi([0.1] * 10, [500] + [0] * 9) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(8.2810, abs=1e-4)  # 2.0694 + 9 x 0.6902


def test_psi_of_a_class_never_seen_in_the_reference_is_finite_and_large():
    value = psi([1] * 9 + [0], [1] * 10)
    assert math.isfinite(value) and value > 0.5  # dominated by 0.1 ln(0.1 / 1e-4) = 0.69


def test_psi_is_the_same_for_counts_and_proportions_and_both_ways_round():
    assert psi([30, 70], [60, 40]) == pytest.approx(psi([0.3, 0.7], [0.6, 0.4]), abs=1e-12)
    assert psi([30, 70], [60, 40]) == pytest.approx(psi([60, 40], [30, 70]), abs=1e-12)


def test_psi_refuses_distributions_over_different_bins():
    with pytest.raises(ValueError):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        psi([1, -1], [1, 1])


distributions = st.integers(min_value=1, max_value=25).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 1e6), min_size=n, max_size=n).filter(lambda v: sum(v) > 0),
    st.lists(st.floats(0, 1e6), min_size=n, max_size=n).filter(lambda v: sum(v) > 0)))


@given(distributions)
def test_psi_is_never_negative(pair):
    expected, observed = pair
    value = psi(expected, observed)
    assert math.isfinite(value) and value >= 0


# --- input quality ----------------------------------------------------------------------

def checkerboard(size: int = 96, square: int = 8) -> np.ndarray:
    ys, xs = np.indices((size, size))
    return (((ys // square + xs // square) % 2) * 255).astype(np.uint8)


def test_a_sharp_checkerboard_is_sharper_than_its_blur():
    sharp = checkerboard()
    blurred = cv2.GaussianBlur(sharp, (9, 9), 3)
    assert input_quality(sharp, False).sharpness > 4 * input_quality(blurred, False).sharpness > 0


def test_brightness_and_contrast_of_a_constant_image():
    q = input_quality(np.full((40, 60), 100, np.uint8), inverted=True)
    assert q == InputQuality(brightness=100.0, contrast=0.0, sharpness=0.0, inverted=True)


def test_brightness_and_contrast_of_a_checkerboard():
    q = input_quality(checkerboard(), False)
    assert q.brightness == pytest.approx(127.5) and q.contrast == pytest.approx(127.5)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5, 3), (1, 1), (1, 1, 3), (2, 1, 4), (1, 400)])
def test_empty_and_tiny_images_do_not_raise(shape):
    q = input_quality(np.zeros(shape, np.uint8), False)
    assert q.brightness == 0 and q.contrast == 0 and q.sharpness == 0


def test_bgr_bgra_and_grey_of_the_same_picture_agree():
    grey = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (120, 500), dtype=np.uint8), (3, 3), 1)
    expected = input_quality(grey, False)
    for image in (cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA),
                  grey[:, :, None]):
        q = input_quality(image, False)
        assert q.brightness == pytest.approx(expected.brightness)
        assert q.contrast == pytest.approx(expected.contrast)
        assert q.sharpness == pytest.approx(expected.sharpness)


def test_a_wide_frame_is_downscaled_before_the_laplacian():
    # A 1-px checkerboard averages to flat grey at a 4x downscale: the fine texture is not "sharp".
    fine = np.tile(checkerboard(size=2, square=1), (100, 640))  # 200 x 1280
    assert input_quality(fine, False).sharpness == pytest.approx(0.0, abs=1e-6)
    assert input_quality(fine[:, :300], False).sharpness > 1000  # narrow enough: measured as it is


# --- the sliding window -----------------------------------------------------------------

def test_window_keeps_the_last_n_reads():
    window = ReadWindow(window_reads=3, window_s=100)
    for i in range(5):
        window.add(read([i]), now=i)
    assert len(window) == 3
    assert window.aggregates.digit_counts.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_window_drops_reads_older_than_window_s():
    window = ReadWindow(window_reads=100, window_s=10)
    window.add(read([0]), now=0.0)
    window.add(read([1]), now=5.0)
    window.add(read([2]), now=10.0)
    assert len(window) == 3  # exactly window_s old is still in
    window.add(read([3]), now=12.0)
    assert window.aggregates.digit_counts.tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    snap = window.snapshot(now=15.5)  # pruned on the way: the read at 5.0 is 10.5 s old
    assert snap["reads"] == 2 and snap["span_s"] == 5.5
    assert window.snapshot(now=100.0)["reads"] == 0


def test_a_window_emptied_by_age_holds_nothing():
    window = ReadWindow(window_reads=10, window_s=10)
    window.add(read([1, 2], accepted=False, reason="low_confidence"), now=0.0)
    window.add(read([], accepted=False, reason="no_frame", quality=None), now=1.0)
    snap = window.snapshot(now=50.0)
    assert snap["reads"] == snap["frames"] == snap["digits"] == 0
    assert snap["review_rate"] is None and snap["review_rate_by_reason"] == {}
    assert snap["digit_distribution"] is None
    assert snap["quality"] == {"measured": 0, "brightness": None, "contrast": None, "sharpness": None,
                               "inverted_share": None}
    assert window.aggregates.sharpness_sum == 0.0


def test_per_position_distributions():
    window = ReadWindow(window_reads=10, window_s=100)
    window.add(read([1, 2, 3, 4, 5]), now=0)
    window.add(read([1, 2, 3, 9, 9]), now=1)
    window.add(read([1, 2, 3, 4, 5, 6]), now=2)  # the sixth digit counts overall only
    positions = window.aggregates.position_distributions()
    assert len(positions) == 5
    assert positions[0][1] == 1.0
    assert positions[3][4] == pytest.approx(2 / 3) and positions[3][9] == pytest.approx(1 / 3)
    assert window.aggregates.digit_counts[6] == 1 and window.aggregates.position_counts[:, 6].sum() == 0
    short = ReadWindow(window_reads=10, window_s=100)
    short.add(read([7, 7]), now=0)
    assert short.snapshot(now=0)["digit_distribution_by_position"][2] is None


def test_confidence_histogram_has_the_manifests_edges():
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    assert list(CONFIDENCE_EDGES) == manifest["baselines"]["test_confidence_histogram"]["edges"]
    assert len(CONFIDENCE_EDGES) == 21
    window = ReadWindow(window_reads=10, window_s=100)
    window.add(ObservedRead((1, 2, 3, 4, 5), (0.0, 0.05, 0.5, 0.999, 1.0), True, None, NORMAL), now=0)
    histogram = window.snapshot(now=0)["confidence_histogram"]
    assert histogram["edges"] == manifest["baselines"]["test_confidence_histogram"]["edges"]
    assert histogram["counts"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_confidence_bins_agree_with_numpy_histogram():
    values = np.concatenate([np.random.default_rng(2).random(2000), np.array(CONFIDENCE_EDGES)])
    counts = np.zeros(20, int)
    for v in values:
        counts[confidence_bin(float(v))] += 1
    assert counts.tolist() == np.histogram(values, bins=np.array(CONFIDENCE_EDGES))[0].tolist()


def test_digits_per_frame_counts_only_reads_that_saw_a_frame():
    window = ReadWindow(window_reads=10, window_s=100)
    for digits in ([1] * 5, [2] * 5, [3] * 4, [], [4] * 9):
        window.add(read(digits), now=0)
    window.add(read([], accepted=False, reason="no_frame", quality=None), now=0)
    per_frame = window.snapshot(now=0)["digits_per_frame"]
    assert per_frame["counts"] == [1, 0, 0, 0, 1, 2, 0, 0, 1]  # the last bin: 8 or more
    assert per_frame["mean"] == pytest.approx((5 + 5 + 4 + 0 + 9) / 5)


def test_review_rate_by_reason():
    window = ReadWindow(window_reads=10, window_s=100)
    window.add(read([1] * 5), now=0)
    window.add(read([1] * 5, confidence=0.6, accepted=False, reason="low_confidence"), now=0)
    window.add(read([1] * 4, accepted=False, reason="digit_count"), now=0)
    window.add(read([], accepted=False, reason="no_frame", quality=None), now=0)
    snap = window.snapshot(now=0)
    assert snap["review_rate"] == 0.75
    assert snap["review_rate_by_reason"] == {"digit_count": 0.25, "low_confidence": 0.25, "no_frame": 0.25}


def test_reads_without_a_frame_do_not_break_quality_means():
    window = ReadWindow(window_reads=10, window_s=100)
    window.add(read([1], quality=InputQuality(100, 20, 300, inverted=True)), now=0)
    window.add(read([], accepted=False, reason="no_frame", quality=None), now=0)
    window.add(read([2], quality=InputQuality(200, 40, 500, inverted=False)), now=0)
    assert window.snapshot(now=0)["quality"] == {"measured": 2, "brightness": 150.0, "contrast": 30.0,
                                                 "sharpness": 400.0, "inverted_share": 0.5}


def test_observed_read_from_a_postcode_read():
    decided = PostcodeRead("r1", "item-1", "17", False, 0.5, (DigitRead(1, 0.99), DigitRead(7, 0.5)),
                           Reason.LOW_CONFIDENCE, "1.0.0", 0.0, 3.0)
    observed = ObservedRead.from_postcode_read(decided, NORMAL)
    assert observed == ObservedRead((1, 7), (0.99, 0.5), False, "low_confidence", NORMAL)
    with pytest.raises(ValueError):
        ObservedRead((1, 2), (0.9,), True, None, None)


# --- the site's reference ---------------------------------------------------------------

def test_reference_fills_then_freezes_and_skips_reads_without_a_frame():
    reference = Reference("1.0.0", target=3)
    assert not reference.add(read([], accepted=False, reason="late", quality=None))
    assert [reference.add(read([d])) for d in (1, 2, 3, 4)] == [True, True, True, False]
    assert reference.complete and reference.count == 3
    assert reference.aggregates.digit_counts.tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_reference_survives_a_json_round_trip():
    reference = Reference("1.0.0", target=10)
    for i in range(7):
        reference.add(uniform_read(i, quality=InputQuality(90.5 + i, 30, 1234.5, inverted=i == 3)))
    reference.add(read([1, 2], accepted=False, reason="digit_count"))
    restored = Reference.from_json(reference.to_json())
    assert restored.summary() == reference.summary()
    assert restored.count == 8 and not restored.complete and restored.model_version == "1.0.0"


@pytest.mark.parametrize("text", ["", "[]", '{"format": 1}', '{"format": 99, "model_version": "x"}',
                                  '{"format": 1, "model_version": "x", "target": 5, "aggregates": {}}'])
def test_a_damaged_saved_reference_is_refused(text):
    with pytest.raises(ValueError):
        Reference.from_json(text)


def test_restore_reference_after_a_restart():
    monitor, now = monitor_with_reference()
    saved = monitor.reference.to_json()
    fresh = DriftMonitor(SMALL, model_version="1.0.0")
    fresh.restore_reference(Reference.from_json(saved))
    assert fresh.reference.complete
    other = DriftMonitor(SMALL, model_version="2.0.0")
    with pytest.raises(ValueError):
        other.restore_reference(Reference.from_json(saved))


# --- drift ------------------------------------------------------------------------------

def test_nothing_is_judged_before_the_reference_is_complete():
    monitor = DriftMonitor(SMALL, model_version="1.0.0")
    for i in range(SMALL.reference_reads - 1):
        monitor.observe(two_class_read(i, quality=replace(NORMAL, sharpness=10.0 * (i % 2))), now=float(i))
        report = monitor.assess(now=float(i))
        assert not report.judged and report.alarms == ()
        assert report.figures["prediction_psi"] is None and report.figures["sharpness_ratio"] is None
    monitor.observe(two_class_read(1), now=300.0)
    assert monitor.assess(now=300.0).judged


def test_nothing_is_judged_on_fewer_than_min_reads_with_a_frame():
    monitor, now = monitor_with_reference()
    for i in range(SMALL.window_reads):  # the camera is gone: every read is a no_frame review
        monitor.observe(read([], accepted=False, reason="no_frame", quality=None), now=now + i)
    report = monitor.assess(now=now + SMALL.window_reads)
    assert not report.judged and report.alarms == ()


def test_uniform_traffic_after_a_uniform_reference_raises_nothing():
    monitor, now = monitor_with_reference(ObservabilityConfig())
    rng = np.random.default_rng(3)
    for i in range(1000):
        digits = rng.integers(0, 10, 5)
        confidences = rng.choice([0.999, 0.9995, 0.97], size=5, p=[0.5, 0.45, 0.05])
        quality = InputQuality(rng.normal(150, 5), rng.normal(40, 2), rng.normal(1000, 100), rng.random() < 0.02)
        monitor.observe(ObservedRead(tuple(digits.tolist()), tuple(confidences.tolist()), True, None, quality),
                        now + i)
        report = monitor.assess(now + i)
        assert report.judged and report.alarms == ()
    assert report.figures["prediction_psi"] < 0.05


def test_two_digit_classes_raise_prediction_drift_within_min_reads():
    monitor, now = monitor_with_reference()
    for k in range(1, SMALL.min_reads + 1):
        monitor.observe(two_class_read(k), now + k)
        if monitor.assess(now + k).alarms:
            break
    report = monitor.assess(now + k)
    assert report.kinds == ("prediction_drift",)
    assert report.alarms[0].value >= SMALL.psi_alarm and report.alarms[0].level == SMALL.psi_alarm
    assert "PSI" in report.alarms[0].message
    # With k of 200 reads shifted, 1 and 7 each make 0.1 + 0.4 f of the digits (f = k / 200) and the
    # others 0.1 - 0.1 f, so PSI = 0.8 f ln((1 + 4f) / (1 - f)): 0.25 at f = 0.28503, k = 57.006. The
    # window's remaining reference reads are only nearly uniform, so the 57th or the 58th read.
    assert 57 <= k <= 58


def test_two_digit_classes_at_the_default_window():
    # Same formula over the default 500-read window: f = 0.28503 is k = 142.5, so the 143rd read or so.
    monitor, now = monitor_with_reference(ObservabilityConfig())
    for k in range(1, 501):
        monitor.observe(two_class_read(k), now + k)
        if monitor.assess(now + k).alarms:
            break
    assert 142 <= k <= 144


def test_prediction_drift_clears_when_normal_traffic_pushes_the_bad_reads_out():
    monitor, now = monitor_with_reference()
    for k in range(SMALL.window_reads):
        monitor.observe(two_class_read(k), now + k)
    assert monitor.assess(now + SMALL.window_reads).kinds == ("prediction_drift",)
    now += SMALL.window_reads
    for i in range(SMALL.window_reads):
        monitor.observe(uniform_read(i), now + i)
    report = monitor.assess(now + SMALL.window_reads)
    assert report.alarms == () and report.figures["prediction_psi"] == pytest.approx(0.0, abs=1e-12)


def test_blurred_frames_raise_and_clear_with_hysteresis():
    monitor, now = monitor_with_reference()
    blurred = replace(NORMAL, sharpness=0.2 * NORMAL.sharpness)
    # k blurred reads in a 200-read window: ratio = 1 - 0.8 k / 200, below 0.5 from k = 126.
    for k in range(1, SMALL.window_reads + 1):
        monitor.observe(uniform_read(k, quality=blurred), now + k)
        assert (monitor.assess(now + k).kinds == ("blurred_frames",)) == (k >= 126), k
    now += SMALL.window_reads
    # m sharp reads back: ratio = 0.2 + 0.8 m / 200. Above 0.5 from m = 38, but the alarm holds
    # until the clear level 0.5 / 0.8 = 0.625, reached at m = 107.
    for m in range(1, SMALL.window_reads + 1):
        monitor.observe(uniform_read(m), now + m)
        report = monitor.assess(now + m)
        assert (report.kinds == ("blurred_frames",)) == (m < 107), m
        if m == 106:
            assert report.figures["sharpness_ratio"] == pytest.approx(0.624)
            assert report.alarms[0].message.startswith("frames are blurred: mean sharpness is 62%")


def test_inverted_frames_raise_when_their_share_rises_by_more_than_0_3():
    monitor, now = monitor_with_reference()
    inverted = replace(NORMAL, inverted=True)
    for k in range(1, 62):
        monitor.observe(uniform_read(k, quality=inverted), now + k)
        report = monitor.assess(now + k)
        assert (report.kinds == ("inverted_frames",)) == (k == 61), k  # 60 / 200 = 0.3 is not above 0.3
    assert report.figures["inverted_share_change"] == pytest.approx(0.305)


def test_small_digits_raise_an_alarm_of_their_own_before_any_reference_and_clear_with_a_margin():
    """The digits' size is judged against a fixed level (observability.min_digit_height_px, 40),
    not against the site's reference: a camera framed too far away from day one fills the
    reference with small digits too."""
    monitor = DriftMonitor(SMALL, model_version="1.0.0")
    for k in range(1, SMALL.min_reads + 1):
        monitor.observe(uniform_read(k, height=30.0), float(k))
        report = monitor.assess(float(k))
        assert (report.kinds == ("small_digits",)) == (k == SMALL.min_reads), k  # judged from min_reads on
    assert not monitor.reference.complete and not report.judged
    assert report.figures["digit_height_px"] == pytest.approx(30.0)
    assert report.levels["digit_height_px"] == 40.0
    assert report.alarms[0].message.startswith("digits are 30 px tall on average (alarm below 40 px)")
    # Bigger digits come back: the alarm holds while the window's mean is under 40 / 0.8 = 50 px,
    # though it passed 40 long before, and clears from there on.
    now, held_above_level = float(SMALL.min_reads), 0
    for k in range(1, SMALL.window_reads + 1):
        monitor.observe(uniform_read(k, height=60.0), now + k)
        mean = monitor.window.aggregates.mean_digit_height
        assert ("small_digits" in monitor.assess(now + k).kinds) == (mean < 50.0), (k, mean)
        held_above_level += 40.0 <= mean < 50.0
    assert held_above_level > 10


def test_the_small_digits_alarm_can_be_turned_off_and_ignores_reads_without_digits():
    off = DriftMonitor(replace(SMALL, min_digit_height_px=0), model_version="1.0.0")
    on = DriftMonitor(SMALL, model_version="1.0.0")
    for k in range(SMALL.min_reads):
        off.observe(uniform_read(k, height=10.0), float(k))
        on.observe(read((), accepted=False, reason="no_postcode"), float(k))  # nothing found: no height
    assert off.assess(200.0).alarms == () and "digit_height_px" not in off.levels()
    assert on.assess(200.0).figures["digit_height_px"] is None and on.alarms == ()


def test_a_reference_saved_before_digit_heights_were_kept_still_loads():
    aggregates = ReadAggregates()
    aggregates.add(uniform_read(1, height=44.0))
    saved = aggregates.to_dict()
    assert ReadAggregates.from_dict(saved).mean_digit_height == pytest.approx(44.0)
    old = {k: v for k, v in saved.items() if k not in ("sized", "digit_height_sum")}
    assert ReadAggregates.from_dict(old).mean_digit_height is None
    aggregates.remove(uniform_read(1, height=44.0))
    assert aggregates.mean_digit_height is None and aggregates.digit_height_sum == 0.0


def test_a_shift_in_confidence_raises_confidence_drift():
    monitor, now = monitor_with_reference()
    for k in range(SMALL.min_reads):
        monitor.observe(uniform_read(k, confidence=0.8, accepted=False, reason="low_confidence"), now + k)
    report = monitor.assess(now + SMALL.min_reads)
    assert report.kinds == ("confidence_drift",)
    assert report.figures["confidence_psi"] > 1


def test_a_new_model_starts_a_new_reference_and_drops_the_alarms():
    monitor, now = monitor_with_reference()
    for k in range(SMALL.window_reads):
        monitor.observe(two_class_read(k), now + k)
    assert monitor.assess(now + SMALL.window_reads).alarms
    monitor.reset_reference("2.0.0")
    report = monitor.assess(now + SMALL.window_reads)
    assert not report.judged and report.alarms == () and monitor.alarms == ()
    assert monitor.model_version == "2.0.0" and monitor.reference.count == 0 and len(monitor.window) == 0


def test_training_baseline_from_the_shipped_manifest():
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    baseline = TrainingBaseline.from_manifest(manifest)
    assert baseline.class_distribution == pytest.approx((0.1,) * 10)
    assert list(baseline.confidence_counts) == manifest["baselines"]["test_confidence_histogram"]["counts"]


@pytest.mark.parametrize("baselines", [None, {}, {"training_class_distribution": "uniform"},
                                       {"test_confidence_histogram": {"edges": [0, 0.5, 1], "counts": [1, 2]}}])
def test_training_baseline_tolerates_missing_or_malformed_entries(baselines):
    manifest = {"name": "m"} if baselines is None else {"baselines": baselines}
    assert TrainingBaseline.from_manifest(manifest) == TrainingBaseline(None, None)


def test_prediction_psi_against_training_is_context_only():
    training = TrainingBaseline.from_manifest(json.loads((SHIPPED_BUNDLE / "manifest.json").read_text()))
    monitor = DriftMonitor(SMALL, training, model_version="1.0.0")
    for i in range(SMALL.reference_reads):
        monitor.observe(two_class_read(i), float(i))  # an office whose mail is all 1s and 7s
    report = monitor.assess(float(SMALL.reference_reads))
    assert report.judged and report.alarms == ()
    assert report.figures["prediction_psi_vs_training"] > 1
    assert report.figures["prediction_psi"] == 0.0


def test_snapshot_is_strict_json_in_every_state():
    training = TrainingBaseline.from_manifest(json.loads((SHIPPED_BUNDLE / "manifest.json").read_text()))
    monitor = DriftMonitor(SMALL, training, model_version="1.0.0")
    snapshots = [monitor.snapshot(now=0.0)]  # empty
    for i in range(SMALL.reference_reads):
        monitor.observe(uniform_read(i), float(i))
        if i == 50:
            snapshots.append(monitor.snapshot(float(i)))  # the reference is filling
    for k in range(SMALL.window_reads):
        monitor.observe(two_class_read(k, quality=replace(NORMAL, sharpness=100.0)), 300.0 + k)
    snapshots.append(monitor.snapshot(now=500.0))  # judged, with alarms
    for snap in snapshots:
        json.dumps(snap, allow_nan=False)
        assert set(snap) == {"model_version", "window", "reference", "training", "drift"}
        assert set(snap["drift"]) == {"judged", "figures", "alarms", "levels"}
    empty, filling, alarmed = snapshots
    assert empty["drift"]["judged"] is False and empty["drift"]["figures"]["prediction_psi"] is None
    assert filling["reference"]["reads"] == 51 and filling["reference"]["complete"] is False
    assert [a["kind"] for a in alarmed["drift"]["alarms"]] == ["prediction_drift", "blurred_frames"]
    assert set(alarmed["drift"]["alarms"][0]) == {"kind", "figure", "value", "level", "message"}
    assert alarmed["drift"]["figures"]["sharpness_ratio"] == pytest.approx(0.1)
    assert alarmed["training"]["class_distribution"] == [0.1] * 10
