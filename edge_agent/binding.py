"""Which frame belongs to which item, and when an item can no longer be read (pure logic).

An item's image is fixed the moment its trigger arrives: the frame captured at its
trigger time (or the first one after), never the frame that happens to be newest when
a reader gets round to it. Under a backlog "newest" is a later envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.types import Frame


@dataclass(frozen=True)
class FrameWindow:
    """An item is read only from a frame captured in [at - max_age_s, at + wait_s]."""

    max_age_s: float
    wait_s: float
    after_only: bool = False  # only frames captured after the trigger (cameras that lag the PLC)

    def closes_at(self, at: float) -> float:
        """After this moment no frame can arrive for an item triggered ``at``."""
        return at + self.wait_s


def choose_frame(frames: Sequence[Frame], at: float, window: FrameWindow) -> Frame | None:
    """The frame for an item triggered ``at``: the newest captured at or before it (if young
    enough), else the first captured after it within the window; None if there is none yet.

    ``frames`` is the grabber's recent history, oldest first.
    """
    if not window.after_only:
        for frame in reversed(frames):
            if frame.captured_at <= at:
                if frame.captured_at >= at - window.max_age_s:
                    return frame
                break
    for frame in frames:
        if at < frame.captured_at <= at + window.wait_s:
            return frame
    return None


def too_late_to_read(now: float, deadline: float, read_estimate_s: float) -> bool:
    """True when a read started now would finish after the item's deadline."""
    return now + read_estimate_s > deadline
