"""Render realistic camera frames of a handwritten postcode field from MNIST digits.

Used by the demo camera, the reader's tests and the accuracy benchmark, so that
the OpenCV reader is exercised on what a sorting-office camera sees: coloured or
brown paper, blue or black ink, uneven light, a slightly rotated envelope, a
printed box or ruled line, defocus, sensor noise and JPEG compression.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from edge_agent.mnist import DigitSet

log = logging.getLogger(__name__)

DEMO_ASSET = "demo_digits.npz"

# BGR colours. Paper shades vary per frame around these; ink is a pen, not a printer.
PAPER_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (242, 244, 245),
    "cream": (205, 232, 245),
    "brown": (112, 158, 196),  # kraft envelope
    "pink": (212, 198, 250),
    "blue": (245, 222, 196),
    "yellow": (150, 232, 250),
    "green": (196, 238, 204),
}
DARK_PAPER_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (38, 36, 40),
    "navy": (92, 44, 24),
    "darkgreen": (50, 82, 36),
    "slate": (82, 74, 66),
}
INK_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (34, 32, 36),
    "blue": (150, 56, 28),
}
LIGHT_INK_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 236),
    "silver": (205, 205, 200),
    "yellow": (110, 225, 245),
}
PRINT_COLOURS: tuple[tuple[int, int, int], ...] = ((60, 60, 60), (40, 90, 215), (150, 110, 60))


@dataclass(frozen=True)
class FrameConditions:
    """How one frame is rendered; the defaults are a clean, well-lit, upright envelope."""

    paper: str = "white"  # a key of PAPER_COLOURS, or of DARK_PAPER_COLOURS when inverted
    ink: str = "black"  # a key of INK_COLOURS, or of LIGHT_INK_COLOURS when inverted
    inverted: bool = False  # light ink on dark paper
    digit_height: float = 60.0  # px, before per-digit jitter
    scale_jitter: float = 0.08  # relative per-digit size change
    baseline_jitter: float = 0.05  # per-digit vertical offset, fraction of digit height
    gap: tuple[float, float] = (0.15, 0.4)  # space between digits, fraction of digit height
    stroke: int = 0  # px at render scale: >0 thicker pen (dilate), <0 thinner (erode)
    field: str = "none"  # "none", "box" (printed rectangle around the field) or "ruled" (baseline)
    rotation: float = 0.0  # degrees, whole frame
    illumination: float = 0.0  # 0..1, strength of the light gradient and vignette
    blur: float = 0.6  # Gaussian sigma in px (defocus)
    noise: float = 2.0  # sensor noise sigma in grey levels
    jpeg_quality: int = 92  # 0 disables re-encoding
    specks: int = 0  # dust and fibre dots scattered over the frame
    exposure: float = 1.0  # overall brightness gain


def random_conditions(rng: np.random.Generator, **overrides: Any) -> FrameConditions:
    """Draw varied but readable conditions; keyword arguments pin any field."""
    inverted = bool(rng.random() < 0.15)
    if inverted:
        paper = str(rng.choice(list(DARK_PAPER_COLOURS)))
        ink = str(rng.choice(list(LIGHT_INK_COLOURS)))
    else:
        paper = str(rng.choice(list(PAPER_COLOURS), p=[0.35, 0.15, 0.2, 0.075, 0.075, 0.075, 0.075]))
        ink = str(rng.choice(list(INK_COLOURS)))
    values: dict[str, Any] = dict(
        paper=paper,
        ink=ink,
        inverted=inverted,
        digit_height=float(rng.uniform(40, 90)),
        scale_jitter=float(rng.uniform(0.0, 0.12)),
        baseline_jitter=float(rng.uniform(0.0, 0.08)),
        gap=(float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.25, 0.5))),
        stroke=int(rng.choice([-2, -1, 0, 0, 0, 1, 2, 3])),
        field=str(rng.choice(["none", "box", "ruled"], p=[0.5, 0.25, 0.25])),
        rotation=float(rng.uniform(-5, 5)) if rng.random() < 0.6 else 0.0,
        illumination=float(rng.uniform(0.0, 0.6)) if rng.random() < 0.6 else 0.0,
        blur=float(rng.uniform(0.0, 2.0)),
        noise=float(rng.uniform(0.0, 8.0)),
        jpeg_quality=int(rng.integers(35, 96)) if rng.random() < 0.8 else 0,
        specks=int(rng.integers(0, 30)) if rng.random() < 0.4 else 0,
        exposure=float(rng.uniform(0.75, 1.1)),
    )
    values.update(overrides)
    return FrameConditions(**values)


def _digit_ink(image: np.ndarray, height: float, stroke: int) -> np.ndarray:
    """One MNIST digit as a crisp pen-ink coverage mask (float32 0..1) cropped to its ink."""
    scale = height / 20.0  # MNIST fits digits into a 20 px box, so 20 px of the 28 is the digit
    size = max(3, int(round(28 * scale)))
    mask = cv2.resize(image.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_CUBIC)
    # Upscaled MNIST strokes are soft ramps; real ink has a sharp edge a few px wide.
    mask = np.clip((mask - 0.3) / 0.35, 0.0, 1.0)
    # A thinner pen than MNIST's would vanish on small digits: erode at most 1 px per 40 px of height.
    stroke = max(stroke, -int(height // 40))
    if stroke:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(stroke) + 1,) * 2)
        mask = cv2.dilate(mask, kernel) if stroke > 0 else cv2.erode(mask, kernel)
    ys, xs = np.nonzero(mask > 0.05)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32)
    return mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def _paper(shape: tuple[int, int], colour: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Paper of one shade with faint low-frequency texture, float32 BGR."""
    h, w = shape
    shade = np.array(colour, np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    texture = cv2.resize(rng.normal(0, 1, (max(2, h // 16), max(2, w // 16))).astype(np.float32), (w, h))
    paper = np.empty((h, w, 3), np.float32)
    paper[:] = shade
    return paper + texture[..., None] * rng.uniform(1.0, 4.0)


def _layout(masks: list[np.ndarray], cond: FrameConditions, size: tuple[int, int],
            rng: np.random.Generator) -> tuple[list[tuple[int, int]], tuple[int, int, int, int]]:
    """Top-left corner of each digit and the field's bounding box (x, y, w, h)."""
    gaps = rng.uniform(cond.gap[0], cond.gap[1], max(0, len(masks) - 1)) * cond.digit_height
    total_w = int(sum(m.shape[1] for m in masks) + gaps.sum())
    max_h = max(m.shape[0] for m in masks)
    width, height = size
    margin = int(0.6 * cond.digit_height)
    x0 = int(rng.integers(margin, max(margin + 1, width - total_w - margin)))
    y0 = int(rng.integers(margin, max(margin + 1, height - max_h - margin)))
    baseline = y0 + max_h
    corners = []
    x = x0
    for i, mask in enumerate(masks):
        jitter = rng.normal(0, cond.baseline_jitter) * cond.digit_height
        corners.append((x, int(round(baseline - mask.shape[0] + jitter))))
        x += mask.shape[1] + (int(gaps[i]) if i < len(gaps) else 0)
    return corners, (x0, y0, total_w, max_h)


def _stamp(ink: np.ndarray, mask: np.ndarray, corner: tuple[int, int]) -> None:
    """Max-composite one digit's ink into the frame's ink layer, clipped at the edges."""
    x, y = corner
    h, w = mask.shape
    fx0, fy0 = max(0, x), max(0, y)
    fx1, fy1 = min(ink.shape[1], x + w), min(ink.shape[0], y + h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    region = mask[fy0 - y: fy1 - y, fx0 - x: fx1 - x]
    np.maximum(ink[fy0:fy1, fx0:fx1], region, out=ink[fy0:fy1, fx0:fx1])


def _print_field(printed: np.ndarray, field: str, box: tuple[int, int, int, int], digit_h: float,
                 rng: np.random.Generator) -> None:
    """Draw the printed box or ruled line that envelopes and forms put around a postcode."""
    x, y, w, h = box
    thickness = int(rng.integers(1, 4))
    if field == "box":
        pad_x = int(rng.uniform(0.2, 0.5) * digit_h)
        pad_y = int(rng.uniform(0.15, 0.4) * digit_h)
        cv2.rectangle(printed, (x - pad_x, y - pad_y), (x + w + pad_x, y + h + pad_y), 1.0, thickness,
                      cv2.LINE_AA)
    elif field == "ruled":
        below = int(rng.uniform(0.02, 0.15) * digit_h)
        extra = int(rng.uniform(0.3, 1.0) * digit_h)
        yy = y + h + below
        cv2.line(printed, (x - extra, yy), (x + w + extra, yy), 1.0, thickness, cv2.LINE_AA)


def _illumination(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A lamp off to one side: a linear gradient plus vignetting, gain in (0, 1]."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5)) + 0.5
    radius = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
    gain = 1.0 - strength * (0.75 * np.clip(ramp, 0, 1) + 0.25 * radius)
    return gain.astype(np.float32)


def render_postcode_frame(digit_images: list[np.ndarray] | np.ndarray, rng: np.random.Generator,
                          size: tuple[int, int] = (640, 480), **conditions: Any) -> np.ndarray:
    """A BGR uint8 camera frame (width, height = size) showing the digits as a handwritten postcode."""
    cond = FrameConditions(**conditions)
    width, height = size
    heights = [cond.digit_height * (1 + rng.uniform(-cond.scale_jitter, cond.scale_jitter))
               for _ in digit_images]
    masks = [_digit_ink(np.asarray(img, np.uint8), h, cond.stroke) for img, h in zip(digit_images, heights)]
    corners, field_box = _layout(masks, cond, size, rng)

    ink = np.zeros((height, width), np.float32)
    for mask, corner in zip(masks, corners):
        _stamp(ink, mask, corner)
    printed = np.zeros((height, width), np.float32)
    if cond.field != "none":
        _print_field(printed, cond.field, field_box, cond.digit_height, rng)
    for _ in range(cond.specks):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(ink, centre, int(rng.integers(1, 3)), float(rng.uniform(0.4, 1.0)), -1, cv2.LINE_AA)

    if cond.inverted:
        paper_colour = DARK_PAPER_COLOURS.get(cond.paper, DARK_PAPER_COLOURS["black"])
        ink_colour = LIGHT_INK_COLOURS.get(cond.ink, LIGHT_INK_COLOURS["white"])
        print_colour = (175, 175, 175)
    else:
        paper_colour = PAPER_COLOURS.get(cond.paper, PAPER_COLOURS["white"])
        ink_colour = INK_COLOURS.get(cond.ink, INK_COLOURS["black"])
        print_colour = PRINT_COLOURS[int(rng.integers(0, len(PRINT_COLOURS)))]
    frame = _paper((height, width), paper_colour, rng)
    opacity = rng.uniform(0.85, 1.0)  # ballpoint ink is not perfectly opaque
    for layer, colour, alpha in ((printed, print_colour, 1.0), (ink, ink_colour, opacity)):
        a = (layer * alpha)[..., None]
        frame = frame * (1 - a) + np.array(colour, np.float32) * a

    if cond.rotation:
        centre = (field_box[0] + field_box[2] / 2, field_box[1] + field_box[3] / 2)
        matrix = cv2.getRotationMatrix2D(centre, cond.rotation, 1.0)
        frame = cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
    frame = frame * cond.exposure
    if cond.illumination > 0:
        frame = frame * _illumination((height, width), cond.illumination, rng)[..., None]
    if cond.blur > 0.05:
        frame = cv2.GaussianBlur(frame, (0, 0), cond.blur)
    if cond.noise > 0:
        frame = frame + rng.normal(0, cond.noise, frame.shape).astype(np.float32)
    out = np.clip(frame, 0, 255).astype(np.uint8)
    if cond.jpeg_quality:
        ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(cond.jpeg_quality)])
        if ok:
            out = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return out


class RenderedPostcode(NamedTuple):
    """One rendered frame with its truth: the postcode, the conditions and the source digits."""

    frame: np.ndarray
    postcode: str
    conditions: FrameConditions
    digit_indices: np.ndarray  # rows of the DigitSet the digits came from, left to right


def fit_digit_height(cond: FrameConditions, n_digits: int, size: tuple[int, int]) -> FrameConditions:
    """Shrink the digits when a long postcode would not fit across the frame."""
    # A digit's ink is at most about 0.9 of its height wide, plus the largest gap.
    per_digit = 0.9 + cond.gap[1]
    limit = min(0.8 * size[0] / (n_digits * per_digit), 0.45 * size[1])
    if cond.digit_height <= limit:
        return cond
    return dataclasses.replace(cond, digit_height=float(limit))


def render_postcode_samples(digits: DigitSet, n_frames: int, rng: np.random.Generator,
                            length: int | tuple[int, ...] = 5, size: tuple[int, int] = (640, 480),
                            vary: bool = True, **conditions: Any) -> list[RenderedPostcode]:
    """Frames of random postcodes drawn from ``digits``, with their truth.

    With ``vary`` every frame gets freshly drawn conditions (keyword arguments pin
    fields); without it every frame uses exactly the given conditions.
    """
    lengths = (length,) if isinstance(length, int) else tuple(length)
    out: list[RenderedPostcode] = []
    for _ in range(n_frames):
        n = int(rng.choice(lengths))
        picks = rng.integers(0, len(digits), n)
        cond = random_conditions(rng, **conditions) if vary else FrameConditions(**conditions)
        cond = fit_digit_height(cond, n, size)
        frame = render_postcode_frame(list(digits.images[picks]), rng, size, **dataclasses.asdict(cond))
        postcode = "".join(str(int(d)) for d in digits.labels[picks])
        out.append(RenderedPostcode(frame, postcode, cond, picks))
    return out


def render_postcode_dataset(digits: DigitSet, n_frames: int, rng: np.random.Generator,
                            length: int | tuple[int, ...] = 5, size: tuple[int, int] = (640, 480),
                            vary: bool = True, **conditions: Any) -> list[tuple[np.ndarray, str]]:
    """(frame, postcode) pairs of random postcodes drawn from ``digits`` (see render_postcode_samples)."""
    return [(s.frame, s.postcode) for s in
            render_postcode_samples(digits, n_frames, rng, length, size, vary, **conditions)]


def load_demo_digits() -> DigitSet:
    """The 300 bundled MNIST training digits (30 per class) for the demo camera."""
    # A path beside the module: assets/ is plain data, not a package to import.
    with np.load(Path(__file__).resolve().parent / "assets" / DEMO_ASSET) as data:
        return DigitSet(data["images"].astype(np.uint8), data["labels"].astype(np.uint8))
