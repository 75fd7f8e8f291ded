"""Bar charts drawn with OpenCV (the test venv has no matplotlib, and the benchmark adds no dependency)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

# BGR, distinguishable in print and for the common colour-vision deficiencies (Okabe-Ito).
PALETTE = ((120, 120, 120), (0, 114, 230), (178, 114, 0), (0, 158, 230), (167, 121, 204), (115, 158, 0))
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def grouped_bars(series: dict[str, list[float]], categories: list[str], path: Path, title: str,
                 y_label: str, size: tuple[int, int] = (1000, 520)) -> Path:
    """One group of bars per category, one bar per series, with a legend; written as PNG."""
    width, height = size
    left, right, top, bottom = 70, 20, 60, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
    peak = max((max(v) for v in series.values() if len(v)), default=1.0) or 1.0
    step = _nice_step(peak * 1.1)
    y_max = step * math.ceil(peak * 1.1 / step)
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(value: float) -> int:
        return int(round(top + plot_h - value / y_max * plot_h))

    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        cv2.line(canvas, (left, y), (width - right, y), (225, 225, 225), 1)
        label = f"{tick:g}"
        (tw, th), _ = cv2.getTextSize(label, FONT, 0.45, 1)
        cv2.putText(canvas, label, (left - 8 - tw, y + th // 2), FONT, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
        tick += step
    cv2.line(canvas, (left, top + plot_h), (width - right, top + plot_h), (0, 0, 0), 1)
    group_w = plot_w / len(categories)
    bar_w = group_w * 0.8 / len(series)
    for c, category in enumerate(categories):
        x0 = left + c * group_w + group_w * 0.1
        for s, (_name, values) in enumerate(series.items()):
            x = int(round(x0 + s * bar_w))
            cv2.rectangle(canvas, (x, y_of(values[c])), (int(round(x + bar_w)) - 1, y_of(0)),
                          PALETTE[s % len(PALETTE)], -1)
        (tw, _th), _ = cv2.getTextSize(category, FONT, 0.55, 1)
        cv2.putText(canvas, category, (int(left + (c + 0.5) * group_w - tw / 2), top + plot_h + 22), FONT, 0.55,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, title, (left, 28), FONT, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, y_label, (8, top - 12), FONT, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    legend_y = top + plot_h + 46
    x = left
    for s, name in enumerate(series):
        cv2.rectangle(canvas, (x, legend_y - 10), (x + 14, legend_y + 2), PALETTE[s % len(PALETTE)], -1)
        cv2.putText(canvas, name, (x + 20, legend_y), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 20 + cv2.getTextSize(name, FONT, 0.45, 1)[0][0] + 24
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
    return path
