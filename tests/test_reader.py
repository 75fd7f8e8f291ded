"""The OpenCV postcode reader: segmentation, MNIST normalisation, bad input, and exact reads with the model."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_agent.decision import decide
from edge_agent.mnist import DataError, DigitSet
from edge_agent.reader import ReaderConfig, locate_digits, mnist_normalise
from edge_agent.render import load_demo_digits, render_postcode_dataset, render_postcode_frame, render_postcode_samples
from edge_agent.types import LocatedDigits
from tests.paths import mnist_split

# Conditions the reader must cope with, each on its own, on an otherwise ordinary frame.
CONDITIONS = {
    "dark_on_light": {},
    "light_on_dark": dict(inverted=True, paper="navy", ink="white"),
    "light_on_black_yellow_ink": dict(inverted=True, paper="black", ink="yellow"),
    "coloured_paper": dict(paper="pink", ink="blue"),
    "brown_paper": dict(paper="brown", ink="blue"),
    "uneven_light": dict(illumination=0.6),
    "rotated": dict(rotation=4.5),
    "rotated_other_way": dict(rotation=-4.5),
    "blurred": dict(blur=2.0),
    "jpeg_noise": dict(jpeg_quality=30, noise=8.0),
    "box_around_field": dict(field="box"),
    "rotated_box": dict(field="box", rotation=-3.5),
    "ruled_line": dict(field="ruled"),
    "small_digits": dict(digit_height=40.0),
    "large_digits": dict(digit_height=90.0),
    "thick_pen": dict(stroke=2),
    "specks": dict(specks=30),
}


@pytest.fixture(scope="module")
def demo() -> DigitSet:
    return load_demo_digits()


@pytest.fixture(scope="module")
def eval_digits(model, demo) -> DigitSet:
    """Digits the model reads surely from the original 28x28 image, so a wrong read is the reader's fault.

    t10k when the dataset is here (evaluation, not tuning), else the bundled training digits.
    """
    try:
        digits = mnist_split("test")
    except (DataError, pytest.skip.Exception):
        digits = demo
    cls = model.classifier.classify(digits.images)
    sure = (cls.labels == digits.labels) & (cls.probabilities.max(axis=1) >= 0.999)
    return digits.subset(np.flatnonzero(sure))


def frames(digits: DigitSet, n: int, seed: int, length: int = 5, **conditions):
    """``n`` frames of one fixed condition set (the renderer's other settings at their defaults)."""
    return render_postcode_dataset(digits, n, np.random.default_rng(seed), length=length, vary=False,
                                   **conditions)


def read(model, frame: np.ndarray, config: ReaderConfig) -> str:
    located = locate_digits(frame, config)
    cls = model.classifier.classify(located.digits)
    return decide(cls.labels, cls.probabilities, config.expected_lengths,
                  model.manifest.acceptance_threshold).postcode


def assert_left_to_right(located: LocatedDigits) -> None:
    xs = [box[0] + box[2] / 2 for box in located.boxes]
    assert xs == sorted(xs)


# --- segmentation (no model) ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_finds_every_digit_left_to_right(demo, name):
    for frame, postcode in frames(demo, 4, seed=100, **CONDITIONS[name]):
        located = locate_digits(frame)
        assert len(located.digits) == len(postcode), name
        assert located.digits.shape[1:] == (28, 28) and located.digits.dtype == np.uint8
        assert len(located.boxes) == len(postcode)
        assert_left_to_right(located)
        assert located.note == ""


def test_polarity_is_reported(demo):
    (dark, _), = frames(demo, 1, seed=1)
    (light, _), = frames(demo, 1, seed=1, inverted=True, paper="black", ink="white")
    assert locate_digits(dark).inverted is False
    assert locate_digits(light).inverted is True


def test_digits_are_white_on_black_and_mnist_centred(demo):
    (frame, _), = frames(demo, 1, seed=2)
    located = locate_digits(frame)
    for digit in located.digits:
        assert digit.max() == 255
        assert digit[0, :].max() == 0 and digit[:, 0].max() == 0  # black border, as in MNIST
        cy, cx = centre_of_mass(digit)
        assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0


def test_boxes_cover_the_digits_in_frame_pixels(demo):
    rng = np.random.default_rng(3)
    digit = demo.images[demo.labels == 8][0]
    frame = render_postcode_frame([digit] * 5, rng, digit_height=60.0)
    located = locate_digits(frame)
    assert len(located.boxes) == 5
    grey = frame.mean(axis=2)
    for x, y, w, h in located.boxes:
        assert 40 <= h <= 80 and 15 <= w <= 80
        assert grey[y: y + h, x: x + w].min() < 100  # the box holds dark ink
    gaps = [b[0] - (a[0] + a[2]) for a, b in zip(located.boxes, located.boxes[1:])]
    assert all(g >= 0 for g in gaps)


def test_roi_limits_the_search_and_boxes_stay_in_frame_coordinates(demo):
    rng = np.random.default_rng(4)
    left = render_postcode_frame(list(demo.images[:5]), rng, size=(640, 480), digit_height=50.0)
    right = render_postcode_frame(list(demo.images[30:37]), rng, size=(640, 480), digit_height=50.0)
    both = np.hstack([left, right])  # two postcodes side by side; the ROI picks the right one
    located = locate_digits(both, ReaderConfig(roi=(640, 0, 640, 480), expected_lengths=(7,)))
    assert len(located.digits) == 7
    assert all(x >= 640 for x, _, _, _ in located.boxes)
    located_left = locate_digits(both, ReaderConfig(roi=(0, 0, 640, 480)))
    assert len(located_left.digits) == 5
    assert all(x + w <= 640 for x, _, w, _ in located_left.boxes)


def test_touching_digits_are_split(demo):
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(6):
        picks = rng.integers(0, len(demo), 5)
        frame = render_postcode_frame(list(demo.images[picks]), rng, gap=(-0.12, -0.05), stroke=1)
        hits += len(locate_digits(frame).digits) == 5
    assert hits >= 5


def test_a_small_digit_between_big_ones_is_its_own_digit(demo):
    """A digit written at half height is kept, not lost (with a big neighbour split in two instead)."""
    import cv2

    rng = np.random.default_rng(7)
    found = 0
    for _ in range(10):
        images = [image.copy() for image in demo.images[rng.integers(0, len(demo), 5)]]
        small = np.zeros((28, 28), np.uint8)
        small[8:20, 8:20] = cv2.resize(images[2], (12, 12), interpolation=cv2.INTER_AREA)
        images[2] = small
        located = locate_digits(render_postcode_frame(images, rng, digit_height=60.0, scale_jitter=0.0))
        found += len(located.boxes) == 5 and located.boxes[2][3] < 45  # the third box is the small digit
    assert found >= 9


def test_the_reader_says_which_marks_it_made_to_fill_the_row(demo):
    """Marks found whole carry no repair; cut from touching digits, "split" (or "split_to_count"
    when only the postcode's length asked for the cut); taken back from the row's gaps,
    "recovered". The decision doubts the made ones (decision.DOUBTED_REPAIRS)."""
    import cv2

    rng = np.random.default_rng(9)
    for _ in range(3):
        located = locate_digits(render_postcode_frame(list(demo.images[rng.integers(0, len(demo), 5)]), rng,
                                                      digit_height=60.0))
        assert located.repairs == ("",) * 5
    rng = np.random.default_rng(5)
    touching = [locate_digits(render_postcode_frame(list(demo.images[rng.integers(0, len(demo), 5)]), rng,
                                                    gap=(-0.12, -0.05), stroke=1)) for _ in range(4)]
    assert all(len(t.repairs) == len(t.digits) for t in touching)
    assert all({"split", "split_to_count"} & set(t.repairs) for t in touching)
    rng = np.random.default_rng(7)
    images = [image.copy() for image in demo.images[rng.integers(0, len(demo), 5)]]
    small = np.zeros((28, 28), np.uint8)
    small[8:20, 8:20] = cv2.resize(images[2], (12, 12), interpolation=cv2.INTER_AREA)
    images[2] = small
    located = locate_digits(render_postcode_frame(images, rng, digit_height=60.0, scale_jitter=0.0))
    assert located.repairs == ("", "", "recovered", "", "")


def test_ink_beside_a_mark_that_no_mark_took_is_reported(demo):
    """A clean row leaves nothing behind; a blot of ink in a gap that no digit claims counts
    against both its neighbours (LocatedDigits.left_behind, a share of each mark's own ink),
    not against the digits further away. It is how the rest of a digit cut short shows."""
    import cv2

    rng = np.random.default_rng(9)
    frame = render_postcode_frame(list(demo.images[rng.integers(0, len(demo), 5)]), rng, digit_height=60.0,
                                  paper="white", ink="black", rotation=0.0, field="none", specks=0, noise=0.0,
                                  blur=0.0, jpeg_quality=0, illumination=0.0)
    clean = locate_digits(frame)
    assert len(clean.digits) == 5 and clean.left_behind == (0.0,) * 5
    (x1, y1, w1, h1), (x2, _, _, _) = clean.boxes[1], clean.boxes[2]
    blotted = frame.copy()
    cv2.ellipse(blotted, ((x1 + w1 + x2) // 2, y1 + h1 // 2), (3, 9), 0, 0, 360, (20, 20, 20), -1)
    located = locate_digits(blotted)
    assert located.boxes == clean.boxes
    assert located.left_behind[1] > 0.05 and located.left_behind[2] > 0.05
    assert located.left_behind[0] == located.left_behind[3] == located.left_behind[4] == 0.0


def test_a_thick_pen_is_thinned_towards_mnist_strokes(demo):
    """The same digits in a felt-tip carry about as much ink after normalising as in an ordinary pen."""
    for seed in range(3):
        normal = frames(demo, 4, seed=seed)
        thick = frames(demo, 4, seed=seed, stroke=3)
        for (a, postcode), (b, _) in zip(normal, thick):
            ink_normal = locate_digits(a).digits.astype(np.float64).sum()
            ink_thick = locate_digits(b).digits.astype(np.float64).sum()
            assert ink_thick < 1.3 * ink_normal, postcode  # 1.4 to 1.7 times without thinning


def test_huge_frame_is_downscaled_and_read(demo):
    (frame, postcode), = frames(demo, 1, seed=6, digit_height=60.0)
    import cv2

    big = cv2.resize(frame, (3200, 2400), interpolation=cv2.INTER_LINEAR)
    located = locate_digits(big)
    assert len(located.digits) == len(postcode)
    # Boxes are in the frame's pixels; the scale says how big the reader saw them (1280 / 3200).
    assert located.scale == pytest.approx(0.4)
    assert locate_digits(frame).scale == 1.0
    # 5 times the frame, read at 0.4: the reader saw digits twice as tall as in the original.
    seen = np.median([h for _, _, _, h in located.boxes]) * located.scale
    assert seen == pytest.approx(2 * np.median([h for _, _, _, h in locate_digits(frame).boxes]), rel=0.15)


def test_a_big_colour_frame_reads_as_its_grey_copy(demo):
    """Frames beyond max_side are made grey before they are shrunk (one channel to average, not
    three): a colour camera's frame and the same frame in grey then give the same crops and boxes."""
    import cv2

    (frame, _postcode), = frames(demo, 1, seed=7, digit_height=60.0)
    big = cv2.resize(frame, (1920, 1440), interpolation=cv2.INTER_CUBIC)
    colour, grey = locate_digits(big), locate_digits(cv2.cvtColor(big, cv2.COLOR_BGR2GRAY))
    assert colour.scale == grey.scale == pytest.approx(1280 / 1920)
    assert len(colour.digits) == 5
    assert colour.boxes == grey.boxes
    assert np.array_equal(colour.digits, grey.digits)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [
    np.zeros((0, 0), np.uint8),
    np.zeros((0, 640, 3), np.uint8),
    np.zeros((1, 1), np.uint8),
    np.zeros((1, 1, 3), np.uint8),
    np.zeros((5, 5000), np.uint8),
    np.full((480, 640, 3), 255, np.uint8),
    np.zeros((480, 640, 3), np.uint8),
    np.full((480, 640), 128, np.uint8),
    np.zeros((4, 4, 4, 4), np.uint8),
    np.zeros((480, 640, 2), np.uint8),
], ids=["empty", "empty-rows", "1x1", "1x1x3", "strip", "all-white", "all-black", "all-grey", "4d",
        "two-channels"])
def test_weird_frames_give_no_digits_and_a_note(image):
    located = locate_digits(image)
    assert located.digits.shape == (0, 28, 28) and located.digits.dtype == np.uint8
    assert located.boxes == ()
    assert located.note


def test_huge_blank_frame_gives_no_digits_and_a_note():
    located = locate_digits(np.full((10_000, 10_000), 250, np.uint8))
    assert len(located.digits) == 0 and located.note


def test_noise_only_frame_finds_no_postcode():
    rng = np.random.default_rng(7)
    noise = np.clip(rng.normal(200, 6, (480, 640, 3)), 0, 255).astype(np.uint8)
    located = locate_digits(noise)
    assert len(located.digits) == 0 and located.note


@pytest.mark.parametrize("roi", [(700, 0, 100, 100), (0, 0, 0, 0), (-50, -50, 40, 40), (630, 470, 50, 50)])
def test_roi_outside_the_frame_gives_a_note(roi):
    located = locate_digits(np.full((480, 640, 3), 200, np.uint8), ReaderConfig(roi=roi))
    assert len(located.digits) == 0 and located.note


def test_bgra_and_single_channel_frames_are_read(demo):
    import cv2

    (frame, postcode), = frames(demo, 1, seed=8)
    assert len(locate_digits(cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA)).digits) == len(postcode)
    assert len(locate_digits(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[..., None]).digits) == len(postcode)


@pytest.mark.parametrize("bad", [None, [[0, 1], [1, 0]], "frame.png", np.zeros((10, 10), np.float32),
                                 np.zeros((10, 10), np.uint16), np.zeros((10, 10), bool)])
def test_non_arrays_and_wrong_dtypes_raise_value_error(bad):
    with pytest.raises(ValueError):
        locate_digits(bad)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.uint8, st.tuples(st.integers(0, 64), st.integers(0, 64), st.sampled_from([1, 3]))))
def test_never_raises_on_arbitrary_small_images(image):
    located = locate_digits(image)
    assert located.digits.ndim == 3 and located.digits.shape[1:] == (28, 28)
    assert len(located.boxes) == len(located.digits)


# --- MNIST normalisation ----------------------------------------------------------------------

def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    m = image.astype(np.float64)
    total = m.sum()
    return ((m.sum(axis=1) * np.arange(28)).sum() / total, (m.sum(axis=0) * np.arange(28)).sum() / total)


@st.composite
def stroke_crops(draw) -> np.ndarray:
    """A crop of any size and aspect with a few random anti-aliased strokes in it."""
    import cv2

    h, w = draw(st.integers(4, 200)), draw(st.integers(4, 200))
    crop = np.zeros((h, w), np.float32)
    for _ in range(draw(st.integers(1, 4))):
        p0 = (draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1)))
        p1 = (draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1)))
        cv2.line(crop, p0, p1, draw(st.floats(0.3, 1.0)), draw(st.integers(1, 12)), cv2.LINE_AA)
    return crop


@settings(max_examples=150, deadline=None)
@given(stroke_crops())
def test_normalised_digit_is_mnist_shaped(crop):
    digit = mnist_normalise(crop)
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() == 255
    ys, xs = np.nonzero(digit)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 20  # fitted into a 20x20 box
    cy, cx = centre_of_mass(digit)
    # Centred on (14, 14) by an integer shift, unless a lopsided digit would leave the field.
    assert abs(cy - 14) <= 0.501 or ys.min() == 0 or ys.max() == 27
    assert abs(cx - 14) <= 0.501 or xs.min() == 0 or xs.max() == 27


def test_normalising_an_mnist_digit_gives_it_back(demo):
    same = 0
    for image in demo.images[::10]:
        again = mnist_normalise(image.astype(np.float32) / 255.0)
        # Rounding of the resize and of the shift allow small differences, never a moved digit.
        same += np.abs(again.astype(int) - image.astype(int)).mean() < 12
    assert same >= 0.9 * len(demo.images[::10])


def test_empty_crop_normalises_to_black():
    assert not mnist_normalise(np.zeros((0, 0), np.float32)).any()
    assert not mnist_normalise(np.zeros((10, 10), np.float32)).any()


# --- exact reads with the shipped model ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_reads_the_exact_postcode(model, eval_digits, name):
    samples = frames(eval_digits, 6, seed=200, **CONDITIONS[name])
    right = sum(read(model, frame, ReaderConfig()) == postcode for frame, postcode in samples)
    assert right >= 5, f"{name}: {right}/6 exact"


@pytest.mark.parametrize("length", [6, 7])
def test_reads_long_postcodes(model, eval_digits, length):
    samples = frames(eval_digits, 6, seed=300 + length, length=length, digit_height=50.0)
    config = ReaderConfig(expected_lengths=(length,))
    right = sum(read(model, frame, config) == postcode for frame, postcode in samples)
    assert right >= 5, f"{length} digits: {right}/6 exact"


def test_reads_inside_an_roi(model, eval_digits):
    rng = np.random.default_rng(400)
    right = 0
    for _ in range(6):
        picks = rng.integers(0, len(eval_digits), 5)
        postcode = "".join(str(int(d)) for d in eval_digits.labels[picks])
        field = render_postcode_frame(list(eval_digits.images[picks]), rng, size=(400, 160),
                                      digit_height=55.0, field="box")
        frame = np.full((480, 640, 3), 235, np.uint8)
        frame[300:460, 200:600] = field
        frame[40:120, 60:300] = 30  # a dark label elsewhere on the envelope, outside the ROI
        right += read(model, frame, ReaderConfig(roi=(200, 300, 400, 160))) == postcode
    assert right >= 5


def test_varied_frames_are_mostly_read_exactly(model, eval_digits):
    samples = render_postcode_dataset(eval_digits, 40, np.random.default_rng(500))
    right = sum(read(model, frame, ReaderConfig()) == postcode for frame, postcode in samples)
    assert right >= 34, f"{right}/40 exact"


def test_never_raises_on_small_single_digit_frames():
    """Small frames with one digit under random conditions (a training-data generator found a crash here)."""
    from edge_agent.render import render_postcode_samples

    rng = np.random.default_rng(99)
    config = ReaderConfig(expected_lengths=(1,))
    for sample in render_postcode_samples(load_demo_digits(), 300, rng, length=1, size=(320, 240)):
        located = locate_digits(sample.frame, config)
        assert located.digits.shape[1:] == (28, 28) or len(located.digits) == 0


def test_two_workers_asking_for_one_frame_read_it_once():
    """Items bound to the same frame share one read even when two reader threads take them at once."""
    import threading

    from edge_agent.loader import load_bundle
    from edge_agent.pipeline import PostcodeReader
    from edge_agent.types import Frame
    from tests.paths import SHIPPED_BUNDLE

    reader = PostcodeReader(load_bundle(SHIPPED_BUNDLE), ReaderConfig())
    calls = []
    real = reader.read_image

    def counted(image):
        calls.append(1)
        time.sleep(0.05)  # a slow read: the other workers ask while it is running
        return real(image)

    reader.read_image = counted  # type: ignore[method-assign]
    frame = Frame(np.full((480, 640), 255, np.uint8), 1.0, 7, "cam")
    results = []
    threads = [threading.Thread(target=lambda: results.append(reader.read_frame_cached(frame))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert sorted(cached for _read, cached in results) == [False, True, True, True]


def test_a_tall_row_found_at_half_size_is_cut_into_the_digits_the_full_size_band_gives(demo, monkeypatch):
    """Rows at least HALF_SIZE_ROW_PX tall are segmented on the half-size copy and their digits
    cut from the full-size ink: the same marks, boxes within the half-size grid and digits within
    a few grey levels of reading the whole band at full size."""
    import edge_agent.reader as reader

    tall = frames(demo, 6, seed=4, digit_height=80.0)
    fast = [locate_digits(f) for f, _ in tall]
    monkeypatch.setattr(reader, "HALF_SIZE_ROW_PX", float("inf"))  # every band read at full size
    full = [locate_digits(f) for f, _ in tall]
    differences = []
    for a, b in zip(fast, full):
        assert len(a.digits) == len(b.digits) == 5
        for box_a, box_b in zip(a.boxes, b.boxes):
            assert max(abs(u - v) for u, v in zip(box_a, box_b)) <= 3
        differences.append(np.abs(a.digits.astype(np.int16) - b.digits.astype(np.int16)).mean())
    # Grey levels of 255 per pixel; two different digits differ by about 60. Measured: 0.2-7.2
    # per frame (a one-pixel shift of a stroke), 2.3 on average.
    assert max(differences) < 12 and np.mean(differences) < 4, differences


def test_a_small_row_is_read_at_full_size(demo, monkeypatch):
    """Below HALF_SIZE_ROW_PX the band is read at full size: nothing changes for small writing."""
    import edge_agent.reader as reader

    small = frames(demo, 3, seed=5, digit_height=44.0)
    before = [locate_digits(f) for f, _ in small]
    monkeypatch.setattr(reader, "HALF_SIZE_ROW_PX", float("inf"))
    for (f, _), a in zip(small, before):
        b = locate_digits(f)
        assert a.boxes == b.boxes and np.array_equal(a.digits, b.digits)



def test_shrinking_by_an_even_factor_halves_first(demo):
    """By 4 as two halvings (OpenCV's fast path): the same size, within a grey level of one step."""
    import cv2

    import edge_agent.reader as reader

    for frame, _ in frames(demo, 3, seed=8):
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        one_step = cv2.resize(grey, (grey.shape[1] // 4, grey.shape[0] // 4), interpolation=cv2.INTER_AREA)
        two_steps = reader._shrunk(grey, 4)
        assert two_steps.shape == one_step.shape
        assert np.abs(two_steps.astype(np.int16) - one_step).max() <= 1
        odd = grey[:-1, :-3]  # and sizes that do not halve evenly end the same size too
        assert reader._shrunk(odd, 4).shape == (odd.shape[0] // 4, odd.shape[1] // 4)
        assert np.array_equal(reader._shrunk(grey, 3),
                              cv2.resize(grey, (grey.shape[1] // 3, grey.shape[0] // 3), interpolation=cv2.INTER_AREA))


def test_the_threshold_of_a_large_ink_image_comes_from_every_other_pixel(demo):
    """Otsu on a quarter of the pixels (every other one of every other row) stays within a few
    grey levels of Otsu on the whole image; small images are thresholded whole."""
    import cv2

    import edge_agent.reader as reader

    for frame, _ in frames(demo, 6, seed=9):
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        ink = reader._ink_image(grey, 4)
        whole, _ = cv2.threshold(ink, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert abs(reader._threshold(ink, 0.0) - int(whole)) <= 4
        small = np.ascontiguousarray(ink[:200, :200])
        assert reader._threshold(small, 0.0) == int(cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])
        assert reader._threshold(ink, 0.9) == int(0.9 * 255)  # never below the minimum contrast


def test_a_mark_at_an_end_of_the_band_that_is_not_the_frames_means_the_band_cut_a_digit():
    from edge_agent.reader import _Band, _cut_by_band_end, _Mark

    band = _Band(100, 50, 400, 150, (150, 70, 350, 130), 40.0, (250.0, 100.0))  # 300 px wide
    inside = [_Mark(20, 10, 30, 40, (1,), 500), _Mark(250, 10, 30, 40, (2,), 500)]
    assert not _cut_by_band_end(inside, band, width=640)
    assert _cut_by_band_end([_Mark(0, 10, 30, 40, (1,), 500)] + inside[1:], band, width=640)
    assert _cut_by_band_end(inside[:1] + [_Mark(270, 10, 30, 40, (2,), 500)], band, width=640)
    # Where the band's end is the frame's, nothing lies beyond it.
    at_frame_edges = _Band(0, 50, 300, 150, (20, 70, 280, 130), 40.0, (150.0, 100.0))
    assert not _cut_by_band_end([_Mark(0, 10, 30, 40, (1,), 500), _Mark(270, 10, 30, 40, (2,), 500)],
                                at_frame_edges, width=300)


@pytest.mark.parametrize("seed, index", [(5, 118), (3, 193)])
def test_a_digit_the_band_cut_in_two_is_read_whole(model, demo, seed, index):
    """The row found at half size can miss an end digit (here the first), and the band padded
    around it then ends inside that digit: read as it was, 97621 came out as 11621 and 54811's
    first digit at 0.75. Such a band is widened to the frame's width, so the digit is cut whole.
    (Frames of the bundled digits where this happens, found by rendering 1,000.)"""
    sample = render_postcode_samples(demo, 200, np.random.default_rng(seed), length=5)[index]
    located = locate_digits(sample.frame, ReaderConfig(expected_lengths=(5,)))
    cls = model.classifier.classify(located.digits)
    assert "".join(map(str, cls.labels)) == sample.postcode
    assert cls.probabilities[0].max() >= 0.99


def test_only_the_vertical_runs_of_a_box_that_are_its_sides_or_span_it_are_printed_lines():
    from edge_agent.reader import _printed_verticals

    opened = np.zeros((60, 200), np.uint8)
    opened[:, 0:3] = 1  # the box's left side
    opened[:, 197:200] = 1  # its right side
    opened[:, 100:102] = 1  # a divider from the top edge to the bottom one (a comb)
    opened[20:60, 50:55] = 1  # an 8's stroke run on into the bottom edge: the digit's
    kept = _printed_verticals(opened, digit_height=40.0)
    assert kept[:, 0:3].all() and kept[:, 197:200].all() and kept[:, 100:102].all()
    assert not kept[:, 50:55].any()


def test_a_digit_written_on_a_printed_line_keeps_the_stroke_beside_it():
    """The line's mask is widened by two pixels to take its blurred edges; the stroke of a digit
    that sits on the line keeps those pixels (a 6's loop stays in one piece with its stem)."""
    from edge_agent.reader import _remove_lines
    import cv2

    binary = np.zeros((80, 300), np.uint8)
    binary[60:63, 10:290] = 1  # the ruled line
    cv2.circle(binary, (150, 45), 14, 1, 3)  # a loop whose bottom rests on the line
    binary[58:60, 120:126] = 1  # a speck of the line's blurred edge, away from the loop
    _n, _l, stats, _c = cv2.connectedComponentsWithStats(binary, connectivity=8)
    kept, lines = _remove_lines(binary, stats, digit_height=30.0)
    assert not kept[60:63].any()  # the line is gone
    assert kept[58:60, 145:156].any()  # the loop's bottom, just above it, is not
    assert not kept[58:60, 120:126].any()  # the line's own edge still goes


@pytest.mark.parametrize("seed, index", [(1, 55), (3, 78)])
def test_a_digit_touching_a_printed_box_or_line_is_read_whole(model, demo, seed, index):
    """Frames of the bundled digits where a digit touches the printed field: its stroke was cut
    out as part of a printed line (07124 read as 51124, 67004 as 170014); now read right."""
    sample = render_postcode_samples(demo, 200, np.random.default_rng(seed), length=5)[index]
    located = locate_digits(sample.frame, ReaderConfig(expected_lengths=(5,)))
    cls = model.classifier.classify(located.digits)
    assert "".join(map(str, cls.labels)) == sample.postcode
    assert cls.probabilities.max(axis=1).min() >= 0.99


def test_a_split_piece_holding_only_a_flat_stroke_is_a_line_end_not_a_digit():
    """A ruled line too faint or slanted to be removed in full leaves its end joined to a digit;
    the mark is then too wide and split, and the piece with only the line's end in it is no digit."""
    from dataclasses import replace
    from edge_agent.reader import _flat, _Mark, _Segmentation
    import cv2

    binary = np.zeros((60, 120), np.uint8)
    cv2.circle(binary, (80, 28), 16, 1, 3)  # a 0
    binary[43:45, 10:80] = 1  # the line's end, running into its foot
    _n, labels, stats, _c = cv2.connectedComponentsWithStats(binary, connectivity=8)
    label = int(labels[44, 20])
    assert label == int(labels[28, 64])  # line and digit are one component
    x, y, w, h, area = (int(v) for v in stats[label])
    seg = _Segmentation([], labels, binary, np.zeros_like(binary), stats)
    whole = _Mark(x, y, w, h, (label,), area)
    assert _flat(replace(whole, x_cut=(x, 60)), seg, row_h=34.0)
    assert not _flat(replace(whole, x_cut=(60, x + w)), seg, row_h=34.0)
    assert not _flat(whole, seg, row_h=34.0)


@pytest.mark.parametrize("seed, index", [(10, 144), (2, 66)])
def test_the_end_of_a_printed_line_left_on_a_digit_is_not_read_as_a_digit(model, demo, seed, index):
    """Frames of the bundled digits where a line's end stayed joined to a digit: the wide mark was
    split and the dash read as a digit too (14171 as 1412721, 52376 as 523762)."""
    sample = render_postcode_samples(demo, 200, np.random.default_rng(seed), length=5)[index]
    located = locate_digits(sample.frame, ReaderConfig(expected_lengths=(5,)))
    cls = model.classifier.classify(located.digits)
    assert "".join(map(str, cls.labels)) == sample.postcode


def test_a_stroke_along_a_lighter_printed_line_is_given_back_to_its_digit():
    """A 2's foot written along a ruled line lies in the line's own rows. Where the line is printed
    lighter than the pen, the stronger ink there is the digit's: kept, and out of the line's mask."""
    from edge_agent.reader import _remove_lines
    import cv2

    def drawn(line_level: int, pen_level: int) -> tuple[np.ndarray, np.ndarray]:
        ink = np.zeros((80, 300), np.uint8)
        ink[60:63, 10:290] = line_level  # the ruled line
        cv2.line(ink, (150, 30), (130, 61), pen_level, 3)  # a 2's stroke down to the line
        ink[59:63, 130:170] = pen_level  # its foot, along the line's rows
        return ink, (ink > 40).astype(np.uint8)

    ink, binary = drawn(line_level=90, pen_level=220)
    _n, _l, stats, _c = cv2.connectedComponentsWithStats(binary, connectivity=8)
    kept, lines = _remove_lines(binary, stats, 30.0, ink)
    assert kept[60:63, 132:168].all() and not lines[60:63, 132:168].any()  # the foot is the digit's
    assert not kept[60:63, 20:120].any() and lines[60:63, 20:120].all()  # the line still goes
    # A line as dark as the pen cannot be told from it: the foot goes with the line, as before.
    ink, binary = drawn(line_level=220, pen_level=220)
    _n, _l, stats, _c = cv2.connectedComponentsWithStats(binary, connectivity=8)
    kept, lines = _remove_lines(binary, stats, 30.0, ink)
    assert not kept[60:63, 132:168].any()


def test_a_2_whose_foot_lies_along_a_lighter_ruled_line_is_read_as_a_2(model, demo):
    """A frame of the bundled digits where the 2's foot went with the line and it read as a 7
    (46382 as 46387); now the foot is the digit's and the code reads right."""
    sample = render_postcode_samples(demo, 200, np.random.default_rng(2), length=5)[56]
    located = locate_digits(sample.frame, ReaderConfig(expected_lengths=(5,)))
    cls = model.classifier.classify(located.digits)
    assert "".join(map(str, cls.labels)) == sample.postcode == "46382"
    assert cls.probabilities[4].max() >= 0.99


def test_the_sides_of_a_box_its_digits_touch_are_removed_with_its_edges():
    """Digits touching their box make one component with it, and the digit height taken from
    that component is the box's: a digit's 1.2 of it is longer than the box's sides, which then
    stayed and were read as a 1 at each end of the row. A component whose top and bottom edges
    are lines is a box: its sides are looked for at its own height."""
    from edge_agent.reader import _remove_lines
    import cv2

    binary = np.zeros((90, 300), np.uint8)
    cv2.rectangle(binary, (10, 10), (280, 75), 1, 2)  # the box: 66 px tall
    for x in (40, 90, 140, 190, 235):  # five digits' stems, touching the box's bottom edge
        cv2.line(binary, (x, 30), (x + 6, 74), 1, 3)
    _n, labels, stats, _c = cv2.connectedComponentsWithStats(binary, connectivity=8)
    box = int(labels[10, 100])
    assert box == int(labels[60, 40 + 5])  # box and digits are one component
    digit_height = float(stats[box, 3])  # the estimate such a component gives
    kept, lines = _remove_lines(binary, stats, digit_height)
    assert not kept[15:70, 9:13].any() and not kept[15:70, 278:282].any()  # both sides gone
    assert kept[35:70, 38:50].any() and kept[35:70, 233:245].any()  # the digits stay
    # Without the top and bottom edges it is no box: its ends are not taken for sides.
    open_top = binary.copy()
    open_top[8:13, :] = 0
    _n, labels, stats, _c = cv2.connectedComponentsWithStats(open_top, connectivity=8)
    kept, _lines = _remove_lines(open_top, stats, digit_height)
    assert kept[40:70, 9:13].any()


def test_a_box_touched_by_its_digits_is_not_read_as_two_ones(model, demo):
    """A frame of the bundled digits whose box's sides were read as a 1 before the code
    (72769 as 172769): the box's height set the digit height, too long for its sides."""
    sample = render_postcode_samples(demo, 200, np.random.default_rng(8), length=5)[67]
    located = locate_digits(sample.frame, ReaderConfig(expected_lengths=(5,)))
    cls = model.classifier.classify(located.digits)
    assert "".join(map(str, cls.labels)) == sample.postcode == "72769"


def test_a_mark_much_fainter_than_its_row_is_cut_at_a_threshold_of_its_own():
    """A digit written half as dark as its row: at the frame's threshold its thin strokes fell
    under the weak level and only part of it was cut (an 8 kept its right half and read as a 3).
    Its threshold is the frame's scaled by its ink against the row's; its crop then takes the
    strokes joined to what was kept, and not a neighbour's."""
    from edge_agent.reader import _digit_crop, _faint_crop, _Mark, _mark_mask, _mark_thresholds, _Segmentation
    import cv2

    ink = np.zeros((80, 200), np.uint8)
    cv2.line(ink, (20, 15), (20, 65), 200, 5)  # a bold 1
    cv2.line(ink, (170, 15), (170, 65), 200, 5)  # another
    cv2.line(ink, (109, 40), (120, 40), 45, 2)  # a faint tick joining it to the 1 beside it
    cv2.ellipse(ink, (95, 40), (14, 24), 0, 0, 360, 45, 2)  # a faint 0, its left side thin and light
    cv2.ellipse(ink, (95, 40), (14, 24), 0, -80, 80, 95, 4)  # its right side a little darker
    cv2.line(ink, (122, 15), (122, 65), 200, 5)  # a bold 1 just beside it
    kept = (ink > 79).astype(np.uint8)  # the frame's threshold keeps the 0's right side only
    _n, labels, stats, _c = cv2.connectedComponentsWithStats(kept, connectivity=8)
    marks = [_Mark(*(int(v) for v in stats[labels[y, x]][:4]), (int(labels[y, x]),), int(stats[labels[y, x]][4]))
             for x, y in ((20, 40), (109, 40), (122, 40), (170, 40))]
    seg = _Segmentation(marks, labels, kept, np.zeros_like(kept), stats, has_lines=False)
    cut_at = _mark_thresholds(marks, [_mark_mask(m, seg) for m in marks], ink, 79, lowest=35)
    assert cut_at[0] == cut_at[2] == cut_at[3] == 79 and 35 <= cut_at[1] < 50
    before = _digit_crop(marks[1], seg, ink, 79)
    after = _faint_crop(1, marks, seg, ink, cut_at[1])
    assert before.shape[1] <= 20  # the right side alone
    # The whole 0, both sides, and the tick up to the 1 beside it, not into it (that is the 1's).
    assert 28 <= after.shape[1] <= marks[2].x - (95 - 15)
    # Row marks as dark as each other keep the frame's threshold.
    assert _mark_thresholds([marks[0], marks[3]], [_mark_mask(m, seg) for m in (marks[0], marks[3])],
                            ink, 79, lowest=35) == [79, 79]
