"""Model and data observability: what the model sees and says, and whether it has drifted.

Pure core (numpy and OpenCV on values; no threads, clocks, files or sockets): the agent
feeds every read in with a monotonic time, puts ``DriftMonitor.snapshot()`` in its health
event and publishes a retained ``drift`` message when ``DriftReport.kinds`` changes.

Why the population stability index (PSI)
----------------------------------------
PSI = sum over bins of (o - e) * ln(o / e), for the observed and expected proportions.
It is the symmetric Kullback-Leibler divergence, so it does not matter which side is
"reference"; it works the same on the 10 digit classes and on fixed-edge histograms
(confidence); it needs no sample-size tables; and, unlike chi-square, it does not grow with
the number of reads, so one alarm level means the same at 100 reads as at 10,000. The
levels are the common credit-risk convention: below 0.1 no shift, 0.1 to 0.25 a moderate
shift ("watch"), 0.25 and above a significant shift ("act"); ``psi_alarm`` defaults to 0.25.

Limitation: on a small window PSI is noisy (a few hundred digits spread over 10 classes or
20 bins leave sampling noise of a few hundredths, more per position), so nothing is judged
until the window holds ``min_reads`` reads that saw a frame and the reference is complete.

Empty bins: ln(o / e) is infinite when a bin is empty on one side (a digit never seen in
the reference). Both sides are normalised, every proportion is raised to at least
``epsilon`` (1e-4) and the result renormalised, so a class never seen gives a large but
finite PSI (about 0.69 for a class that makes up 10% of the window).

Drift is judged against the site's own reference (its first reads after a model change),
not against the training set: a real office's digit mix is never uniform (its postcodes
share their first digits). PSI against the training distribution is reported for context
and never raises an alarm.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edge_agent.config import ObservabilityConfig
from edge_agent.types import PostcodeRead

log = logging.getLogger(__name__)

CLASSES = 10
# Postcodes are five digits: per-position counts keep positions 0..4 (left to right); the
# digits of a longer read beyond the fifth count in the overall distribution only.
POSITIONS = 5
# The same edges as the bundle manifest's baselines.test_confidence_histogram, so the two compare.
CONFIDENCE_EDGES: tuple[float, ...] = tuple(round(i * 0.05, 2) for i in range(21))
CONFIDENCE_BINS = len(CONFIDENCE_EDGES) - 1
DIGITS_PER_FRAME_BINS = 9  # 0..7 digits, and the last bin for 8 or more
PSI_EPSILON = 1e-4
# Frames wider than this are downscaled before the Laplacian: the sharpness figure then costs
# about the same on any camera, and is compared only with the same camera's reference.
QUALITY_MAX_WIDTH = 320
INVERTED_RISE_ALARM = 0.3  # share of inverted frames above the reference's by more than this
# Hysteresis: a raised alarm clears only once its figure is back past its level by a margin
# (PSI below 0.8 x level, inverted rise at or below 0.8 x level, sharpness ratio at or above
# level / 0.8, at most 1), so a figure hovering at the level does not flap the retained message.
CLEAR_FACTOR = 0.8
SNAPSHOT_DECIMALS = 6


def population_stability_index(expected: Sequence[float], observed: Sequence[float],
                               epsilon: float = PSI_EPSILON) -> float:
    """PSI between two distributions over the same bins (counts or proportions); NaN if either is empty."""
    e = np.asarray(expected, dtype=float).ravel()
    o = np.asarray(observed, dtype=float).ravel()
    if e.shape != o.shape or e.size == 0:
        raise ValueError(f"PSI needs two distributions over the same bins, got {e.size} and {o.size} bins")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(o)) and e.min() >= 0 and o.min() >= 0):
        raise ValueError("PSI needs finite, non-negative counts or proportions")
    if not 0 < epsilon < 1 / e.size:
        raise ValueError(f"epsilon must be above 0 and below 1/{e.size}, got {epsilon}")
    if e.sum() <= 0 or o.sum() <= 0:
        return math.nan  # an empty window: nothing to judge
    p, q = _floored(e, epsilon), _floored(o, epsilon)
    # Each term is >= 0 (o - e and ln(o / e) share their sign), so the sum is too.
    return float(np.sum((q - p) * np.log(q / p)))


def _floored(counts: np.ndarray, epsilon: float) -> np.ndarray:
    """Proportions with every bin raised to at least epsilon, renormalised to sum to 1."""
    p = np.maximum(counts / counts.sum(), epsilon)
    return p / p.sum()


@dataclass(frozen=True)
class InputQuality:
    """What one camera frame looked like: cheap figures that move when the camera or light does."""

    brightness: float  # mean grey level, 0-255
    contrast: float  # standard deviation of the grey levels
    sharpness: float  # variance of the Laplacian, on the frame downscaled to at most 320 px wide
    inverted: bool  # light ink on a dark background (the reader's finding, passed in)


def input_quality(image: np.ndarray, inverted: bool) -> InputQuality:
    """Brightness, contrast and sharpness of a BGR, BGRA or grey frame; zeros for an empty one."""
    grey = _grey(image)
    if grey is None:
        return InputQuality(0.0, 0.0, 0.0, bool(inverted))
    mean, std = cv2.meanStdDev(grey)
    height, width = grey.shape
    if width > QUALITY_MAX_WIDTH:
        size = (QUALITY_MAX_WIDTH, max(1, round(height * QUALITY_MAX_WIDTH / width)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)  # averages: no aliasing noise
    # Variance of the Laplacian, the same to the last bits as np.var of a float64 Laplacian but
    # 1.8x faster: an int16 result (enough for 8-bit frames) and OpenCV's one-pass moments.
    depth = cv2.CV_16S if grey.dtype == np.uint8 else cv2.CV_64F
    _, laplacian_std = cv2.meanStdDev(cv2.Laplacian(grey, depth))
    sharpness = float(laplacian_std[0, 0]) ** 2
    return InputQuality(float(mean[0, 0]), float(std[0, 0]), sharpness, bool(inverted))


def _grey(image: np.ndarray) -> np.ndarray | None:
    """The frame as one contiguous grey channel, or None when there is nothing to measure."""
    image = np.asarray(image)
    if image.size == 0 or image.ndim not in (2, 3):
        return None
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)  # what OpenCV takes; uint8 (0-255) is what cameras give
    image = np.ascontiguousarray(image)  # OpenCV refuses some numpy views (negative strides)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    if channels == 1:
        return np.ascontiguousarray(image[:, :, 0])
    return np.ascontiguousarray(image.mean(axis=2, dtype=np.float32))


@dataclass(frozen=True)
class ObservedRead:
    """One read as observability sees it: what the model predicted and what the frame looked like."""

    digits: tuple[int, ...]  # predicted digits, left to right; empty when nothing was found
    confidences: tuple[float, ...]  # one per digit
    accepted: bool
    reason: str | None  # why it went to review (a Reason value); None when accepted
    quality: InputQuality | None  # None when there was no frame
    # Median height of the read's digits in the pixels the reader worked on (None without
    # digits): a camera too far from the envelopes shows small digits, which are read far less
    # surely (docs/OPERATIONS.md).
    digit_height_px: float | None = None

    def __post_init__(self) -> None:
        if len(self.digits) != len(self.confidences):
            raise ValueError(f"{len(self.digits)} digits but {len(self.confidences)} confidences")
        if any(not 0 <= d < CLASSES for d in self.digits):
            raise ValueError(f"digits must be 0..9, got {self.digits}")

    @property
    def saw_frame(self) -> bool:
        """A frame was looked at (reads answered late or with no frame never were)."""
        return self.quality is not None or bool(self.digits)

    @classmethod
    def from_postcode_read(cls, read: PostcodeRead, quality: InputQuality | None,
                           digit_heights_px: Sequence[float] = ()) -> ObservedRead:
        """The observability view of a decided read (``digit_heights_px``: its digits' heights as
        the reader saw them)."""
        return cls(digits=tuple(d.digit for d in read.digits),
                   confidences=tuple(d.confidence for d in read.digits),
                   accepted=read.accepted,
                   reason=read.reason.value if read.reason is not None else None,
                   quality=quality,
                   # statistics.median: np.median's value, without its ~30 us of
                   # array set-up on every envelope the store thread records.
                   digit_height_px=float(statistics.median(digit_heights_px)) if len(digit_heights_px) else None)


def confidence_bin(confidence: float) -> int:
    """The CONFIDENCE_EDGES bin of a confidence: [a, b) like numpy.histogram, the last bin closed."""
    if not confidence >= 0:  # NaN too
        return 0
    return min(max(bisect_right(CONFIDENCE_EDGES, confidence) - 1, 0), CONFIDENCE_BINS - 1)


class ReadAggregates:
    """Counts and sums over a set of reads; reads can be added and removed (the window slides)."""

    def __init__(self) -> None:
        self.reads = 0
        self.frames = 0  # reads that saw a frame
        self.accepted = 0
        self.reviews_by_reason: Counter[str] = Counter()
        self.digit_counts = np.zeros(CLASSES, np.int64)
        self.position_counts = np.zeros((POSITIONS, CLASSES), np.int64)
        self.confidence_counts = np.zeros(CONFIDENCE_BINS, np.int64)  # over digits
        self.digits_per_frame = np.zeros(DIGITS_PER_FRAME_BINS, np.int64)  # over reads that saw a frame
        self.digits_total = 0
        self.measured = 0  # reads with an InputQuality
        self.brightness_sum = 0.0
        self.contrast_sum = 0.0
        self.sharpness_sum = 0.0
        self.inverted = 0
        self.sized = 0  # reads with a digit height
        self.digit_height_sum = 0.0

    def add(self, read: ObservedRead) -> None:
        """Count one read in."""
        self._apply(read, 1)

    def remove(self, read: ObservedRead) -> None:
        """Count one read, added earlier, out again."""
        self._apply(read, -1)

    def _apply(self, read: ObservedRead, sign: int) -> None:
        self.reads += sign
        if read.accepted:
            self.accepted += sign
        else:
            reason = read.reason or "unknown"
            self.reviews_by_reason[reason] += sign
            if self.reviews_by_reason[reason] <= 0:
                del self.reviews_by_reason[reason]
        if read.saw_frame:
            self.frames += sign
            self.digits_per_frame[min(len(read.digits), DIGITS_PER_FRAME_BINS - 1)] += sign
            self.digits_total += sign * len(read.digits)
        for position, (digit, confidence) in enumerate(zip(read.digits, read.confidences)):
            self.digit_counts[digit] += sign
            if position < POSITIONS:
                self.position_counts[position, digit] += sign
            self.confidence_counts[confidence_bin(confidence)] += sign
        q = read.quality
        if q is not None:
            self.measured += sign
            self.brightness_sum += sign * q.brightness
            self.contrast_sum += sign * q.contrast
            self.sharpness_sum += sign * q.sharpness
            self.inverted += sign * int(q.inverted)
            if self.measured == 0:  # subtracting floats leaves crumbs; an empty set has none
                self.brightness_sum = self.contrast_sum = self.sharpness_sum = 0.0
        if read.digit_height_px is not None:
            self.sized += sign
            self.digit_height_sum += sign * read.digit_height_px
            if self.sized == 0:
                self.digit_height_sum = 0.0

    @property
    def review_rate(self) -> float | None:
        return (self.reads - self.accepted) / self.reads if self.reads else None

    def digit_distribution(self) -> np.ndarray | None:
        """Proportions of the predicted digits 0..9, or None without digits."""
        return _proportions(self.digit_counts)

    def position_distributions(self) -> list[np.ndarray | None]:
        """Proportions of the predicted digits at each position 0..4, None where there were none."""
        return [_proportions(row) for row in self.position_counts]

    @property
    def mean_digit_height(self) -> float | None:
        """Mean over reads of their digits' median height as the reader saw them, or None without digits."""
        return self.digit_height_sum / self.sized if self.sized > 0 else None

    def mean_quality(self) -> dict[str, float | None]:
        """Mean brightness, contrast and sharpness and the inverted share over measured frames."""
        n = self.measured
        if n <= 0:
            return {"brightness": None, "contrast": None, "sharpness": None, "inverted_share": None}
        return {"brightness": self.brightness_sum / n, "contrast": self.contrast_sum / n,
                "sharpness": self.sharpness_sum / n, "inverted_share": self.inverted / n}

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (plain numbers and lists, None for what cannot be computed)."""
        rate = self.review_rate
        return {
            "reads": self.reads,
            "frames": self.frames,
            "accepted": self.accepted,
            "review_rate": _num(rate),
            "review_rate_by_reason": {reason: _num(count / self.reads)
                                      for reason, count in sorted(self.reviews_by_reason.items())},
            "digits": int(self.digit_counts.sum()),
            "digit_distribution": _list(self.digit_distribution()),
            "digit_distribution_by_position": [_list(p) for p in self.position_distributions()],
            "confidence_histogram": {"edges": list(CONFIDENCE_EDGES),
                                     "counts": self.confidence_counts.tolist()},
            "digits_per_frame": {"counts": self.digits_per_frame.tolist(),
                                 "mean": _num(self.digits_total / self.frames if self.frames else None)},
            "quality": {"measured": self.measured,
                        **{key: _num(value) for key, value in self.mean_quality().items()}},
            "digit_height_px": _num(self.mean_digit_height),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild these aggregates (for a persisted reference)."""
        return {"reads": self.reads, "frames": self.frames, "accepted": self.accepted,
                "reviews_by_reason": dict(self.reviews_by_reason),
                "digit_counts": self.digit_counts.tolist(),
                "position_counts": self.position_counts.tolist(),
                "confidence_counts": self.confidence_counts.tolist(),
                "digits_per_frame": self.digits_per_frame.tolist(),
                "digits_total": self.digits_total, "measured": self.measured,
                "brightness_sum": self.brightness_sum, "contrast_sum": self.contrast_sum,
                "sharpness_sum": self.sharpness_sum, "inverted": self.inverted,
                "sized": self.sized, "digit_height_sum": self.digit_height_sum}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadAggregates:
        """Aggregates from ``to_dict()``; ValueError if the data is not that."""
        a = cls()
        try:
            for name in ("reads", "frames", "accepted", "digits_total", "measured", "inverted"):
                setattr(a, name, int(data[name]))
            for name in ("brightness_sum", "contrast_sum", "sharpness_sum"):
                setattr(a, name, float(data[name]))
            # References saved before digit heights were kept have none: they start at zero.
            a.sized, a.digit_height_sum = int(data.get("sized", 0)), float(data.get("digit_height_sum", 0.0))
            a.reviews_by_reason = Counter({str(k): int(v) for k, v in data["reviews_by_reason"].items()})
            for name, shape in (("digit_counts", (CLASSES,)), ("position_counts", (POSITIONS, CLASSES)),
                                ("confidence_counts", (CONFIDENCE_BINS,)),
                                ("digits_per_frame", (DIGITS_PER_FRAME_BINS,))):
                array = np.asarray(data[name], dtype=np.int64)
                if array.shape != shape:
                    raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
                setattr(a, name, array)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a read aggregate: {exc!r}") from None
        return a


def _proportions(counts: np.ndarray) -> np.ndarray | None:
    total = counts.sum()
    return counts / total if total > 0 else None


def _num(value: float | None, decimals: int = SNAPSHOT_DECIMALS) -> float | None:
    """A JSON-safe number: None for missing, NaN or infinite."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), decimals)


def _list(values: np.ndarray | Sequence[float] | None) -> list[float | None] | None:
    return None if values is None else [_num(v) for v in values]


class ReadWindow:
    """The last ``window_reads`` reads no older than ``window_s`` seconds (monotonic times)."""

    def __init__(self, window_reads: int, window_s: float) -> None:
        self.window_reads = window_reads
        self.window_s = window_s
        self.aggregates = ReadAggregates()
        self._reads: deque[tuple[float, ObservedRead]] = deque()

    def __len__(self) -> int:
        return len(self._reads)

    def add(self, read: ObservedRead, now: float) -> None:
        """Take in one read made at monotonic time ``now``; the oldest fall out."""
        self._reads.append((now, read))
        self.aggregates.add(read)
        self.prune(now)

    def prune(self, now: float) -> None:
        """Drop reads beyond the count or older than window_s."""
        while len(self._reads) > self.window_reads or (self._reads and now - self._reads[0][0] > self.window_s):
            self.aggregates.remove(self._reads.popleft()[1])

    def clear(self) -> None:
        """Forget every read."""
        self._reads.clear()
        self.aggregates = ReadAggregates()

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-ready figures over the reads in the window at ``now``."""
        self.prune(now)
        span = now - self._reads[0][0] if self._reads else None
        return {"window_reads": self.window_reads, "window_s": self.window_s, "span_s": _num(span, 3),
                **self.aggregates.summary()}


class Reference:
    """The site's reference: the first ``target`` reads that saw a frame after a model change, then frozen."""

    FORMAT = 1

    def __init__(self, model_version: str, target: int, aggregates: ReadAggregates | None = None) -> None:
        self.model_version = model_version
        self.target = target
        self.aggregates = aggregates if aggregates is not None else ReadAggregates()

    @property
    def count(self) -> int:
        return self.aggregates.frames

    @property
    def complete(self) -> bool:
        return self.count >= self.target

    def add(self, read: ObservedRead) -> bool:
        """Take the read in while filling; True if it was taken."""
        # A reference taken while the camera was down would hold nothing to compare with.
        if self.complete or not read.saw_frame:
            return False
        self.aggregates.add(read)
        return True

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the reference."""
        return {"model_version": self.model_version, "target": self.target, "complete": self.complete,
                **self.aggregates.summary()}

    def to_json(self) -> str:
        """The reference as a JSON document, to persist per model version."""
        return json.dumps({"format": self.FORMAT, "model_version": self.model_version, "target": self.target,
                           "aggregates": self.aggregates.to_dict()}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Reference:
        """A reference from ``to_json()``; ValueError if the text is not one (start a new reference then)."""
        try:
            data = json.loads(text)
            if data.get("format") != cls.FORMAT:
                raise ValueError(f"unknown reference format {data.get('format')!r}")
            return cls(str(data["model_version"]), int(data["target"]),
                       ReadAggregates.from_dict(data["aggregates"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a saved reference: {exc!r}") from None


@dataclass(frozen=True)
class TrainingBaseline:
    """What the bundle says the model saw in training: for context only, never for alarms."""

    class_distribution: tuple[float, ...] | None  # proportions of digits 0..9
    confidence_counts: tuple[int, ...] | None  # test-set confidences over CONFIDENCE_EDGES

    @classmethod
    def from_manifest(cls, raw_manifest: Mapping[str, Any]) -> TrainingBaseline:
        """Read ``baselines`` from a bundle manifest; what is missing or malformed is None."""
        baselines = raw_manifest.get("baselines")
        if not isinstance(baselines, Mapping):
            return cls(None, None)
        return cls(_class_distribution(baselines.get("training_class_distribution")),
                   _confidence_counts(baselines.get("test_confidence_histogram")))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for the snapshot."""
        histogram = None
        if self.confidence_counts is not None:
            histogram = {"edges": list(CONFIDENCE_EDGES), "counts": list(self.confidence_counts)}
        return {"class_distribution": _list(self.class_distribution), "confidence_histogram": histogram}


def _class_distribution(raw: Any) -> tuple[float, ...] | None:
    if not isinstance(raw, Mapping):
        return None
    try:
        values = np.array([float(raw.get(str(k), 0.0)) for k in range(CLASSES)])
    except (TypeError, ValueError):
        values = np.array([math.nan])
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.sum() <= 0:
        log.warning("bundle manifest: baselines.training_class_distribution is malformed; ignored")
        return None
    return tuple(float(v) for v in values / values.sum())


def _confidence_counts(raw: Any) -> tuple[int, ...] | None:
    if not isinstance(raw, Mapping):
        return None
    edges, counts = raw.get("edges"), raw.get("counts")
    try:
        same_edges = len(edges) == len(CONFIDENCE_EDGES) and np.allclose(edges, CONFIDENCE_EDGES)
        values = [int(c) for c in counts]
    except (TypeError, ValueError):
        same_edges, values = False, []
    if not same_edges or len(values) != CONFIDENCE_BINS or min(values) < 0:
        # Rebinning another histogram would invent counts: comparing it is left out instead.
        log.warning("bundle manifest: baselines.test_confidence_histogram is not over the edges "
                    "0, 0.05, ..., 1; ignored")
        return None
    return tuple(values)


@dataclass(frozen=True)
class Alarm:
    """A drift alarm raised now: which figure crossed which level, and what to do about it."""

    kind: str  # prediction_drift, confidence_drift, blurred_frames, inverted_frames, small_digits
    figure: str  # the name of the figure in DriftReport.figures
    value: float
    level: float
    message: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "figure": self.figure, "value": _num(self.value),
                "level": _num(self.level), "message": self.message}


@dataclass(frozen=True)
class DriftReport:
    """Drift figures of the window against the reference, and the alarms raised now."""

    judged: bool  # the reference is complete and the window holds at least min_reads reads with a frame
    alarms: tuple[Alarm, ...]
    figures: Mapping[str, float | None]  # None where a figure cannot be computed (never NaN)
    levels: Mapping[str, float] = field(default_factory=dict)  # alarm level per figure name

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of the alarms raised now: publish the drift message when this changes."""
        return tuple(alarm.kind for alarm in self.alarms)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (no NaN), as it goes into the health event and the drift message."""
        return {"judged": self.judged,
                "figures": {name: _num(value) for name, value in self.figures.items()},
                "alarms": [alarm.to_json() for alarm in self.alarms],
                "levels": dict(self.levels)}


class DriftMonitor:
    """The window, the site's reference and the alarms: what the agent feeds and asks."""

    def __init__(self, config: ObservabilityConfig, training: TrainingBaseline | None = None,
                 model_version: str = "") -> None:
        self.config = config
        self.training = training
        self.window = ReadWindow(config.window_reads, config.window_s)
        self.reference = Reference(model_version, config.reference_reads)
        self._active: dict[str, Alarm] = {}

    @property
    def model_version(self) -> str:
        return self.reference.model_version

    @property
    def alarms(self) -> tuple[Alarm, ...]:
        """The alarms raised at the last assessment."""
        return tuple(self._active.values())

    def observe(self, read: ObservedRead, now: float) -> None:
        """Take in one read made at monotonic time ``now``."""
        self.window.add(read, now)
        self.reference.add(read)

    def reset_reference(self, model_version: str) -> None:
        """A new model runs: start a new reference and window, and drop the alarms."""
        # Reads of the old model say nothing about the new one.
        self.reference = Reference(model_version, self.config.reference_reads)
        self.window.clear()
        self._active = {}

    def restore_reference(self, reference: Reference) -> None:
        """Use a reference saved for the running model (after a restart); it fills up to reference_reads."""
        if reference.model_version != self.model_version:
            raise ValueError(f"the saved reference is for model {reference.model_version!r}, "
                             f"the agent runs {self.model_version!r}")
        self.reference = Reference(reference.model_version, self.config.reference_reads, reference.aggregates)

    def levels(self) -> dict[str, float]:
        """The alarm level of each figure that can raise an alarm."""
        levels = {"prediction_psi": self.config.psi_alarm, "confidence_psi": self.config.psi_alarm,
                  "sharpness_ratio": self.config.blur_alarm, "inverted_share_change": INVERTED_RISE_ALARM}
        if self.config.min_digit_height_px > 0:
            levels["digit_height_px"] = self.config.min_digit_height_px
        return levels

    def assess(self, now: float) -> DriftReport:
        """Drift figures and alarms at ``now`` (prunes the window; remembers alarms for hysteresis)."""
        self.window.prune(now)
        win = self.window.aggregates
        enough = win.frames >= self.config.min_reads
        judged = enough and self.reference.complete
        figures = _reference_figures(win, self.reference.aggregates if judged else None)
        figures |= _training_figures(win if enough else None, self.training)
        # The digits' size is judged against a fixed level, not the reference: a camera set up
        # too far away from the first day has a reference of small digits too.
        figures["digit_height_px"] = win.mean_digit_height if enough else None
        active = self._alarms(figures) if judged else {}
        small = self._small_digits(figures["digit_height_px"])
        self._active = active | ({small.kind: small} if small is not None else {})
        return DriftReport(judged, self.alarms, figures, self.levels())

    def _small_digits(self, height: float | None) -> Alarm | None:
        level = self.config.min_digit_height_px
        if height is None or level <= 0:
            return None
        if not _raised(height, level, above=False, strict=False, was_raised="small_digits" in self._active,
                       clear_cap=None):
            return None
        return Alarm("small_digits", "digit_height_px", height, level,
                     f"digits are {height:.0f} px tall on average (alarm below {level:.0f} px): small digits "
                     "are read far less surely; frame the camera closer to the postcode field "
                     "(docs/OPERATIONS.md, framing the camera)")

    def _alarms(self, figures: Mapping[str, float | None]) -> dict[str, Alarm]:
        psi, blur = self.config.psi_alarm, self.config.blur_alarm
        rules = (  # kind, figure, level, raised above the level (else below), message
            ("prediction_drift", "prediction_psi", psi, True,
             "predicted digits differ from this site's reference (PSI {value:.2f}, alarm at {level:.2f}): "
             "the mail mix, the camera view or the reader has changed; look at recent review crops"),
            ("confidence_drift", "confidence_psi", psi, True,
             "the model's confidence differs from this site's reference (PSI {value:.2f}, alarm at "
             "{level:.2f}): check focus, lighting and the review rate"),
            ("blurred_frames", "sharpness_ratio", blur, False,
             "frames are blurred: mean sharpness is {value:.0%} of the reference's (alarm below "
             "{level:.0%}): clean the lens or refocus the camera"),
            ("inverted_frames", "inverted_share_change", INVERTED_RISE_ALARM, True,
             "the share of frames with light ink on a dark background is {value:.0%} points above the "
             "reference's (alarm above {level:.0%}): check the lighting and the envelopes"),
        )
        active = {}
        for kind, figure, level, above, message in rules:
            value = figures.get(figure)
            if value is not None and _raised(value, level, above, strict=kind == "inverted_frames",
                                             was_raised=kind in self._active):
                active[kind] = Alarm(kind, figure, value, level, message.format(value=value, level=level))
        return active

    def snapshot(self, now: float) -> dict[str, Any]:
        """Window, reference, training baseline, drift figures and alarms at ``now``; JSON-ready, no NaN."""
        report = self.assess(now)
        return {"model_version": self.model_version,
                "window": self.window.snapshot(now),
                "reference": self.reference.summary(),
                "training": self.training.to_json() if self.training is not None else None,
                "drift": report.to_json()}


def _raised(value: float, level: float, above: bool, strict: bool, was_raised: bool,
            clear_cap: float | None = 1.0) -> bool:
    """Whether an alarm stands: crossing ``level`` raises it, coming back past the clear level ends it.

    ``clear_cap`` bounds a low alarm's clear level (a ratio never needs to pass 1); None for a
    figure with no such bound (a height in pixels)."""
    if above:
        if was_raised:
            return value > level * CLEAR_FACTOR if strict else value >= level * CLEAR_FACTOR
        return value > level if strict else value >= level
    if was_raised:
        clear = level / CLEAR_FACTOR
        return value < (clear if clear_cap is None else min(clear_cap, clear))
    return value < level


def _psi_or_none(expected: Sequence[float] | np.ndarray | None,
                 observed: Sequence[float] | np.ndarray | None, smooth: bool = True) -> float | None:
    if expected is None or observed is None:
        return None
    e, o = np.asarray(expected, dtype=float), np.asarray(observed, dtype=float)
    if e.sum() <= 0 or o.sum() <= 0:
        return None
    # The monitor compares counts: half a count in every bin (Jeffreys) keeps a bin that a small
    # reference never saw from weighing ln(share / epsilon) on a handful of window reads; with
    # the hundreds of reads a site's window holds it moves PSI by little.
    half = 0.5 if smooth else 0.0  # not for the training distribution: proportions, not counts
    value = population_stability_index(e + half, o + half)
    return None if math.isnan(value) else value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _reference_figures(win: ReadAggregates, ref: ReadAggregates | None) -> dict[str, float | None]:
    """Window against reference; every figure None when there is nothing to judge against."""
    names = ["prediction_psi", *(f"prediction_psi_position_{i}" for i in range(POSITIONS)),
             "confidence_psi", "sharpness_ratio", "brightness_ratio", "contrast_ratio",
             "inverted_share_change"]
    if ref is None:
        return dict.fromkeys(names)
    figures: dict[str, float | None] = {"prediction_psi": _psi_or_none(ref.digit_counts, win.digit_counts)}
    for i in range(POSITIONS):
        figures[f"prediction_psi_position_{i}"] = _psi_or_none(ref.position_counts[i], win.position_counts[i])
    figures["confidence_psi"] = _psi_or_none(ref.confidence_counts, win.confidence_counts)
    w, r = win.mean_quality(), ref.mean_quality()
    for key in ("sharpness", "brightness", "contrast"):
        figures[f"{key}_ratio"] = _ratio(w[key], r[key])
    w_inv, r_inv = w["inverted_share"], r["inverted_share"]
    figures["inverted_share_change"] = None if w_inv is None or r_inv is None else w_inv - r_inv
    return figures


def _training_figures(win: ReadAggregates | None, training: TrainingBaseline | None) -> dict[str, float | None]:
    """Window against the bundle's training and test baselines: context for people, never alarms."""
    if win is None or training is None:
        return {"prediction_psi_vs_training": None, "confidence_psi_vs_test": None}
    return {"prediction_psi_vs_training": _psi_or_none(training.class_distribution, win.digit_counts, smooth=False),
            "confidence_psi_vs_test": _psi_or_none(training.confidence_counts, win.confidence_counts, smooth=False)}
