"""Find the handwritten postcode in a camera frame and normalise each digit the way MNIST was made.

Pure functions on arrays (OpenCV + NumPy). The stages, each small on purpose:

    prepare (validate, ROI, grey, downscale huge frames)
    -> polarity (dark ink on light paper, or light on dark)
    -> illumination normalisation (divide by a paper estimate: an "ink" image, white on black)
    -> binarise (Otsu with hysteresis, never below a minimum contrast), remove long printed lines
    -> connected components -> the best row of digit-sized marks -> deskew and repeat once
    -> merge broken strokes, take back small digits in the row's gaps, split touching digits
    -> pen width into MNIST's range, MNIST normalisation (20x20 box keeping aspect, 28x28
       centred by centre of mass)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from edge_agent.types import LocatedDigits

log = logging.getLogger(__name__)

MNIST_BOX = 20
MNIST_SIZE = 28
MNIST_CENTRE = 14.0
# MNIST's pens: stroke width (twice area over contour length) as a fraction of the digit's box,
# measured on the training digits: 5th to 90th percentile 0.08 to 0.16, median 0.12.
# Widths outside the range are brought to just inside it, not to the median: pens do vary.
# Thin strokes are left alone down to the 5th percentile: a soft, faint stroke measures thin
# at the half-ink level, and widening one the model already reads costs more than it gains.
MNIST_STROKE_RANGE = (0.08, 0.15)
MNIST_STROKE_AIM = (0.10, 0.13)


@dataclass(frozen=True)
class ReaderConfig:
    """Where to look and what a digit looks like; sizes are fractions of the full frame height."""

    roi: tuple[int, int, int, int] | None = None  # (x, y, w, h) in frame pixels; None = whole frame
    expected_lengths: tuple[int, ...] = (5,)  # allowed postcode lengths, used to split/merge marks
    min_digit_height: float = 0.04  # below this a mark is a speck or a stroke fragment
    max_digit_height: float = 0.5  # above this a mark is a shadow, an edge or a printed frame
    max_side: int = 1280  # larger frames are downscaled first (INTER_AREA) to bound the work
    min_contrast: float = 0.14  # ink must be at least this much darker (relative) than the paper
    max_digits: int = 12  # more marks in the row than this is not a postcode
    deskew_min_degrees: float = 0.4  # rotate the text line upright when it leans more than this


@dataclass(frozen=True)
class _Mark:
    """One connected ink component (or a union of pieces) in working-image pixels."""

    x: int
    y: int
    w: int
    h: int
    labels: tuple[int, ...]  # component labels that make up this mark
    area: int
    x_cut: tuple[int, int] | None = None  # column range kept when a wide mark was split
    repair: str = ""  # how the row was mended to make this mark: "split", "split_to_count", "recovered", "merged"

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h


@dataclass(frozen=True)
class _Segmentation:
    """The chosen row of digits in one (possibly rotated) ink image."""

    marks: list[_Mark]
    labels: np.ndarray  # connected-component label image
    binary: np.ndarray  # uint8 0/1 ink mask after line removal
    lines: np.ndarray  # uint8 0/1 mask of the printed lines removed, widened over their edges (crops leave it out)
    stats: np.ndarray  # stats rows (x, y, w, h, area) per label of ``labels``
    has_lines: bool = True  # False when ``lines`` is all zero (no printed line was removed)


def _percentile(values: list[int] | list[float], q: float) -> float:
    """``np.percentile(values, q)`` (linear method), bit for bit, without NumPy's per-call overhead."""
    a = sorted(values)
    lo, hi, t = _order_statistics(len(a), q)
    return _lerp(float(a[lo]), float(a[hi]), t)


def _order_statistics(n: int, q: float) -> tuple[int, int, float]:
    """The two order statistics (from 0) the q-th percentile of n values lies between, and where."""
    virtual = (n - 1) * (q / 100)
    lo = min(max(int(math.floor(virtual)), 0), n - 1)
    return lo, min(lo + 1, n - 1), virtual - lo


def _lerp(x: float, y: float, t: float) -> float:
    """NumPy's percentile interpolation: from the nearer end, so exact at t = 0 and t = 1."""
    return y - (y - x) * (1 - t) if t >= 0.5 else x + (y - x) * t


def _percentile_of_counts(counts: np.ndarray, q: float) -> float:
    """``np.percentile`` of the grey levels counted in ``counts`` (level -> how many), bit for bit.

    A digit's core is a few hundred to a few thousand grey levels: counting them into 256 bins
    and reading the two order statistics off the running count is about twice as fast as
    partitioning them.
    """
    running = np.cumsum(counts)
    lo, hi, t = _order_statistics(int(running[-1]), q)
    # The k-th smallest value (from 0) is the first level whose running count exceeds k.
    x, y = np.searchsorted(running, (lo, hi), side="right").tolist()
    return _lerp(float(x), float(y), t)


def _median(values) -> float:
    """``np.median`` of a few numbers, as a Python float."""
    return _percentile(list(values), 50)


def _empty(note: str, inverted: bool = False) -> LocatedDigits:
    """No digits, with the reason a reviewer will see."""
    return LocatedDigits(np.zeros((0, MNIST_SIZE, MNIST_SIZE), np.uint8), (), inverted, note)


def _to_grey(image: np.ndarray) -> np.ndarray | None:
    """BGR, BGRA or single-channel uint8 to a contiguous grey image; None when the shape is not an image."""
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.ascontiguousarray(image[..., 0])
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2GRAY)
    return None


def _clip_roi(roi: tuple[int, int, int, int] | None, width: int, height: int) -> tuple[int, int, int, int]:
    """The ROI intersected with the frame (possibly empty)."""
    if roi is None:
        return 0, 0, width, height
    x, y, w, h = (int(v) for v in roi)
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def _polarity_is_light_on_dark(small: np.ndarray) -> bool:
    """True when the strong deviations from the local paper level are brighter, not darker.

    Decided on a quarter-size copy of the ~120 px paper copy (about 30 x 40 px): the wide median
    that estimates the paper costs 4.5x less there than at half size (0.38 -> 0.085 ms a frame),
    and the decision was the same as at half size on 8,000 frames rendered from training and
    validation digits (1,235 of them light on dark); half size had matched full size on 2,000.
    """
    while min(small.shape) >= 2 * POLARITY_MIN_SIDE:
        small = cv2.resize(small, (small.shape[1] // 2, small.shape[0] // 2), interpolation=cv2.INTER_AREA)
    k = max(3, (min(small.shape) // 4) | 1)
    paper = cv2.medianBlur(small, min(k, 99))
    # Ink is the minority: it stands out from the local median; noise is symmetric and small.
    # Saturating uint8 subtractions give max(deviation - 12, 0) each way, without a signed copy.
    bright = cv2.sumElems(cv2.subtract(cv2.subtract(small, paper), 12))[0]
    dark = cv2.sumElems(cv2.subtract(cv2.subtract(paper, small), 12))[0]
    return bool(bright > dark)


POLARITY_MIN_SIDE = 20  # the polarity copy is halved only while it stays at least this many pixels on a side


def _halved(image: np.ndarray) -> np.ndarray:
    """A half-size copy (box average)."""
    return cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _shrunk(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` shrunk by ``factor`` (box average); by an even factor, halved first.

    OpenCV's box average has a fast path for exact halving: halving a 640x480 frame and halving
    that again costs about a third of shrinking it by 4 in one step (measured 50 + 15 against
    228 us). Rounding twice differs from rounding once by at most one grey level.
    """
    h, w = image.shape
    size = (max(1, w // factor), max(1, h // factor))
    if factor % 2 == 0 and factor > 2:
        image = _halved(image)  # (w // 2) // (factor // 2) == w // factor: the same size in the end
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _ink_image(paper_grey: np.ndarray, small_factor: int, small: np.ndarray | None = None) -> np.ndarray:
    """Relative darkness against a paper estimate: uint8, 0 = paper, 255 = fully black ink.

    ``small`` is ``paper_grey`` already shrunk by ``small_factor`` (INTER_AREA), when the caller has it.
    """
    h, w = paper_grey.shape
    if small is None:
        small = _shrunk(paper_grey, small_factor)
    # A max filter wider than any pen stroke sees only paper; the blur keeps the estimate smooth.
    paper = cv2.dilate(small, _PAPER_KERNEL)
    paper = cv2.blur(paper, (7, 7))
    # Never divide by 0; bilinear upscaling of values >= 1 stays >= 1, so clamp the small copy.
    paper = cv2.resize(cv2.max(paper, 1), (w, h), interpolation=cv2.INTER_LINEAR)
    ratio = cv2.divide(paper_grey, paper, scale=255.0)  # saturates at 255 where brighter than paper
    return cv2.bitwise_not(ratio, dst=ratio)


_PAPER_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))


def _threshold(ink: np.ndarray, min_contrast: float) -> int:
    """Otsu's threshold on the ink image, never below the contrast that separates ink from paper grain.

    A large image's histogram is taken from every other pixel of every other row: the same
    distribution of stroke, edge and paper levels (box-averaging instead would blur the edges into
    mid-levels and move the threshold) at a quarter of the cost. Measured on 257 rendered frames:
    within 3 grey levels of the whole image's threshold, 0.3 higher on average.
    """
    if min(ink.shape) >= COARSE_MIN_SIDE:
        ink = np.ascontiguousarray(ink[::2, ::2])
    otsu, _ = cv2.threshold(ink, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(max(otsu, min_contrast * 255))


def _binarise(ink: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hysteresis: ink above half the threshold, kept where it connects to ink above the threshold.

    A thin or blurred pen stroke fades in the middle; the weak level keeps it in one piece.
    Returns the binary image, its label image and the stats rows per label (row 0 is the
    background). Dropped weak components keep their labels but get all-zero stats, so every
    later stage skips them as too small; the labels stay valid without a second labelling pass.
    """
    weak = cv2.threshold(ink, threshold // 2, 1, cv2.THRESH_BINARY)[1]  # 0/1: ink > threshold // 2
    labels, stats = _components(weak)
    keep = np.zeros(len(stats), bool)
    keep[labels[ink > threshold]] = True
    keep[0] = False
    if keep[1:].all():
        return weak, labels, stats
    dropped = np.flatnonzero(~keep[1:]) + 1
    if len(dropped) > _FEW_DROPPED:
        binary = keep.astype(np.uint8)[labels]
    else:
        # Usually a few faint specks: clear each in its own box, not the whole image through a table.
        binary = weak
        for i, (x, y, w, h) in zip(dropped.tolist(), stats[dropped, :4].tolist()):
            box = binary[y: y + h, x: x + w]
            box[labels[y: y + h, x: x + w] == i] = 0
    stats = stats.copy()
    stats[~keep] = 0
    return binary, labels, stats


_RIM_KERNEL = np.ones((3, 3), np.uint8)  # one pixel all round
_FEW_DROPPED = 64  # dropped weak components below which clearing them box by box is the cheaper way


def _printed_verticals(opened: np.ndarray, digit_height: float) -> np.ndarray:
    """The vertical runs of one component that are printed lines: those spanning its height (a
    rule, a comb's divider) or at its ends (a box's sides). A digit's stroke that touches a
    box's or a ruled line's edge also makes a long vertical run, inside the component: it is the
    digit's (an 8 cut there reads as a 1)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    h, w = opened.shape
    edge = 3 + 0.15 * digit_height
    printed = [i for i, (x, _y, pw, ph, _a) in enumerate(stats.tolist()) if i and
               (ph >= 0.9 * h or x <= edge or x + pw >= w - edge)]
    if len(printed) == n - 1:
        return opened
    keep = np.zeros(n, np.uint8)
    keep[printed] = 1
    return keep[labels]


# A box's sides are found with a vertical kernel this share of the box's height (the edges' rows
# and their blur take the rest).
ENCLOSURE_SIDE = 0.8
# Horizontal line ink within this share of a component's height from its top and from its
# bottom: the component is a box (or holds one) with both edges.
ENCLOSURE_EDGE_BAND = 0.15


def _top_and_bottom_edges(horizontal_lines: np.ndarray) -> bool:
    """Whether a component's horizontal lines (its box-sized mask) run along both its top and its bottom."""
    h = horizontal_lines.shape[0]
    band = max(1, int(math.ceil(ENCLOSURE_EDGE_BAND * h)))
    return h >= 3 and cv2.hasNonZero(horizontal_lines[:band]) and cv2.hasNonZero(horizontal_lines[h - band:])


def _remove_lines(binary: np.ndarray, stats: np.ndarray, digit_height: float,
                  ink: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove straight printed lines: horizontal ones longer than two digits, vertical ones taller than a digit.

    Only components at least that long can hold such a line, so the opening runs on their
    boxes alone. Returns (binary without lines, mask of the lines widened over their blurred
    edges: the crops leave it out). Given the grey ``ink`` image, a pen stroke along a line
    printed lighter than the pen stays the digit's (``_strokes_darker_than_the_line``).
    """
    removed = np.zeros(binary.shape, np.uint8)
    vertical = np.zeros(binary.shape, np.uint8)
    long_h = int(max(15, 2.2 * digit_height))
    long_v = int(max(15, 1.2 * digit_height))
    # Only components at least one line long need the opening (checked in bulk: most are short).
    candidates = np.flatnonzero((stats[:, 2] >= long_h) | (stats[:, 3] >= long_v))
    for x, y, w, h, _ in stats[candidates[candidates > 0]].tolist():
        enclosed = False
        for length, horizontal in ((long_h, True), (long_v, False)):
            if not horizontal and enclosed:
                # A box whose top and bottom edges were just found: its sides are as tall as the
                # box. Where the digits touch the box, box and digits are one component and the
                # digit height was taken from it, so a digit's 1.2 would be longer than the sides
                # and they stayed, to be read as a 1 at each end of the row.
                length = min(length, max(15, int(ENCLOSURE_SIDE * h)))
            if (w if horizontal else h) < length:
                continue
            roi = binary[y: y + h, x: x + w]
            size = (length, 1) if horizontal else (1, length)
            lines = cv2.morphologyEx(roi, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, size))
            if horizontal:
                enclosed = _top_and_bottom_edges(lines)
            else:
                lines = _printed_verticals(lines, digit_height)
                vertical[y: y + h, x: x + w] |= lines
            removed[y: y + h, x: x + w] |= lines
    if not cv2.hasNonZero(removed):
        return binary, removed
    # Widen the line mask by two pixels all round so its anti-aliased, noise-broken edges go too.
    widen = cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))
    widened = cv2.dilate(removed, widen)
    kept = cv2.subtract(binary, widened)
    # But a digit written on a horizontal line would lose those two pixels of its stroke: the foot
    # of a 2, the bottom of a 6's loop (read then as a 7 and a 1, confidently). Give back the
    # margin's ink that grows out of what is left, a pixel a step: the line's own edges, away
    # from any digit, stay removed. Not beside vertical lines: a stroke that one cut through
    # would come back as two thin strips.
    margin = cv2.bitwise_and(cv2.subtract(widened, cv2.bitwise_or(removed, cv2.dilate(vertical, widen))), binary)
    if cv2.hasNonZero(margin):
        for _ in range(2):
            kept = cv2.bitwise_or(kept, cv2.bitwise_and(cv2.dilate(kept, _RIM_KERNEL), margin))
    # The widened mask stays the line's for the crops (a restored pixel only keeps its stroke in
    # one piece): given back to the crops too, the line's edge next to a digit came with it. Only
    # pen ink darker than a lighter line leaves the mask, below.
    if ink is not None:
        kept, widened = _strokes_darker_than_the_line(ink, binary, removed, kept, widened)
    return kept, widened


# A printed line is taken for lighter than the handwriting over it when the writing's ink is at
# least this many times stronger than the line's own.
DARKER_THAN_THE_LINE = 1.35


def _strokes_darker_than_the_line(ink: np.ndarray, binary: np.ndarray, removed: np.ndarray,
                                  kept: np.ndarray, widened: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give back, to the digits and their crops, the ink on a printed line that is the pen's, not the line's.

    A 2's foot or a 6's loop written along the line lies in the line's own rows and went with
    it (the 2 then reads as a 7, the 6 as a 1). Where the line is printed lighter than the
    handwriting (a coloured or grey rule under a pen), the pen's ink there is the stronger: pixels
    of the line's mask above the midpoint of the two levels, joined to a digit's ink, are the
    digit's. Returns the kept ink with those pixels given back and the line mask without them.
    """
    if cv2.countNonZero(removed) < 20 or cv2.countNonZero(kept) < 20:
        return kept, widened
    # The line's upper quartile (its blurred edges are fainter, strokes along it stronger) against
    # the pen's; grey levels counted in place (np.percentile, bit for bit, without gathering them).
    line_level = _percentile_of_counts(cv2.calcHist([ink], [0], removed, [256], [0, 256]).ravel(), 75)
    pen_level = _percentile_of_counts(cv2.calcHist([ink], [0], kept, [256], [0, 256]).ravel(), 75)
    if pen_level < DARKER_THAN_THE_LINE * line_level:
        return kept, widened
    pen = (ink > 0.5 * (line_level + pen_level)) & widened.view(bool) & binary.view(bool)
    if not pen.any():
        return kept, widened
    # Only strokes that run on from a digit: a darker stretch of the line alone stays the line's.
    n, labels = cv2.connectedComponents(pen.view(np.uint8), connectivity=8)
    touching = np.zeros(n, bool)
    touching[labels[pen & (cv2.dilate(kept, _RIM_KERNEL) > 0)]] = True
    touching[0] = False
    if not touching.any():
        return kept, widened
    pen_u8 = touching.view(np.uint8)[labels]
    return cv2.bitwise_or(kept, pen_u8), cv2.subtract(widened, pen_u8)


def _projection_scores(ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Sharpness (sum of squared bin totals) of the ink's projection along a line at each angle."""
    tans = np.array([math.tan(math.radians(d)) for d in degrees], np.float32)
    shifted = np.multiply(tans[:, None], xs[None, :])
    np.subtract(ys[None, :], shifted, out=shifted)
    bins = shifted.astype(np.int32)
    bins -= bins.min(axis=1, keepdims=True)
    width = int(bins.max()) + 1
    # One bincount per angle over the same weights: sharing one bincount across the angles
    # needs the weights copied once per angle, which cost more than the calls it saved (real
    # bands: 1.02 -> 0.89 ms a frame in the whole skew search, the same angle on all 312).
    scores = np.empty(len(degrees))
    for k in range(len(degrees)):
        totals = np.bincount(bins[k], weights=weights, minlength=width)
        # Integer weights (ink levels) and at most a few thousand points: every total, square and
        # sum is an integer below 2**53, exact in float64 in any order, so a dot product will do.
        scores[k] = totals @ totals
    return scores


def _projection_angle(ink: np.ndarray, floor: float, max_degrees: float = 8.0) -> float:
    """Skew in degrees that makes the ink's horizontal projection sharpest (printed lines, text rows).

    Weighted by ink strength so faint printed lines, the surest cue, still count.
    Coarse to fine: 1 degree steps over the whole range on a sample of the ink, then 0.1
    degree steps on a denser one (a few thousand points give a sharp enough histogram).
    """
    # uint8 > a float floor is uint8 > its floor: what cv2.threshold tests, in raster order like np.nonzero.
    mask = cv2.threshold(ink, float(floor), 255, cv2.THRESH_BINARY)[1] if ink.size else ink
    points = cv2.findNonZero(mask) if ink.size else None
    if points is None or len(points) < 50:
        return 0.0
    points = points.reshape(-1, 2)[:: max(1, len(points) // SKEW_POINTS_FINE)]
    weights = ink[points[:, 1], points[:, 0]].astype(np.float64)
    xy = points.astype(np.float32)
    coarse = np.arange(-max_degrees, max_degrees + 0.01, 1.0)
    step = max(1, len(points) // SKEW_POINTS_COARSE)
    scores = _projection_scores(xy[::step, 1], xy[::step, 0], weights[::step], coarse)
    centre = float(coarse[int(np.argmax(scores))])
    fine = np.arange(centre - 0.6, centre + 0.61, 0.1)
    fine_scores = _projection_scores(xy[:, 1], xy[:, 0], weights, fine)
    return float(fine[int(np.argmax(fine_scores))])


# Ink points the skew search projects: every k-th in raster order, at most this many.
SKEW_POINTS_COARSE = 3000
SKEW_POINTS_FINE = 3000


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label image and stats rows (x, y, w, h, area) of the connected ink components."""
    # 16-bit labels make OpenCV's statistics pass several times faster; they are safe while
    # there are fewer ink pixels than labels (a speckled frame could hold more components).
    ltype = cv2.CV_16U if cv2.countNonZero(binary) < 65535 else cv2.CV_32S
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=ltype)
    return labels, stats[:n]


def _digit_sized(stats: np.ndarray, min_h: float, max_h: float) -> list[int]:
    """Labels whose size and shape could be one digit or a few touching digits."""
    w, h, area = stats[:, 2], stats[:, 3], stats[:, 4]  # int32: w * h of a frame's box cannot overflow it
    ok = (min_h <= h) & (h <= max_h)
    ok &= (w <= 8 * h) & (area >= 0.03 * w * h)  # else a long line or a hollow printed frame
    ok[0] = False  # the background
    return np.flatnonzero(ok).tolist()


def _estimate_height(stats: np.ndarray, sized: list[int]) -> float | None:
    """Median height of the digit-sized components (``sized``), biggest first; None when there are none."""
    if not sized:
        return None
    areas, heights = stats[sized, 4].tolist(), stats[sized, 3].tolist()
    biggest = sorted(range(len(sized)), key=lambda k: -areas[k])[:12]  # stable: ties stay in label order
    return _median([heights[k] for k in biggest])


def _drop_enclosures(stats: np.ndarray, labels: list[int]) -> list[int]:
    """Drop marks whose box contains two or more other marks: a printed frame, not a digit."""
    keep = []
    boxes = dict(zip(labels, stats[labels, :4].tolist()))
    centres = {j: (x + w / 2, y + h / 2) for j, (x, y, w, h) in boxes.items()}
    for i in labels:
        x, y, w, h = boxes[i]
        inside = 0
        for j in labels:
            if j == i:
                continue
            cx, cy = centres[j]
            if x < cx < x + w and y < cy < y + h:
                inside += 1
        if inside < 2:
            keep.append(i)
    return keep


def _find_row(stats: np.ndarray, labels: list[int]) -> list[int]:
    """The best horizontal chain of similar-height marks: the most members, then the most ink."""
    if not labels:
        return []
    order = sorted(labels, key=stats[:, 0].tolist().__getitem__)
    parent = {i: i for i in order}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = dict(zip(order, stats[order, :4].tolist()))
    for a_pos, a in enumerate(order):
        ax, ay, aw, ah = boxes[a]
        for b in order[a_pos + 1:]:
            bx, by, bw, bh = boxes[b]
            if bx - (ax + aw) > 1.5 * max(ah, bh):
                break  # sorted by x: everything further right is further away
            overlap = min(ay + ah, by + bh) - max(ay, by)
            if overlap < 0.4 * min(ah, bh) or max(ah, bh) > 2.2 * min(ah, bh):
                continue
            parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(root(i), []).append(i)
    # The most members, then the most ink: ink is summed only for the groups that tie on members.
    most = max(len(g) for g in groups.values())
    best = max((g for g in groups.values() if len(g) == most), key=lambda g: int(stats[g, 4].sum()))
    return sorted(best, key=lambda i: boxes[i][0])


def _segment(ink: np.ndarray, threshold: int, min_h: float, max_h: float,
             height_hint: float | None, measure_skew: bool = True, attach: bool = True) -> tuple[_Segmentation, float | None, float]:
    """Binarise, remove lines, label and choose the row; returns (segmentation, digit height, angle).

    The angle is 0.0 when ``measure_skew`` is off (the second pass, on an image already deskewed).
    """
    raw, labels, stats = _binarise(ink, threshold)
    sized = _digit_sized(stats, min_h, max_h)
    if height_hint is None:
        height_hint = _estimate_height(stats, sized)
    binary, lines = _remove_lines(raw, stats, height_hint if height_hint else max_h / 2, ink)
    # Without printed lines the components (and which are digit-sized) are the hysteresis ones.
    if binary is not raw:
        labels, stats = _components(binary)
        sized = _digit_sized(stats, min_h, max_h)
    candidates = _drop_enclosures(stats, sized)
    row = _find_row(stats, candidates)
    marks = [_Mark(x, y, w, h, (i,), area) for i, (x, y, w, h, area) in zip(row, stats[row].tolist())]
    if marks and attach:
        marks = _attach_fragments(marks, stats)
    # Skew from the ink before line removal: a printed line is the surest cue to the text's angle.
    angle = _skew(ink, 0.4 * threshold, stats, row) if measure_skew else 0.0
    return _Segmentation(marks, labels, binary, lines, stats, binary is not raw), height_hint, angle


def _skew(ink: np.ndarray, floor: float, stats: np.ndarray, row: list[int]) -> float:
    """The text line's angle from the projection of the ink in and around the row (lines included)."""
    if not row:
        return 0.0
    x0 = int(stats[row, 0].min())
    x1 = int((stats[row, 0] + stats[row, 2]).max())
    y0 = int(stats[row, 1].min())
    y1 = int((stats[row, 1] + stats[row, 3]).max())
    pad = int(0.6 * _median(stats[row, 3].tolist()))
    band = ink[max(0, y0 - pad): y1 + pad, max(0, x0 - pad): x1 + pad]
    return _projection_angle(band, floor)


def _union(a: _Mark, b: _Mark) -> _Mark:
    x0, y0 = min(a.x, b.x), min(a.y, b.y)
    x1, y1 = max(a.x1, b.x1), max(a.y1, b.y1)
    return _Mark(x0, y0, x1 - x0, y1 - y0, a.labels + b.labels, a.area + b.area)


def _x_overlap(a: _Mark, b: _Mark) -> int:
    return min(a.x1, b.x1) - max(a.x, b.x)


def _attach_fragments(marks: list[_Mark], stats: np.ndarray) -> list[_Mark]:
    """Add pieces of broken strokes in the row's band to the digit they sit above, below or inside."""
    med_h = _median([m.h for m in marks])
    top = min(m.y for m in marks) - 0.25 * med_h
    bottom = max(m.y1 for m in marks) + 0.25 * med_h
    left, right = marks[0].x - med_h, marks[-1].x1 + med_h
    in_row = {label for m in marks for label in m.labels}
    speck_area = max(4.0, (0.06 * med_h) ** 2)
    result = list(marks)
    sx, sy, sw, sh, sa = stats.T  # int32 columns: every sum and comparison here is exact in them
    near = (sa >= speck_area) & (sh <= 1.3 * med_h) & (sw <= 1.5 * med_h)
    near &= (sy >= top) & (sy + sh <= bottom) & (sx >= left) & (sx + sw <= right)
    near[0] = False  # the background
    for label in np.flatnonzero(near):
        if label in in_row:
            continue
        x, y, w, h, area = (int(v) for v in stats[label])
        piece = _Mark(x, y, w, h, (int(label),), area)
        best, best_overlap = None, 0
        for k, m in enumerate(result):
            ov = _x_overlap(m, piece)
            if ov > best_overlap:
                best, best_overlap = k, ov
        if best is not None and best_overlap >= 0.5 * w:
            result[best] = _union(result[best], piece)
    return result


def _merge_overlapping(marks: list[_Mark]) -> list[_Mark]:
    """Merge marks that share most of their columns: one digit written with a pen lift."""
    marks = sorted(marks, key=lambda m: m.x)
    merged: list[_Mark] = []
    for m in marks:
        if merged:
            prev = merged[-1]
            if _x_overlap(prev, m) >= 0.6 * min(prev.w, m.w):
                merged[-1] = _union(prev, m)
                continue
        merged.append(m)
    return merged


def _split_at_minima(mark: _Mark, pieces: int, binary: np.ndarray, repair: str = "split") -> list[_Mark]:
    """Cut a wide mark into ``pieces`` at the thinnest columns near the even cut positions."""
    x_from, x_to = mark.x_cut if mark.x_cut else (mark.x, mark.x1)
    profile = binary[mark.y: mark.y1, x_from:x_to].sum(axis=0).astype(np.float32)
    profile = np.convolve(profile, np.ones(3, np.float32) / 3, mode="same")
    width = x_to - x_from
    cuts = [0]
    for i in range(1, pieces):
        ideal = i * width / pieces
        lo = int(max(cuts[-1] + 2, ideal - 0.3 * width / pieces))
        hi = int(min(width - 2, ideal + 0.3 * width / pieces))
        cuts.append(int(lo + np.argmin(profile[lo:hi + 1])) if hi > lo else int(ideal))
    cuts.append(width)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a < 2:
            continue
        out.append(_Mark(x_from + a, mark.y, b - a, mark.h, mark.labels, mark.area,
                         (x_from + a, x_from + b), repair))
    return out


def _row_height(marks: list[_Mark]) -> float:
    """The writer's digit height: a high percentile, since MNIST 2s, 4s and 7s are often short."""
    return _percentile([m.h for m in marks], 80)


def _split_wide(marks: list[_Mark], seg: _Segmentation, expected: tuple[int, ...]) -> list[_Mark]:
    """Split marks far wider than a digit; then, if still short of a postcode, the widest ones."""
    if not marks:
        return marks
    row_h = _row_height(marks)
    binary = seg.binary
    out: list[_Mark] = []
    for m in marks:
        ref = max(m.h, row_h)
        if m.w > 1.25 * ref:
            pieces = _split_at_minima(m, max(2, int(round(m.w / (0.72 * ref)))), binary)
            out.extend(p for p in pieces if not _flat(p, seg, row_h))
        else:
            out.append(m)
    # Known postcode lengths: a mark too few usually means two digits touch.
    target = min((n for n in expected if n >= len(out)), default=None)
    while target is not None and len(out) < target:
        widest = max(range(len(out)), key=lambda i: out[i].w / max(out[i].h, row_h))
        if out[widest].w < 0.75 * max(out[widest].h, row_h):
            break
        out[widest: widest + 1] = _split_at_minima(out[widest], 2, binary, "split_to_count")
    return out


def _flat(piece: _Mark, seg: _Segmentation, row_h: float) -> bool:
    """A split piece whose ink spans too few rows for a digit: the end of a printed line too
    faint or too slanted to be removed, which made its digit's mark too wide. Read, it is a dash
    the classifier calls some digit, and the postcode a digit too long."""
    rows = np.flatnonzero(_mark_mask(piece, seg).any(axis=1))
    return len(rows) == 0 or rows[-1] - rows[0] + 1 < 0.45 * row_h


def _merge_surplus(marks: list[_Mark], expected: tuple[int, ...]) -> list[_Mark]:
    """With more marks than any postcode has, join neighbours that together are one digit's width."""
    marks = list(marks)
    if not marks:
        return marks
    row_h = _row_height(marks)
    while len(marks) > max(expected):
        best, best_cost = None, float("inf")
        for i in range(len(marks) - 1):
            a, b = marks[i], marks[i + 1]
            width = max(a.x1, b.x1) - min(a.x, b.x)
            if width > 0.95 * row_h:
                continue
            # Prefer pairs with a small gap whose union is narrow: a pen lift, not two digits.
            cost = (b.x - a.x1) / row_h + width / row_h
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        marks[best: best + 2] = [replace(_union(marks[best], marks[best + 1]), repair="merged")]
    return marks


def _recover_small(marks: list[_Mark], stats: np.ndarray, expected: tuple[int, ...]) -> list[_Mark]:
    """Short of a postcode, take back ink in the gaps of the row: a small digit, or one in pieces.

    A digit written small, or a 5 whose flag is a separate stroke, is no part of the row of
    similar heights; without this the row would be filled by splitting a whole digit in two.
    """
    target = min((n for n in expected if n > len(marks)), default=None)
    if not marks or target is None:
        return marks
    row_h = _row_height(marks)
    top, bottom = min(m.y for m in marks) - 0.2 * row_h, max(m.y1 for m in marks) + 0.2 * row_h
    left, right = marks[0].x - 1.2 * row_h, marks[-1].x1 + 1.2 * row_h
    used = {label for m in marks for label in m.labels}
    sx, sy, sw, sh, sa = stats.T  # int32 columns: every sum and comparison here is exact in them
    ok = (sa >= max(4.0, (0.06 * row_h) ** 2)) & (sh <= 1.1 * row_h) & (sw <= 1.2 * row_h)
    ok &= (sy >= top) & (sy + sh <= bottom) & (sx >= left) & (sx + sw <= right)
    ok[0] = False  # the background
    pieces = [_Mark(int(sx[i]), int(sy[i]), int(sw[i]), int(sh[i]), (int(i),), int(sa[i]))
              for i in np.flatnonzero(ok) if int(i) not in used]
    # Pieces in the gaps between (or beside) the marks, not under them.
    pieces = [p for p in pieces if all(_x_overlap(m, p) < 0.3 * p.w for m in marks)]
    groups: list[_Mark] = []
    for p in sorted(pieces, key=lambda p: p.x):
        if groups and p.x - groups[-1].x1 < 0.1 * row_h:
            groups[-1] = _union(groups[-1], p)
        else:
            groups.append(p)
    # Big enough to be a digit, not a speck or a stray fibre; the biggest first.
    found = [replace(g, repair="recovered") for g in groups
             if g.h >= 0.3 * row_h and g.w >= 0.2 * row_h and g.area >= 0.03 * row_h ** 2]
    found.sort(key=lambda g: -g.area)
    return sorted(marks + found[: target - len(marks)], key=lambda m: m.x)


def _drop_slivers(marks: list[_Mark]) -> list[_Mark]:
    """Drop marks too small or too thin for a digit: specks in the band, remnants of printed lines."""
    if not marks:
        return marks
    row_h = _row_height(marks)
    return [m for m in marks if m.h >= 0.45 * row_h and m.w >= max(3.0, 0.05 * row_h)
            and not (m.h > 1.3 * row_h and m.w < 0.12 * m.h)]


def _label_mask(region: np.ndarray, labels: tuple[int, ...] | list[int]) -> np.ndarray:
    """Boolean mask of the pixels of a label image ``region`` whose label is one of ``labels``."""
    mask = np.zeros(region.shape, bool)
    for label in labels:  # a handful at most: cheaper than np.isin's set machinery
        mask |= region == label
    return mask


def _mark_mask(mark: _Mark, seg: _Segmentation) -> np.ndarray:
    """Boolean mask (mark box sized) of the pixels that belong to this mark's components."""
    mask = _label_mask(seg.labels[mark.y: mark.y1, mark.x: mark.x1], mark.labels)
    if mark.x_cut:
        mask[:, : max(0, mark.x_cut[0] - mark.x)] = False
        mask[:, max(0, mark.x_cut[1] - mark.x):] = False
    return mask


def mnist_normalise(ink_crop: np.ndarray) -> np.ndarray:
    """A white-on-black digit crop to MNIST style: fit 20x20 keeping aspect, centre of mass at (14, 14)."""
    crop = np.asarray(ink_crop, np.float32)
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    if crop.ndim != 2 or crop.size == 0:
        return out
    x0, y0, w, h = cv2.boundingRect((crop > 0).view(np.uint8))
    if w == 0:
        return out
    crop = crop[y0: y0 + h, x0: x0 + w]
    scale = MNIST_BOX / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    # INTER_AREA averages when shrinking, which is the anti-aliasing MNIST's digits carry.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(crop, (nw, nh), interpolation=interp)
    lowest, peak = cv2.minMaxLoc(small)[:2]
    if peak <= 0:
        return out
    if lowest < 0:  # no ink below none (the reader's crops never go there; a caller's might)
        small = np.maximum(small, 0)
    # Scaled to 255 at the peak, rounded half to even and saturated: the same float32 product and
    # the same pixels as np.round(np.clip(small * (255 / peak), 0, 255)) in one OpenCV pass.
    pixels = cv2.convertScaleAbs(small, alpha=255.0 / peak)
    # Round first: the centre of mass is then that of the pixels written out, not of their floats
    # (integer moments, exact in double: the same quotients as summing the rows and columns).
    moments = cv2.moments(pixels)
    cy, cx = moments["m01"] / moments["m00"], moments["m10"] / moments["m00"]
    # Integer shift as MNIST did, to pixel (14, 14) where MNIST's centres of mass sit (measured:
    # 13.99 +/- 0.29); clamp so the digit stays inside the 28 px field.
    top = min(max(round(MNIST_CENTRE - cy), 0), MNIST_SIZE - nh)
    left = min(max(round(MNIST_CENTRE - cx), 0), MNIST_SIZE - nw)
    out[top: top + nh, left: left + nw] = pixels
    return out


def _digit_crop(mark: _Mark, seg: _Segmentation, ink: np.ndarray, threshold: int,
                mask: np.ndarray | None = None) -> np.ndarray:
    """The mark's ink (grey levels kept) with other marks masked out, contrast-stretched to 0..1.
    ``mask``: the mark's ``_mark_mask`` where the caller has it."""
    mask = _mark_mask(mark, seg) if mask is None else mask
    # Keep the anti-aliased rim just below the threshold, which binarisation cut off.
    rim = cv2.dilate(mask.view(np.uint8), _RIM_KERNEL).view(bool)
    if seg.has_lines:
        rim &= seg.lines[mark.y: mark.y1, mark.x: mark.x1] == 0  # not the printed line it touches
    return _stretched(ink[mark.y: mark.y1, mark.x: mark.x1], mask, rim, threshold)


# A mark whose ink peaks below this share of its row's (the median of the marks' peaks) is a
# digit written fainter than the rest: cut at the frame's threshold, its thin strokes fell under
# the weak level and only part of it was kept (an 8 half as dark as its row kept its right half
# and read as a 3).
FAINT_MARK_SHARE = 0.6


def _ink_peak(mark: _Mark, mask: np.ndarray, ink: np.ndarray) -> float:
    """The 75th percentile of the ink under a mark's own pixels (``mask``, its ``_mark_mask``)."""
    pixels = ink[mark.y: mark.y1, mark.x: mark.x1]
    counts = cv2.calcHist([pixels], [0], mask.view(np.uint8), [256], [0, 256]).ravel()
    return _percentile_of_counts(counts, 75) if counts.any() else 0.0


def _mark_thresholds(marks: list[_Mark], masks: list[np.ndarray], ink: np.ndarray, threshold: int,
                     lowest: int) -> list[int]:
    """Per mark (with its ``_mark_mask``), the threshold to cut it at: the frame's, or for a faint
    mark the frame's scaled by its ink against its row's (never below ``lowest``, the contrast
    that separates ink from paper grain)."""
    peaks = [_ink_peak(m, mask, ink) for m, mask in zip(marks, masks)]
    row_peak = _median(peaks)
    return [max(lowest, int(threshold * peak / row_peak))
            if row_peak > 0 and peak < FAINT_MARK_SHARE * row_peak and not m.x_cut else threshold
            for m, peak in zip(marks, peaks)]


def _faint_crop(index: int, marks: list[_Mark], seg: _Segmentation, ink: np.ndarray, threshold: int,
                to_ink: np.ndarray | None = None) -> np.ndarray:
    """A faint mark cut again at its own ``threshold``: the ink around it above that level's weak
    half, joined to the mark's own pixels, not another mark's or a printed line's. ``to_ink``
    given, the marks were found on the half-size band and the ink is the full-size image, as
    for ``_full_size_crop``."""
    mark = marks[index]
    row_h = _row_height(marks)
    height, width = seg.labels.shape
    # Its lost strokes lie beside and around what was kept, never past the next mark.
    left = marks[index - 1].x1 if index > 0 else 0
    right = marks[index + 1].x if index + 1 < len(marks) else width
    x0, x1 = max(left, mark.x - int(0.4 * row_h)), min(right, mark.x1 + int(0.4 * row_h))
    y0, y1 = max(0, mark.y - int(0.15 * row_h)), min(height, mark.y1 + int(0.15 * row_h))
    labels = seg.labels[y0:y1, x0:x1]
    own = _label_mask(labels, mark.labels).view(np.uint8)
    foreign = _label_mask(labels, [label for other in marks[:index] + marks[index + 1:]
                                   for label in other.labels]).view(np.uint8)
    if seg.has_lines:
        foreign |= seg.lines[y0:y1, x0:x1]
    if to_ink is None:
        pixels = ink[y0:y1, x0:x1]
    else:
        pixels = _full_size_pixels(ink, to_ink, x0, y0, x1 - x0, y1 - y0)
        size = (pixels.shape[1], pixels.shape[0])
        own = cv2.resize(own, size, interpolation=cv2.INTER_NEAREST)
        foreign = cv2.dilate(cv2.resize(foreign, size, interpolation=cv2.INTER_NEAREST), _RIM_KERNEL)
    own_ink = own.view(bool) & (pixels > threshold // 2)
    weak = ((pixels > threshold // 2) & (foreign == 0)) | own_ink
    _n, parts = cv2.connectedComponents(weak.view(np.uint8), connectivity=8)
    joined = np.unique(parts[own_ink])
    mask = np.isin(parts, joined[joined > 0])
    bx, by, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    if bw == 0:
        return np.zeros(pixels.shape, np.float32)
    mask, pixels = mask[by: by + bh, bx: bx + bw], pixels[by: by + bh, bx: bx + bw]
    rim = cv2.dilate(mask.view(np.uint8), _RIM_KERNEL).view(bool) & (foreign[by: by + bh, bx: bx + bw] == 0)
    return _stretched(pixels, mask, rim, threshold)


def _stretched(pixels: np.ndarray, mask: np.ndarray, rim: np.ndarray, threshold: int) -> np.ndarray:
    """A mark's ink inside its rim, contrast-stretched to 0..1 from its core (``mask``), strokes normalised."""
    inside = np.multiply(pixels, rim, dtype=np.uint8)
    if not inside.size:
        return np.zeros(pixels.shape, np.float32)
    # The core's grey levels (0 where a printed line took the pixel), counted in place rather
    # than gathered first.
    counts = cv2.calcHist([inside], [0], mask.view(np.uint8), [256], [0, 256]).ravel()
    peak = _percentile_of_counts(counts, 75) if counts.any() else 255.0
    floor = 0.5 * threshold
    if peak <= floor:
        return np.zeros(pixels.shape, np.float32)
    # MNIST came from bilevel scans: saturate the stroke core, keep only a soft edge. A grey
    # level's stretched value is the same float32 (level - floor) / (peak - floor), clipped,
    # wherever it occurs: computed once per level and looked up.
    stretch = np.arange(256, dtype=np.float32)
    np.subtract(stretch, floor, out=stretch)
    np.divide(stretch, peak - floor, out=stretch)
    np.maximum(stretch, 0.0, out=stretch)  # clipped to 0..1: two plain ufuncs cost less than np.clip
    np.minimum(stretch, 1.0, out=stretch)
    return _normalise_stroke(cv2.LUT(inside, stretch))


def _full_size_pixels(ink: np.ndarray, to_ink: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The full-size ink under the half-size band box (x, y, w, h): (2h, 2w) pixels."""
    x, y, w, h = 2 * x, 2 * y, 2 * w, 2 * h
    # Full-size band pixel q -> ink pixel A q + 2 t (the half-size map A q/2 + t, doubled); the
    # crop's pixel (u, v) is band pixel (x + u, y + v).
    (a, b, tx), (c, d, ty) = to_ink.tolist()
    region = np.array([[a, b, a * x + b * y + 2.0 * tx], [c, d, c * x + d * y + 2.0 * ty]])
    if region[0, 0] == 1.0 and region[1, 1] == 1.0 and region[0, 1] == 0.0 and region[1, 0] == 0.0 \
            and float(region[0, 2]).is_integer() and float(region[1, 2]).is_integer():
        ix, iy = int(region[0, 2]), int(region[1, 2])
        pixels = np.zeros((h, w), np.uint8)
        src = ink[max(0, iy): iy + h, max(0, ix): ix + w]
        pixels[max(0, -iy): max(0, -iy) + src.shape[0], max(0, -ix): max(0, -ix) + src.shape[1]] = src
        return pixels
    return cv2.warpAffine(ink, region, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _full_size_crop(mark: _Mark, seg: _Segmentation, ink: np.ndarray, to_ink: np.ndarray,
                    threshold: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``_digit_crop`` of a mark found on the half-size band, cut from the full-size ink image.

    ``to_ink`` maps half-size band pixels to full-size ink pixels. The mark's pixels are the
    full-size ink above the weak level within a pixel of its half-size mask: the grey levels
    and the stroke edges are the full-size ones, as when the band was read at full size.
    """
    w, h = 2 * mark.w, 2 * mark.h
    pixels = _full_size_pixels(ink, to_ink, mark.x, mark.y, mark.w, mark.h)
    own = _mark_mask(mark, seg) if mask is None else mask  # the caller's, where it has it
    near = cv2.dilate(cv2.resize(own.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST), _RIM_KERNEL)
    mask = (pixels > threshold // 2) & near.view(bool)
    # To the mark's own box, as a mark found at full size is cut: the box's edges bound the rim
    # and the stroke normalisation's erosion as they did there.
    bx, by, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    if bw == 0:
        return np.zeros((h, w), np.float32)
    mask, pixels = mask[by: by + bh, bx: bx + bw], pixels[by: by + bh, bx: bx + bw]
    rim = cv2.dilate(mask.view(np.uint8), _RIM_KERNEL).view(bool)
    if seg.has_lines:
        lines = cv2.resize(seg.lines[mark.y: mark.y1, mark.x: mark.x1], (w, h), interpolation=cv2.INTER_NEAREST)
        rim &= cv2.dilate(lines, _RIM_KERNEL)[by: by + bh, bx: bx + bw] == 0
    return _stretched(pixels, mask, rim, threshold)


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a binary mask in pixels: twice the area over the contour length."""
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return 2.0 * float(cv2.countNonZero(mask)) / perimeter if perimeter > 0 else 0.0


def _normalise_stroke(crop: np.ndarray) -> np.ndarray:
    """Erode a felt-tip's or dilate a fine pen's strokes into the range of MNIST's pens.

    A felt-tip fills the loops of 6, 8 and 9 and a fine pen fades when shrunk to 20 px; the
    model saw MNIST's pens only. Widths are relative to the digit's box, as MNIST's 20 px box is.
    """
    mask = (crop >= 0.5).view(np.uint8)  # 0/1 without a copy (cv2.compare takes a 1x1 crop for a scalar)
    _x, _y, w, h = cv2.boundingRect(mask)
    if w == 0:
        return crop
    box = max(w, h)
    relative = _stroke_width(mask) / box
    lo, hi = MNIST_STROKE_RANGE
    if relative > hi:
        radius, morph = int(round((relative - MNIST_STROKE_AIM[1]) * box / 2)), cv2.erode
    elif 0 < relative < lo:
        radius, morph = int(round((MNIST_STROKE_AIM[0] - relative) * box / 2)), cv2.dilate
    else:
        return crop
    if radius < 1:
        return crop
    return morph(crop, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))


def _prepare(image: object, config: ReaderConfig) -> tuple[np.ndarray | None, tuple[int, int], float, str]:
    """Validate, crop the ROI, convert to grey and downscale: (grey, ROI origin, scale, note)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3) or image.size == 0:
        return None, (0, 0), 1.0, f"not an image: shape {image.shape}"
    height, width = image.shape[:2]
    x, y, w, h = _clip_roi(config.roi, width, height)
    if w < 8 or h < 8:
        return None, (x, y), 1.0, f"region too small to hold digits: {w}x{h} px"
    grey = _to_grey(image[y: y + h, x: x + w])
    if grey is None:
        return None, (x, y), 1.0, f"not an image: shape {image.shape}"
    scale = min(1.0, config.max_side / max(w, h))
    if scale < 1.0:
        # Grey first, then shrink: the area average is the costly part, and on one channel it
        # costs a third of three (a 1920x1080 colour frame to 1280x720: 7.0 -> 3.5 ms in all).
        grey = cv2.resize(grey, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    return grey, (x, y), scale, ""


def _frame_box(mark: _Mark, inverse: np.ndarray | None, origin: tuple[int, int],
               scale: float) -> tuple[int, int, int, int]:
    """A mark's box in band pixels mapped back to frame pixels (undoing band, deskew, downscale and ROI)."""
    x0, x1 = (mark.x_cut if mark.x_cut else (mark.x, mark.x1))
    corners = [(float(x0), float(mark.y)), (float(x1), float(mark.y)), (float(x0), float(mark.y1)),
               (float(x1), float(mark.y1))]
    if inverse is not None:
        # Four corners through a 2x3 map in plain floats (a NumPy matrix product of this size
        # costs more to set up than to compute): each coordinate one product sum, then the shift.
        (a, b, tx), (c, d, ty) = inverse.tolist()
        corners = [(a * x + b * y + tx, c * x + d * y + ty) for x, y in corners]
    ox, oy = float(origin[0]), float(origin[1])
    xs = [x / scale + ox for x, _ in corners]
    ys = [y / scale + oy for _, y in corners]
    left, top = math.floor(min(xs)), math.floor(min(ys))
    return left, top, math.ceil(max(xs)) - left, math.ceil(max(ys)) - top


# The coarse search runs on a half-size copy of the ink image when the frame is at least this
# tall and wide; smaller frames are searched at full size (they are cheap anyway).
COARSE_MIN_SIDE = 240
# Around the row found at half size, the full-size band keeps room (in heights of the row's
# tallest mark) for everything the row's
# stages look at: broken strokes and small digits in the gaps and beside the row (1.2 row
# heights), a printed box or ruled line around it (0.4 heights), and the skew measure (0.6).
BAND_PAD_X = 1.4
BAND_PAD_Y = 0.8
BAND_PAD_PX = 4
# Rows at least this tall (full-size pixels) are read from the half-size copy the row was found
# on. The reader's crops end as 20 px MNIST boxes; above about 30 px a digit's crop loses
# nothing the classifier sees by being halved, and the band's binarising, labelling and
# cropping cost a quarter as much.
HALF_SIZE_ROW_PX = 64.0


@dataclass(frozen=True)
class _Band:
    """Where the postcode's row is, in working pixels: the band to read at full size."""

    x0: int
    y0: int
    x1: int
    y1: int
    row: tuple[int, int, int, int]  # the row's marks' box (x0, y0, x1, y1)
    row_height: float  # median height of the row's marks
    centre: tuple[float, float]  # centre of the row's marks' box: the deskew pivot


def _coarse_band(ink: np.ndarray, threshold: int, min_h: float, max_h: float) -> tuple[_Band, np.ndarray] | None:
    """Find the row on a half-size copy of the ink image: (its band in full-size pixels, the copy);
    None when the frame is small or has no row."""
    h, w = ink.shape
    if min(h, w) < COARSE_MIN_SIDE:
        return None
    hw, hh = w // 2, h // 2
    half = cv2.resize(ink, (hw, hh), interpolation=cv2.INTER_AREA)
    fx, fy = w / hw, h / hh
    seg, _, _ = _segment(half, threshold, min_h / fy, max_h / fy, None, measure_skew=False)
    if not seg.marks:
        return None
    x0, x1 = min(m.x for m in seg.marks) * fx, max(m.x1 for m in seg.marks) * fx
    y0, y1 = min(m.y for m in seg.marks) * fy, max(m.y1 for m in seg.marks) * fy
    row_h = _median([m.h for m in seg.marks]) * fy
    tall = max(m.h for m in seg.marks) * fy
    pad_x, pad_y = BAND_PAD_X * tall + BAND_PAD_PX, BAND_PAD_Y * tall + BAND_PAD_PX
    row = (int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1)))
    return _Band(max(0, int(x0 - pad_x)), max(0, int(y0 - pad_y)), min(w, int(math.ceil(x1 + pad_x))),
                 min(h, int(math.ceil(y1 + pad_y))), row, row_h, ((x0 + x1) / 2.0, (y0 + y1) / 2.0)), half


def _scaled_band(band: _Band, factor: float) -> _Band:
    """The same band in the pixels of a copy scaled by ``factor``."""
    def down(v: float) -> int:
        return int(v * factor)

    def up(v: float) -> int:
        return int(math.ceil(v * factor))

    return _Band(down(band.x0), down(band.y0), up(band.x1), up(band.y1),
                 (down(band.row[0]), down(band.row[1]), up(band.row[2]), up(band.row[3])),
                 band.row_height * factor, (band.centre[0] * factor, band.centre[1] * factor))


def _band_skew(ink: np.ndarray, threshold: int, band: _Band) -> float:
    """The row's angle from the projection of the ink in and around it, as ``_skew`` measures it."""
    x0, y0, x1, y1 = band.row
    pad = int(0.6 * band.row_height)
    return _projection_angle(ink[max(0, y0 - pad): y1 + pad, max(0, x0 - pad): x1 + pad], 0.4 * threshold)


def _rotated_band(ink: np.ndarray, forward: np.ndarray, band: _Band) -> np.ndarray:
    """The band of ``warpAffine(ink, forward)`` without rotating the rest of the frame.

    Only the source pixels the band's corners map back to (plus two for the bilinear
    neighbours) are read; outside the frame is 0, as when the whole frame is rotated.
    """
    h, w = ink.shape
    inverse = cv2.invertAffineTransform(forward)
    corners = np.array([[band.x0, band.y0], [band.x1, band.y0], [band.x0, band.y1], [band.x1, band.y1]],
                       np.float64) @ inverse[:, :2].T + inverse[:, 2]
    sx0, sy0 = (max(0, int(math.floor(v)) - 2) for v in corners.min(axis=0))
    sx1, sy1 = (min(limit, int(math.ceil(v)) + 3) for v, limit in zip(corners.max(axis=0), (w, h)))
    shift = forward.copy()
    shift[:, 2] = forward[:, :2] @ np.array([sx0, sy0], np.float64) + forward[:, 2] - (band.x0, band.y0)
    return cv2.warpAffine(ink[sy0:sy1, sx0:sx1], shift, (band.x1 - band.x0, band.y1 - band.y0),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _full_frame_row(ink: np.ndarray, threshold: int, min_h: float, max_h: float,
                    config: ReaderConfig) -> tuple[_Segmentation, np.ndarray, np.ndarray | None, float]:
    """The row found on the whole frame at full size: segment, deskew the frame, segment again.

    Returns (segmentation, the ink image it was cut from, the inverse rotation or None, angle).
    """
    seg, digit_h, angle = _segment(ink, threshold, min_h, max_h, None)
    inverse = None
    if seg.marks and config.deskew_min_degrees <= abs(angle) <= 20:
        xs = [m.x for m in seg.marks] + [m.x1 for m in seg.marks]
        ys = [m.y for m in seg.marks] + [m.y1 for m in seg.marks]
        centre = ((min(xs) + max(xs)) / 2.0, (min(ys) + max(ys)) / 2.0)
        forward = cv2.getRotationMatrix2D(centre, angle, 1.0)
        ink = cv2.warpAffine(ink, forward, (ink.shape[1], ink.shape[0]), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inverse = cv2.invertAffineTransform(forward)
        seg, _, _ = _segment(ink, threshold, min_h, max_h, digit_h, measure_skew=False)
    return seg, ink, inverse, angle


def _band_row(ink: np.ndarray, threshold: int, min_h: float, max_h: float, band: _Band,
              config: ReaderConfig) -> tuple[_Segmentation, np.ndarray, np.ndarray, float]:
    """The row cut from the band only: measure its skew, deskew the band, segment it once.

    Returns (segmentation in band pixels, the band's ink, the affine map from band pixels to
    ``ink``'s pixels, angle).
    """
    angle = _band_skew(ink, threshold, band)
    if config.deskew_min_degrees <= abs(angle) <= 20:
        forward = cv2.getRotationMatrix2D(band.centre, angle, 1.0)
        band_ink = _rotated_band(ink, forward, band)
        to_ink = cv2.invertAffineTransform(forward)
        to_ink[:, 2] += to_ink[:, :2] @ np.array([band.x0, band.y0], np.float64)
    else:
        angle = 0.0 if abs(angle) > 20 else angle
        band_ink = ink[band.y0: band.y1, band.x0: band.x1]
        to_ink = np.array([[1.0, 0.0, band.x0], [0.0, 1.0, band.y0]])
    seg, _, _ = _segment(band_ink, threshold, min_h, max_h, None, measure_skew=False)
    return seg, band_ink, to_ink, angle


def _cut_by_band_end(marks: list[_Mark], band: _Band, width: int) -> bool:
    """Whether a mark reaches an end of the band that is not the frame's: part of that digit
    lies beyond the band, and read as it is it would be another digit (a 0 cut to its left
    half reads as a confident 7)."""
    band_w = band.x1 - band.x0
    return any((m.x <= 0 < band.x0) or (m.x1 >= band_w and band.x1 < width) for m in marks)


def _row_marks(seg: _Segmentation) -> list[_Mark]:
    """The row's marks with overlapping pieces merged and slivers dropped: what the digits are cut from."""
    return _drop_slivers(_merge_overlapping(seg.marks))


def locate_digits(image: np.ndarray, config: ReaderConfig = ReaderConfig()) -> LocatedDigits:
    """Find the postcode's digits in a frame, left to right, as MNIST-style 28x28 crops.

    The row is looked for on a half-size copy; the band around it is deskewed and cut into
    digits at full size. When the band does not hold a whole postcode the whole frame is
    searched at full size, as a safety net.
    """
    grey, origin, scale, note = _prepare(image, config)
    if grey is None:
        return _empty(note)
    lowest, highest, _, _ = cv2.minMaxLoc(grey)
    if highest - lowest < 24:
        return _empty("blank frame: no ink darker or lighter than the paper")
    frame_h = image.shape[0] * scale  # digit sizes are fractions of the full frame's height
    min_h = max(6.0, config.min_digit_height * frame_h)
    max_h = max(min_h + 1, config.max_digit_height * frame_h)

    # The paper estimate works on a ~120 px tall copy, so its kernel spans ~8% of the frame.
    small_factor = max(1, int(round(min(grey.shape) / 120)))
    small = _shrunk(grey, small_factor)
    inverted = _polarity_is_light_on_dark(small)
    # Dark ink: the small copy is the paper's; light ink: shrink the inverted frame (exactly what
    # the paper estimate was tuned on, not the inverted small copy, which rounds differently).
    paper_grey, paper_small = (cv2.bitwise_not(grey), None) if inverted else (grey, small)
    ink = _ink_image(paper_grey, small_factor, paper_small)
    threshold = _threshold(ink, config.min_contrast)

    coarse = _coarse_band(ink, threshold, min_h, max_h)
    shortest = min(config.expected_lengths)  # fewer marks: the band did not hold the whole row
    seg = None
    from_half = None
    if coarse is not None:
        band, half = coarse
        # A tall row is read from the half-size copy: its digits are still at least
        # HALF_SIZE_ROW_PX / 2 tall, above the 20 px box they are shrunk to in the end.
        halves = half.shape[0] * 2 == ink.shape[0] and half.shape[1] * 2 == ink.shape[1]
        source, factor = (half, 0.5) if halves and band.row_height >= HALF_SIZE_ROW_PX else (ink, 1.0)
        band = _scaled_band(band, factor) if source is half else band
        seg, work, inverse, angle = _band_row(source, threshold, min_h * factor, max_h * factor, band, config)
        marks = _row_marks(seg)
        if (len(marks) < shortest or _cut_by_band_end(marks, band, source.shape[1])) \
                and (band.x0 > 0 or band.x1 < source.shape[1]):
            # Mostly a digit beyond the band's ends (a wide gap at half size), or one the band's
            # end cut in two (a digit merged with a printed line at half size, so the row was
            # found without it): the band's rows across the whole width first, a third of the
            # full-frame search's cost.
            band = replace(band, x0=0, x1=source.shape[1])
            seg, work, inverse, angle = _band_row(source, threshold, min_h * factor, max_h * factor, band, config)
            marks = _row_marks(seg)
        if len(marks) < shortest:
            seg = None  # the band missed part of the postcode: look at the whole frame
        elif source is half:
            from_half = inverse  # half-size band pixels -> half-size ink pixels
            inverse = 2.0 * inverse
    if seg is None:
        seg, work, inverse, angle = _full_frame_row(ink, threshold, min_h, max_h, config)
        marks = _row_marks(seg)
    if not seg.marks:
        return _empty("no row of digit-sized marks found", inverted)

    marks = _merge_surplus(marks, config.expected_lengths)
    marks = _recover_small(marks, seg.stats, config.expected_lengths)
    marks = _split_wide(marks, seg, config.expected_lengths)
    if len(marks) > config.max_digits:
        return _empty(f"{len(marks)} marks in a row: too many for a postcode", inverted)
    if not marks:  # every mark was a sliver of a printed line or a speck
        return _empty("no digit-sized marks left after removing slivers", inverted)

    # A digit written much fainter than its row is cut again at a threshold of its own.
    masks = [_mark_mask(m, seg) for m in marks]  # once a mark: for its ink level and its crop
    cut_at = _mark_thresholds(marks, masks, work, threshold, int(config.min_contrast * 255))
    if from_half is not None:  # marks found at half size, digits cut at full size
        digits = np.stack([mnist_normalise(_full_size_crop(m, seg, ink, from_half, threshold, mask) if t == threshold
                                           else _faint_crop(k, marks, seg, ink, t, from_half))
                           for k, (m, mask, t) in enumerate(zip(marks, masks, cut_at))])
    else:
        digits = np.stack([mnist_normalise(_digit_crop(m, seg, work, threshold, mask) if t == threshold
                                           else _faint_crop(k, marks, seg, work, t))
                           for k, (m, mask, t) in enumerate(zip(marks, masks, cut_at))])
    boxes = tuple(_frame_box(m, inverse, origin, scale) for m in marks)
    log.debug("located %d digits (inverted=%s, angle=%.1f)", len(marks), inverted, angle)
    return LocatedDigits(digits, boxes, inverted, "", tuple(m.repair for m in marks), scale,
                         _left_behind(marks, seg))


def _left_behind(marks: list[_Mark], seg: _Segmentation) -> tuple[float, ...]:
    """Per mark, the ink beside it that no mark took (pixels, as a share of the mark's own)."""
    row_h = _row_height(marks)
    top, bottom = min(m.y for m in marks), max(m.y1 for m in marks)
    taken = np.zeros(len(seg.stats), bool)
    for m in marks:
        taken[list(m.labels)] = True
    width = seg.binary.shape[1]
    spans = [(max(0, int(m.x - 0.6 * row_h)), min(width, int(m.x1 + 0.6 * row_h))) for m in marks]
    # One pass over the row's band, then each mark's span from running column counts: the same
    # counts as a pass per mark, without gathering the overlapping spans' labels again and again.
    lo, hi = min(x0 for x0, _ in spans), max(x1 for _, x1 in spans)
    stray = (seg.binary[top:bottom, lo:hi] > 0) & ~taken[seg.labels[top:bottom, lo:hi]]
    per_column = cv2.reduce(stray.view(np.uint8), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    running = np.concatenate(([0], np.cumsum(per_column)))
    return tuple(float(running[x1 - lo] - running[x0 - lo]) / max(1, m.area)
                 for m, (x0, x1) in zip(marks, spans))
