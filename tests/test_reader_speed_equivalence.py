"""The fast reader reads what the reader before issue 11's speed work read, on a fixed set of frames.

Sixty envelopes rendered from the bundled training digits (never t10k) with varied conditions;
``BEFORE`` is what reader.py at commit db64bdd (before the speed work) read on each, with the
shipped model and the per-digit rule. Differences are allowed only where listed in ``CHANGED``,
with the reason; docs/SPEED.md has the accuracy on the validation split that justifies them.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.decision import decide
from edge_agent.reader import ReaderConfig, _percentile, _percentile_of_uint8, _projection_angle, locate_digits
from edge_agent.render import load_demo_digits, render_postcode_samples

SEED = 2026
BEFORE = ['81063', '51742', '45000', '88344', '52419', '61286', '81027', '02963', '87111', '50906',
          '42144', '46720', '04575', '70491', '71920', '89472', '95246', '57311', '63162', '71168',
          '10727', '16238', '10044', '75786', '43583', '61111', '44257', '11434', '75016', '12344',
          '69473', '37352', '95934', '53365', '12898', '22575', '97444', '55804', '91218', '47338',
          '91162', '17187', '82731', '94441', '63392', '20796', '53134', '15180', '67599', '50673',
          '08692', '11247', '09008', '22509', '23307', '75631', '38226', '62919', '76546', '35892']
# frame -> (read before, read now, why). The row is now found at half size and its band deskewed
# about the half-size row's centre (a sub-pixel shift of the resampled digits).
CHANGED = {
    1: ("51742", "50412", "the truth is 50412: the band's read is right where the old one was wrong"),
    11: ("46720", "46780", "the truth is 46780: a tall row, now segmented on the half-size copy (its"
                           " digits still cut at full size), reads its 8 whole"),
    51: ("11247", "11847", "a 2 whose resampled stroke now reads 8; the truth is 11247"),
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
        assert _percentile_of_uint8(levels, q) == float(np.percentile(levels, q))
        if q in (50, 75):  # and numpy's percentile of the float32 crop it was taken from before
            assert _percentile_of_uint8(levels, q) == float(np.percentile(levels.astype(np.float32), q))


def test_skew_of_a_tilted_line_is_found():
    import cv2

    ink = np.zeros((200, 400), np.uint8)
    cv2.line(ink, (20, 100), (380, 100), 255, 3)
    tilted = cv2.warpAffine(ink, cv2.getRotationMatrix2D((200, 100), 3.0, 1.0), (400, 200))
    # The angle that brings the line upright again: the opposite of the tilt.
    assert abs(_projection_angle(tilted, 40) + 3.0) <= 0.15
    assert _projection_angle(np.zeros((50, 50), np.uint8), 40) == 0.0
