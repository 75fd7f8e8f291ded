"""Which frame belongs to which item, and when an item can no longer be read (pure logic).

An item's image is fixed the moment its trigger arrives: the frame captured at its
trigger time (or the first one after), never the frame that happens to be newest when
a reader gets round to it. Under a backlog "newest" is a later envelope.
"""

from __future__ import annotations

from collections import deque
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


class FrameDropped:
    """The item's own frame was captured but is no longer held (the agent fell that far behind).

    Binding any other frame would read a different envelope, so the item is answered instead.
    """

    def __repr__(self) -> str:
        return "FRAME_DROPPED"


FRAME_DROPPED = FrameDropped()


def intended_seq(timeline: Sequence[tuple[int, float]], at: float, window: FrameWindow,
                 complete_until: float = float("inf")) -> int | None:
    """The sequence number of the item's frame by ``choose_frame``'s rule, over every frame's
    (seq, captured_at), including frames whose pixels are no longer held; None if none yet, or
    if a frame taken before ``at`` may still be on its way (``complete_until`` < ``at`` and no
    frame taken after ``at`` has arrived)."""
    if not window.after_only:
        for seq, captured_at in reversed(timeline):
            if captured_at <= at:
                settled = complete_until >= at or timeline[-1][1] > at
                if captured_at >= at - window.max_age_s:
                    return seq if settled else None
                break
    for seq, captured_at in timeline:
        if at < captured_at <= at + window.wait_s:
            return seq
    return None


def timeline_complete_until(newest_stamp: float, caught_up_at: float, window: FrameWindow) -> float:
    """Up to when every frame a camera took is known to be in the grabber's timeline.

    ``newest_stamp``: the grabber's own mark (+inf for frames stamped on arrival, else the newest
    stamp: frames arrive in the order they were taken). Past that, a frame is only known to have
    arrived once the grabber has found the camera with nothing waiting (``caught_up_at``) more
    than a frame window (``window.wait_s``, taken as the longest a frame is in transit) after it
    was taken: then a stamping camera that stops sending leaves its items waiting at most that
    long. Never "now - wait_s": a grabber behind a backlog of frames has not read them yet, and
    an item would be bound to the previous envelope's frame while its own waits in the queue.
    """
    return max(newest_stamp, caught_up_at - window.wait_s)


def bind_frame(frames: Sequence[Frame], timeline: Sequence[tuple[int, float]] | None, at: float,
               window: FrameWindow, complete_until: float = float("inf")) -> Frame | FrameDropped | None:
    """The item's frame from the held ``frames`` (oldest first), FRAME_DROPPED if it has already
    been let go, None if it is not there yet.

    ``timeline`` (every recent frame's seq and capture time, taken after ``frames``) is what
    tells "not captured yet" from "captured and dropped": without it, the first frame held
    after the trigger could be a later envelope's whose predecessors were dropped.

    ``complete_until``: every frame captured up to this moment is in the timeline. A camera
    that stamps its own frames delivers them some time after it took them, so the newest frame
    held at the trigger may not be the newest one taken before it: binding it then would read
    the previous envelope. Until the timeline is complete past the trigger (a frame taken after
    it has arrived, or the item's frame window has closed), the item waits.
    """
    if timeline is None:
        return choose_frame(frames, at, window)
    want = intended_seq(timeline, at, window, complete_until)
    if want is None:
        return None
    for frame in frames:
        if frame.seq == want:
            return frame
    if frames and want < frames[0].seq:
        return FRAME_DROPPED
    return None  # captured after the held frames were read: found on the next look


def too_late_to_read(now: float, deadline: float, read_estimate_s: float) -> bool:
    """True when a read started now would finish after the item's deadline."""
    return now + read_estimate_s > deadline


class SurgeGuard:
    """Tells when triggers arrive faster than envelopes can pass one camera.

    Beyond that rate the triggers have queued somewhere (the broker, the PLC, our own socket)
    and the moment each one arrives says nothing about when its envelope was under the camera:
    an unstamped trigger read "now" would be read from a later envelope. The guard stays up
    ``hold_s`` after the rate falls, because the tail of a flood is its most delayed part.
    Times are monotonic seconds; not thread-safe (one intake thread calls it).
    """

    def __init__(self, rate_per_s: float, window_s: float = 0.25, hold_s: float = 1.0) -> None:
        self.limit = rate_per_s * window_s  # arrivals allowed within one window
        self.window_s = window_s
        self.hold_s = hold_s
        self._arrivals: deque[float] = deque()
        self._until = float("-inf")

    def surging(self, now: float) -> bool:
        """Record one arrival at ``now``; True while arrivals exceed the rate (and ``hold_s`` after)."""
        if self.limit <= 0:
            return False
        self._arrivals.append(now)
        while self._arrivals and self._arrivals[0] <= now - self.window_s:
            self._arrivals.popleft()
        if len(self._arrivals) > self.limit:
            self._until = now + self.hold_s
        return now < self._until
