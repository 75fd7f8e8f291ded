"""The frame renderer and the bundled demo digits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.render import (
    FrameConditions,
    fit_digit_height,
    load_demo_digits,
    random_conditions,
    render_postcode_dataset,
    render_postcode_frame,
    render_postcode_samples,
)


@pytest.fixture(scope="module")
def demo():
    return load_demo_digits()


def test_demo_digits_are_30_per_class(demo):
    assert demo.images.shape == (300, 28, 28) and demo.images.dtype == np.uint8
    assert np.bincount(demo.labels, minlength=10).tolist() == [30] * 10


def test_frame_is_bgr_uint8_of_the_requested_size(demo):
    frame = render_postcode_frame(list(demo.images[:5]), np.random.default_rng(0), size=(320, 240),
                                  digit_height=40.0)
    assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8


def test_same_seed_same_frame(demo):
    a = render_postcode_dataset(demo, 2, np.random.default_rng(9))
    b = render_postcode_dataset(demo, 2, np.random.default_rng(9))
    assert [p for _, p in a] == [p for _, p in b]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_ink_is_darker_than_paper_unless_inverted(demo):
    rng = np.random.default_rng(1)
    normal = render_postcode_frame(list(demo.images[:5]), rng).mean(axis=2)
    inverted = render_postcode_frame(list(demo.images[:5]), rng, inverted=True, paper="black",
                                     ink="white").mean(axis=2)
    assert np.median(normal) > 150 and normal.min() < 90
    assert np.median(inverted) < 90 and inverted.max() > 170


def test_unknown_condition_is_rejected(demo):
    with pytest.raises(TypeError):
        render_postcode_frame(list(demo.images[:5]), np.random.default_rng(0), sparkle=True)


def test_samples_carry_their_truth(demo):
    samples = render_postcode_samples(demo, 3, np.random.default_rng(2), length=(6, 7))
    for s in samples:
        assert len(s.postcode) in (6, 7) and len(s.digit_indices) == len(s.postcode)
        assert s.postcode == "".join(str(int(d)) for d in demo.labels[s.digit_indices])
        assert isinstance(s.conditions, FrameConditions)


def test_random_conditions_stay_in_range_and_accept_overrides():
    rng = np.random.default_rng(3)
    for _ in range(200):
        c = random_conditions(rng, field="box")
        assert c.field == "box"
        assert 40 <= c.digit_height <= 90 and abs(c.rotation) <= 5 and 0 <= c.illumination <= 0.6


def test_long_postcodes_are_shrunk_to_fit():
    wide = dataclasses.replace(FrameConditions(), digit_height=90.0, gap=(0.3, 0.5))
    fitted = fit_digit_height(wide, 7, (640, 480))
    assert fitted.digit_height < 90.0
    assert 7 * fitted.digit_height * (0.9 + 0.5) <= 0.8 * 640 + 1e-6
