"""Which frame an item is read from: the one at its trigger time, never a later envelope's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.binding import FrameWindow, choose_frame, too_late_to_read
from edge_agent.types import Frame

WINDOW = FrameWindow(max_age_s=0.2, wait_s=0.5)
PIXELS = np.zeros((2, 2), np.uint8)


def frames_at(*times: float) -> list[Frame]:
    return [Frame(PIXELS, t, seq, "cam") for seq, t in enumerate(times, start=1)]


def test_the_newest_frame_at_or_before_the_trigger_is_chosen():
    history = frames_at(9.80, 9.90, 9.97, 10.03, 10.10)
    assert choose_frame(history, 10.0, WINDOW).captured_at == 9.97


def test_a_frame_captured_after_the_trigger_is_never_preferred_to_the_one_at_it():
    # Under a backlog the newest frame shows a later envelope: it must not win.
    history = frames_at(9.99, 10.2, 10.4)
    assert choose_frame(history, 10.0, WINDOW).captured_at == 9.99


def test_too_old_a_frame_gives_way_to_the_first_one_after_the_trigger():
    history = frames_at(9.5, 10.1, 10.2)
    assert choose_frame(history, 10.0, WINDOW).captured_at == 10.1


def test_nothing_in_the_window_is_none():
    assert choose_frame(frames_at(9.5, 10.6), 10.0, WINDOW) is None  # too old, and too late
    assert choose_frame([], 10.0, WINDOW) is None


def test_after_only_skips_the_frame_at_the_trigger():
    window = FrameWindow(0.2, 0.5, after_only=True)
    assert choose_frame(frames_at(9.99, 10.05, 10.2), 10.0, window).captured_at == 10.05


def test_window_edges_are_inclusive():
    assert choose_frame(frames_at(9.8), 10.0, WINDOW).captured_at == 9.8
    assert choose_frame(frames_at(10.5), 10.0, WINDOW).captured_at == 10.5
    assert WINDOW.closes_at(10.0) == 10.5


@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=40), st.floats(0, 20, allow_nan=False))
def test_any_chosen_frame_lies_in_the_items_window(times, at):
    frame = choose_frame(frames_at(*sorted(times)), at, WINDOW)
    if frame is not None:
        assert at - WINDOW.max_age_s <= frame.captured_at <= at + WINDOW.wait_s


@pytest.mark.parametrize("now, estimate, late", [(10.0, 0.05, False), (11.46, 0.05, True), (11.6, 0.0, True)])
def test_a_read_that_would_end_after_the_deadline_is_not_started(now, estimate, late):
    assert too_late_to_read(now, 11.5, estimate) is late


def test_surge_guard_lets_a_line_rate_through_and_flags_a_flood():
    from edge_agent.binding import SurgeGuard

    guard = SurgeGuard(rate_per_s=100, window_s=0.25, hold_s=1.0)
    assert not any(guard.surging(t / 90) for t in range(450))  # 90/s for 5 s: never a surge
    flood = [guard.surging(10.0 + i / 5000) for i in range(1000)]  # 5,000/s, after a quiet spell
    assert flood[:25] == [False] * 25 and all(flood[26:])  # 25 fit the window, then the rest is surge
    assert guard.surging(10.2 + 0.9)  # held after the flood stops...
    assert not guard.surging(10.2 + 1.5)  # ...then released
    assert not SurgeGuard(0).surging(0.0)  # 0 turns it off


def test_a_dropped_frame_is_never_replaced_by_a_later_envelope():
    """The item's own frame (9.99) has left the held history, which now starts at 10.02: binding
    the first held frame after the trigger would read the next envelope. The timeline knows."""
    from edge_agent.binding import FRAME_DROPPED, bind_frame

    captured = frames_at(9.96, 9.99, 10.02, 10.05)  # seq 1..4
    timeline = [(f.seq, f.captured_at) for f in captured]
    held = captured[2:]
    assert bind_frame(held, timeline, 10.0, WINDOW) is FRAME_DROPPED
    # Held: bound as before. Not captured yet (the trigger is ahead of the camera): wait (None).
    assert bind_frame(captured[:2], timeline[:2], 10.0, WINDOW).captured_at == 9.99
    assert bind_frame(captured[:2], timeline[:2], 10.5, WINDOW) is None
    # No frame young enough before the trigger: the first one after it, and never the second.
    late_camera = frames_at(9.5, 10.02, 10.05)
    line = [(f.seq, f.captured_at) for f in late_camera]
    assert bind_frame(late_camera[1:], line, 10.0, WINDOW).captured_at == 10.02
    assert bind_frame(late_camera[2:], line, 10.0, WINDOW) is FRAME_DROPPED
    # Without a timeline (a source that keeps none) the held frames decide, as choose_frame does.
    assert bind_frame(held, None, 10.0, WINDOW).captured_at == 10.02


def test_a_frame_still_on_its_way_is_waited_for_not_replaced_by_the_previous_envelope():
    """A camera that stamps its own frames delivers them late under load: at the trigger (10.0)
    the timeline ends at the previous envelope's frame (9.999) while the item's own (10.0) is in
    the socket. Binding waits until the timeline is known complete past the trigger."""
    from edge_agent.binding import bind_frame

    captured = frames_at(9.998, 9.999, 10.0, 10.001)
    timeline = [(f.seq, f.captured_at) for f in captured]
    before_own = captured[:2], timeline[:2]
    assert bind_frame(*before_own, 10.0, WINDOW, complete_until=9.999) is None
    # Once its own frame has come (or the source was seen empty after the trigger), it is bound.
    assert bind_frame(captured[:3], timeline[:3], 10.0, WINDOW, complete_until=10.0).seq == 3
    assert bind_frame(*before_own, 10.0, WINDOW, complete_until=10.0005).seq == 2
    # A frame taken after the trigger proves every earlier one has arrived (delivery is in order).
    assert bind_frame(captured, timeline, 10.0, WINDOW, complete_until=10.001).seq == 3
    assert bind_frame([captured[1], captured[3]], [timeline[1], timeline[3]], 10.0, WINDOW,
                      complete_until=10.001).seq == 2
    # The default (frames stamped on arrival leave no gap) binds at once, as before.
    assert bind_frame(*before_own, 10.0, WINDOW).seq == 2


@given(st.lists(st.floats(0.0, 2.0), min_size=1, max_size=30, unique=True), st.floats(0.0, 2.0),
       st.integers(0, 30))
def test_an_incomplete_timeline_never_binds_a_frame_other_than_the_complete_ones(times, at, arrived):
    """Whatever prefix of the frames has arrived, binding gives either nothing yet or exactly
    the frame it gives once every frame has arrived."""
    from edge_agent.binding import bind_frame

    captured = frames_at(*sorted(times))
    timeline = [(f.seq, f.captured_at) for f in captured]
    final = bind_frame(captured, timeline, at, WINDOW, complete_until=float("inf"))
    prefix = captured[:arrived]
    early = bind_frame(prefix, timeline[:arrived], at, WINDOW,
                       complete_until=prefix[-1].captured_at if prefix else float("-inf"))
    assert early is None or early is final


def test_a_grabber_behind_its_camera_never_declares_the_timeline_complete_by_the_clock_alone():
    """Under a burst the grabber can be seconds behind a stamping camera: the item's own frame
    (10.0) is still queued in the socket long after its window closed, and the timeline ends at
    the previous envelope's (9.999). Only a read that found the camera empty lets the window's
    length stand in for "every frame has arrived"."""
    from edge_agent.binding import bind_frame, timeline_complete_until

    captured = frames_at(9.998, 9.999)
    timeline = [(f.seq, f.captured_at) for f in captured]
    behind = timeline_complete_until(9.999, caught_up_at=float("-inf"), window=WINDOW)
    assert behind == 9.999
    assert bind_frame(captured, timeline, 10.0, WINDOW, complete_until=behind) is None
    # Found empty at 9.9 (before the envelope): still not known complete past 10.0.
    assert timeline_complete_until(9.999, 9.9, WINDOW) == 9.999
    # Found empty at 10.6, a window after the trigger: the item's frame was never sent, so the
    # newest frame taken before the trigger is its frame (a camera that stopped sending).
    done = timeline_complete_until(9.999, 10.6, WINDOW)
    assert done >= 10.0 and bind_frame(captured, timeline, 10.0, WINDOW, complete_until=done).seq == 2
    # Frames stamped on arrival: complete whatever the grabber's state.
    assert timeline_complete_until(float("inf"), float("-inf"), WINDOW) == float("inf")
