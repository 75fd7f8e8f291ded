"""Reliability diagrams as PNG, drawn with OpenCV (already a site dependency; no plotting library)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from quantize.calibration import ReliabilityBin

PANEL = 420  # plot area side in pixels
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM, GAP = 70, 85, 70, 60
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (170, 170, 170)
BAR, GAP_COLOUR = (180, 110, 40), (60, 60, 220)  # BGR: blue bars, red over/under-confidence gap
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.5,
          colour: tuple[int, int, int] = BLACK) -> None:
    cv2.putText(image, text, origin, FONT, scale, colour, 1, cv2.LINE_AA)


def _panel(image: np.ndarray, left: int, bins: list[ReliabilityBin], title: str) -> None:
    top, bottom, right = MARGIN_TOP, MARGIN_TOP + PANEL, left + PANEL

    def x(v: float) -> int:
        return int(round(left + v * PANEL))

    def y(v: float) -> int:
        return int(round(bottom - v * PANEL))

    for tick in np.linspace(0, 1, 6):
        cv2.line(image, (x(tick), bottom), (x(tick), bottom + 5), BLACK, 1)
        cv2.line(image, (left - 5, y(tick)), (left, y(tick)), BLACK, 1)
        _text(image, f"{tick:.1f}", (x(tick) - 12, bottom + 22), 0.45)
        _text(image, f"{tick:.1f}", (left - 40, y(tick) + 5), 0.45)
    total = max(sum(b.count for b in bins), 1)
    for b in bins:
        if not b.count:
            continue
        cv2.rectangle(image, (x(b.low) + 1, y(b.accuracy)), (x(b.high) - 1, bottom), BAR, -1)
        # The gap between what the model claimed (mean confidence) and what it scored.
        lo, hi = sorted((b.accuracy, b.mean_confidence))
        if hi - lo > 1e-3:
            cv2.rectangle(image, (x(b.low) + 1, y(hi)), (x(b.high) - 1, y(lo)), GAP_COLOUR, 2)
        share = b.count / total
        label = f"{share:.0%}" if share >= 0.01 else (f"{b.count}")
        _text(image, label, (x(b.low) + 1, max(y(max(b.accuracy, b.mean_confidence)) - 6, top + 12)), 0.33)
    for i in range(0, PANEL, 12):  # the diagonal of perfect calibration, dashed
        cv2.line(image, (left + i, bottom - i), (left + min(i + 6, PANEL), bottom - min(i + 6, PANEL)), GREY, 1)
    cv2.rectangle(image, (left, top), (right, bottom), BLACK, 1)
    _text(image, title, (left, top - 12), 0.55)
    _text(image, "confidence (top-class probability)", (left + 70, bottom + 48), 0.5)


def draw_reliability_diagram(before: list[ReliabilityBin], after: list[ReliabilityBin], title: str,
                             before_title: str, after_title: str, path: Path) -> None:
    """Two reliability diagrams side by side (T = 1 and fitted T) saved as one PNG."""
    width = MARGIN_LEFT + PANEL + GAP + MARGIN_LEFT + PANEL + 30
    height = MARGIN_TOP + PANEL + MARGIN_BOTTOM
    image = np.full((height, width, 3), 255, np.uint8)
    _text(image, title, (MARGIN_LEFT, 28), 0.65)
    _text(image, "bars: accuracy per bin; red boxes: gap to the bin's mean confidence; labels: share "
                 "(or count) of digits; dashed: perfect calibration", (MARGIN_LEFT, 48), 0.4, (90, 90, 90))
    _panel(image, MARGIN_LEFT, before, before_title)
    _panel(image, MARGIN_LEFT + PANEL + GAP + MARGIN_LEFT, after, after_title)
    # Vertical axis label, written sideways.
    label = np.full((22, PANEL), 255, np.uint8)
    cv2.putText(label, "accuracy in bin", (PANEL // 2 - 70, 16), FONT, 0.5, 0, 1, cv2.LINE_AA)
    rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    image[MARGIN_TOP:MARGIN_TOP + PANEL, 2:24] = np.minimum(image[MARGIN_TOP:MARGIN_TOP + PANEL, 2:24],
                                                          rotated[..., None])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {path}")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: empty bins are written as null."""
    return None if value is None or math.isnan(value) else value
