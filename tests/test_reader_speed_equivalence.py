"""The fast reader reads what the reader before issue 11's speed work read, on a fixed set of frames.

Sixty envelopes rendered from the bundled training digits (never t10k) with varied conditions;
``BEFORE`` is what reader.py at commit db64bdd (before the speed work) reads on each, with the
shipped model (bundle 1.1.0 since session 20; the lists for 1.0.1 are in git history) and the
per-digit rule. Differences are allowed only where listed in ``CHANGED``, with the reason;
docs/SPEED.md has the accuracy on the validation split that justifies them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.decision import decide
from edge_agent.reader import (ReaderConfig, _normalise_stroke, _percentile, _percentile_of_counts, _projection_angle,
                               _stretched, locate_digits, mnist_normalise)
from edge_agent.render import load_demo_digits, render_postcode_samples

SEED = 2026
BEFORE = ['81063', '51742', '45000', '88344', '52419', '61286', '81027', '02963', '87111', '50906',
          '42144', '46780', '04575', '70491', '71920', '89472', '95246', '57311', '63162', '71168',
          '10727', '16238', '10044', '75786', '43583', '61111', '44257', '11454', '75016', '12344',
          '69473', '37352', '95934', '55365', '12898', '22575', '97444', '55804', '91218', '47338',
          '91162', '17187', '82731', '94441', '63392', '20796', '53134', '15180', '67599', '50673',
          '08692', '11247', '09008', '22509', '23307', '75631', '38226', '62919', '76546', '35892']
# frame -> (read before, read now, why). The row is now found at half size and its band deskewed
# about the half-size row's centre (a sub-pixel shift of the resampled digits).
CHANGED = {
    1: ("51742", "50413", "the truth is 50412. The band's read got it right once, its last digit at 0.41; "
                          "since a vertical run inside a box is no longer cut out as a printed line, the "
                          "bold 1 beside it reads whole and the 2 that touches the box at 0.87: a review "
                          "either way"),
}


@pytest.fixture(scope="module")
def samples():
    return render_postcode_samples(load_demo_digits(), len(BEFORE), np.random.default_rng(SEED), length=5)


def test_reads_are_the_same_postcodes_as_before(model, samples):
    config = ReaderConfig()
    now = []
    for sample in samples:
        located = locate_digits(sample.frame, config)
        cls = model.classifier.classify(located.digits)
        now.append(decide(cls.labels, cls.probabilities, config.expected_lengths,
                          model.manifest.acceptance_threshold).postcode)
    differing = {i: (before, read) for i, (before, read) in enumerate(zip(BEFORE, now)) if before != read}
    assert differing == {i: (before, read) for i, (before, read, _why) in CHANGED.items()}
    # Not worse on the truth either: as many exact reads as before.
    truth = [s.postcode for s in samples]
    assert sum(r == t for r, t in zip(now, truth)) >= sum(b == t for b, t in zip(BEFORE, truth))


def test_a_grey_frame_is_read_like_the_colour_frame_it_came_from(model, samples):
    """The reader works in grey: handing it grey pixels saves the conversion and changes nothing."""
    import cv2

    config = ReaderConfig()
    same = 0
    for sample in samples[:20]:
        grey = cv2.cvtColor(sample.frame, cv2.COLOR_BGR2GRAY)
        a, b = locate_digits(sample.frame, config), locate_digits(grey, config)
        same += a.digits.shape == b.digits.shape and np.array_equal(a.digits, b.digits)
    assert same == 20


@pytest.mark.parametrize("q", [50, 75, 80])
def test_percentiles_match_numpy_bit_for_bit(q):
    rng = np.random.default_rng(q)
    for n in list(range(1, 30)) + [101, 999]:
        ints = rng.integers(0, 300, n).tolist()
        assert _percentile(ints, q) == float(np.percentile(ints, q))
        # The crop's peak: grey levels, counted into a histogram.
        levels = rng.integers(0, 256, n).astype(np.uint8)
        counts = np.bincount(levels, minlength=256)
        assert _percentile_of_counts(counts, q) == float(np.percentile(levels, q))
        if q in (50, 75):  # and numpy's percentile of the float32 crop it was taken from before
            assert _percentile_of_counts(counts, q) == float(np.percentile(levels.astype(np.float32), q))


def test_skew_of_a_tilted_line_is_found():
    import cv2

    ink = np.zeros((200, 400), np.uint8)
    cv2.line(ink, (20, 100), (380, 100), 255, 3)
    tilted = cv2.warpAffine(ink, cv2.getRotationMatrix2D((200, 100), 3.0, 1.0), (400, 200))
    # The angle that brings the line upright again: the opposite of the tilt.
    assert abs(_projection_angle(tilted, 40) + 3.0) <= 0.15
    assert _projection_angle(np.zeros((50, 50), np.uint8), 40) == 0.0


# --- OpenCV passes that replaced NumPy ones: the same pixels, bit for bit -------------------------

def _mnist_normalise_numpy(crop: np.ndarray) -> np.ndarray:
    """mnist_normalise as it was written with NumPy before the OpenCV passes (session 19)."""
    import cv2

    out = np.zeros((28, 28), np.uint8)
    x0, y0, w, h = cv2.boundingRect((crop > 0).view(np.uint8))
    if w == 0:
        return out
    crop = crop[y0: y0 + h, x0: x0 + w]
    scale = 20 / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    peak = cv2.minMaxLoc(small)[1]
    if peak <= 0:
        return out
    np.multiply(small, 255.0 / peak, out=small)
    np.round(np.clip(small, 0, 255, out=small), out=small)
    total = small.sum()
    cy = float((small.sum(axis=1) * np.arange(nh)).sum() / total)
    cx = float((small.sum(axis=0) * np.arange(nw)).sum() / total)
    top = min(max(round(14.0 - cy), 0), 28 - nh)
    left = min(max(round(14.0 - cx), 0), 28 - nw)
    out[top: top + nh, left: left + nw] = small.astype(np.uint8)
    return out


def _stretched_numpy(pixels, mask, rim, threshold):
    """The stroke stretch of _stretched as it was written with NumPy (before its level table)."""
    crop = np.multiply(pixels, rim, dtype=np.float32)
    core = crop[mask].astype(np.uint8)
    peak = float(np.percentile(core, 75)) if core.size else 255.0
    floor = 0.5 * threshold
    if peak <= floor:
        return np.zeros_like(crop)
    np.subtract(crop, floor, out=crop)
    np.divide(crop, peak - floor, out=crop)
    return np.clip(crop, 0.0, 1.0, out=crop)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 90), st.integers(1, 90), st.integers(0, 2**32 - 1), st.sampled_from([1.0, 0.5, 0.25]))
def test_mnist_normalise_rounds_and_centres_as_numpy_did(h, w, seed, ink_share):
    rng = np.random.default_rng(seed)
    crop = rng.random((h, w), dtype=np.float32)
    crop[rng.random((h, w)) > ink_share] = 0.0  # paper around and between the strokes
    # Levels that land exactly on a rounding boundary once scaled to 255 at the peak.
    crop.flat[:: 7] = np.float32(0.5 / 255) * rng.integers(0, 510, crop.flat[:: 7].shape)
    assert np.array_equal(mnist_normalise(crop), _mnist_normalise_numpy(crop.copy()))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(0, 2**32 - 1), st.integers(36, 200))
def test_the_stroke_stretch_is_the_numpy_formula(h, w, seed, threshold):
    import cv2

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask = pixels > threshold
    rim = cv2.dilate(mask.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    rim &= rng.random((h, w)) > 0.1  # a printed line took some of the rim
    # _stretched also normalises the strokes; with the stretch given, so does the reference.
    expected = _stretched_numpy(pixels, mask, rim, threshold)
    got = _stretched(pixels, mask, rim, threshold)
    assert np.array_equal(got, _normalise_stroke(expected) if expected.any() else expected)
