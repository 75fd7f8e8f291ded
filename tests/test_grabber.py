"""FrameGrabber on a real thread: latest-frame semantics, reconnects, ends, callbacks.

Timeouts here are generous upper bounds for waiting only; no test asserts how
fast something happened.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.grabber import FrameGrabber, GrabberState
from edge_agent.sources import DirectorySource, SourceError, VideoFileSource
from edge_agent.types import Frame, SystemClock

WAIT = 10.0  # seconds; only ever an upper bound on waiting
FAST_BACKOFF = (0.01, 0.05)


class FixedWallClock(SystemClock):
    """Real monotonic time (the grabber waits on it) but a known wall clock for captured_at."""

    def time(self) -> float:
        return 1_700_000_000.0


class ScriptedSource:
    """A camera the test controls: frames are pushed in, and it can be unplugged."""

    def __init__(self, live: bool = True) -> None:
        self.name = "fake:cam"
        self.live = live
        self.frames: deque[np.ndarray] = deque()
        self.available = True
        self.opens = 0
        self.closes = 0
        self.reads = 0
        self._lock = threading.Lock()

    def push(self, *values: int) -> None:
        with self._lock:
            self.frames.extend(np.full((2, 2), v, dtype=np.uint8) for v in values)

    def open(self) -> None:
        if not self.available:
            raise SourceError("fake:cam: unplugged")
        self.opens += 1

    def read(self) -> np.ndarray | None:
        self.reads += 1
        if not self.available:
            raise SourceError("fake:cam: cable pulled")
        with self._lock:
            return self.frames.popleft() if self.frames else None

    def close(self) -> None:
        self.closes += 1


class EndlessSource(ScriptedSource):
    """Always has a frame (value = how many it has made, mod 256)."""

    def read(self) -> np.ndarray | None:
        self.reads += 1
        return np.full((2, 2), self.reads % 256, dtype=np.uint8)


def wait_until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the wait")
        time.sleep(0.005)


def value(frame: Frame) -> int:
    return int(frame.image.flat[0])


@pytest.fixture
def source() -> ScriptedSource:
    return ScriptedSource()


def grabber_for(source, **kwargs) -> FrameGrabber:
    kwargs.setdefault("stall_timeout_s", None)
    return FrameGrabber(source, SystemClock(), FAST_BACKOFF, **kwargs)


def test_frames_are_stamped_with_clock_seq_and_source(source):
    source.push(11, 12)
    with FrameGrabber(source, FixedWallClock(), FAST_BACKOFF, stall_timeout_s=None) as grabber:
        frame = grabber.wait_for_frame(1, WAIT)
        assert frame is not None
        assert (frame.seq, value(frame), frame.captured_at, frame.source) == (2, 12, 1_700_000_000.0, "fake:cam")
        assert not frame.image.flags.writeable


def test_slow_consumer_gets_the_newest_frame_not_the_oldest(source):
    with grabber_for(source) as grabber:
        source.push(1)
        first = grabber.wait_for_frame(0, WAIT)
        assert first is not None and value(first) == 1
        # While the consumer is busy the camera delivers nine more frames.
        source.push(*range(2, 11))
        wait_until(lambda: grabber.last_seq == 10)
        assert value(grabber.latest()) == 10
        assert grabber.latest().seq == 10
        assert grabber.wait_for_frame(first.seq, WAIT).seq == 10


def test_latest_with_max_age_refuses_a_stale_frame(source):
    clock = SystemClock()
    with FrameGrabber(source, clock, FAST_BACKOFF, stall_timeout_s=None) as grabber:
        source.push(1)
        assert grabber.wait_for_frame(0, WAIT) is not None
        assert grabber.latest(max_age_s=WAIT) is not None
        time.sleep(0.05)
        assert grabber.latest(max_age_s=0.01) is None
        assert grabber.latest() is not None


def test_wait_for_frame_returns_none_when_nothing_newer_comes(source):
    with grabber_for(source) as grabber:
        assert grabber.latest() is None and grabber.last_seq == 0
        assert grabber.wait_for_frame(0, 0.05) is None
        source.push(5)
        assert grabber.wait_for_frame(0, WAIT) is not None
        assert grabber.wait_for_frame(grabber.last_seq, 0.05) is None


def test_source_that_fails_reconnects_and_recovers(source):
    with grabber_for(source, failed_after=1000) as grabber:
        source.push(1)
        assert grabber.wait_for_frame(0, WAIT) is not None
        assert grabber.health()["state"] == "ok"

        source.available = False  # cable pulled: read raises, then open raises
        wait_until(lambda: grabber.health()["failures"] >= 3)
        health = grabber.health()
        assert health["state"] == "reconnecting"
        assert "fake:cam" in health["last_error"]
        assert source.closes >= 1

        source.available = True
        source.push(2)
        frame = grabber.wait_for_frame(1, WAIT)
        assert frame is not None and value(frame) == 2 and frame.seq == 2
        assert grabber.health()["state"] == "ok"


def test_persistent_failure_reports_failed_but_keeps_retrying(source):
    source.available = False
    with grabber_for(source, failed_after=3) as grabber:
        wait_until(lambda: grabber.state is GrabberState.FAILED)
        assert grabber.latest() is None
        source.available = True
        source.push(9)
        assert grabber.wait_for_frame(0, WAIT) is not None
        assert grabber.state is GrabberState.OK


def test_live_source_without_frames_is_treated_as_stalled(source):
    with grabber_for(source, stall_timeout_s=0.05, failed_after=1000) as grabber:
        wait_until(lambda: grabber.health()["failures"] >= 1)
        assert "no frame for" in grabber.health()["last_error"]
        assert source.opens >= 2 or grabber.state is GrabberState.RECONNECTING


def test_folder_with_nothing_new_is_healthy_not_stalled(tmp_path):
    source = DirectorySource(tmp_path)
    with grabber_for(source, stall_timeout_s=0.01, file_fps=200) as grabber:
        wait_until(lambda: grabber.state is GrabberState.OK)
        time.sleep(0.1)
        assert grabber.health()["failures"] == 0


def test_folder_deleted_mid_run_reconnects_and_recovers(tmp_path):
    folder = tmp_path / "hotfolder"
    folder.mkdir()
    cv2.imwrite(str(folder / "1.png"), np.full((8, 8, 3), 10, np.uint8))
    source = DirectorySource(folder)
    with grabber_for(source, file_fps=100, failed_after=1000) as grabber:
        assert grabber.wait_for_frame(0, WAIT) is not None
        shutil.rmtree(folder)
        wait_until(lambda: grabber.state is GrabberState.RECONNECTING)
        assert "folder" in grabber.health()["last_error"]

        folder.mkdir()
        cv2.imwrite(str(folder / "2.png"), np.full((8, 8, 3), 200, np.uint8))
        frame = grabber.wait_for_frame(1, WAIT)
        assert frame is not None and int(frame.image.mean()) == 200
        assert grabber.state is GrabberState.OK


def write_video(path: Path, count: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(count):
        writer.write(np.full((24, 32, 3), 20 * i, np.uint8))
    writer.release()
    return path


def test_video_file_without_loop_ends(tmp_path):
    source = VideoFileSource(write_video(tmp_path / "v.avi", 4))
    with grabber_for(source, file_fps=200) as grabber:
        wait_until(lambda: grabber.state is GrabberState.ENDED)
        assert grabber.health()["frames"] == 4
        assert grabber.health()["failures"] == 0
        # Nothing more will come: waiting returns at once instead of hanging.
        assert grabber.wait_for_frame(4, WAIT) is None


def test_looping_video_keeps_delivering(tmp_path):
    source = VideoFileSource(write_video(tmp_path / "v.avi", 3), loop=True)
    with grabber_for(source, file_fps=200) as grabber:
        assert grabber.wait_for_frame(7, WAIT) is not None
        assert grabber.state is GrabberState.OK


def test_file_sources_are_paced_but_cameras_are_not():
    paced = EndlessSource(live=False)
    grabber = grabber_for(paced, file_fps=20).start()
    started = time.monotonic()
    time.sleep(0.3)
    grabber.stop()
    elapsed = time.monotonic() - started
    # An upper bound only: a loaded machine can read fewer, never more.
    assert paced.reads <= elapsed * 20 + 2

    live = EndlessSource(live=True)
    with grabber_for(live) as grabber:
        wait_until(lambda: grabber.last_seq > 200)


def test_live_flag_is_read_after_open_for_lazily_built_sources(tmp_path):
    class Lazy:
        """Like a wrapper that builds the real source on first open."""

        name = "lazy"
        live = True

        def __init__(self) -> None:
            self.inner = DirectorySource(tmp_path)

        def open(self) -> None:
            self.inner.open()
            self.live = self.inner.live

        def read(self):
            return self.inner.read()

        def close(self) -> None:
            self.inner.close()

    # An idle folder mistaken for a camera would be "stalled" and reopened.
    with grabber_for(Lazy(), stall_timeout_s=0.01, file_fps=200) as grabber:
        wait_until(lambda: grabber.state is GrabberState.OK)
        time.sleep(0.1)
        assert grabber.health()["failures"] == 0
        assert not grabber.live


def test_on_frame_sees_every_frame_and_a_failing_callback_is_contained(source):
    seen: list[int] = []

    def callback(frame: Frame) -> None:
        seen.append(frame.seq)
        if frame.seq == 2:
            raise RuntimeError("detector bug")

    with grabber_for(source, on_frame=callback) as grabber:
        source.push(1, 2, 3)
        assert grabber.wait_for_frame(2, WAIT) is not None
        wait_until(lambda: len(seen) == 3)
        assert seen == [1, 2, 3]
        assert grabber.health()["callback_errors"] == 1
        assert grabber.state is GrabberState.OK


def test_health_reports_counts_and_fps():
    source = EndlessSource()
    with grabber_for(source) as grabber:
        wait_until(lambda: grabber.last_seq > 50)
        health = grabber.health()
    assert set(health) >= {"state", "frames", "failures", "last_error", "fps"}
    assert health["frames"] > 50 and health["failures"] == 0 and health["last_error"] is None
    assert health["fps"] > 0


def test_stop_closes_the_source_and_wakes_waiters(source):
    grabber = grabber_for(source).start()
    source.push(1)
    assert grabber.wait_for_frame(0, WAIT) is not None
    results: list[Frame | None] = []
    waiter = threading.Thread(target=lambda: results.append(grabber.wait_for_frame(1, WAIT)))
    waiter.start()
    assert grabber.stop() is True
    waiter.join(WAIT)
    assert results == [None]
    assert grabber.state is GrabberState.STOPPED
    assert source.opens == source.closes == 1


def test_bad_settings_are_rejected(source):
    with pytest.raises(ValueError):
        FrameGrabber(source, SystemClock(), (0, 1))
    with pytest.raises(ValueError):
        FrameGrabber(source, SystemClock(), (5, 1))
    with pytest.raises(ValueError):
        FrameGrabber(source, SystemClock(), file_fps=0)


class TimedSource(ScriptedSource):
    """Records when each open was tried, to see how soon a returning camera is picked up."""

    def __init__(self) -> None:
        super().__init__()
        self.open_attempts: list[float] = []

    def open(self) -> None:
        self.open_attempts.append(time.monotonic())
        super().open()


def test_with_the_shipped_backoff_a_returning_camera_is_retried_within_about_a_second():
    from edge_agent.config import CameraConfig

    cam = CameraConfig()
    source = TimedSource()
    grabber = FrameGrabber(source, SystemClock(), (cam.reopen_backoff_min_s, cam.reopen_backoff_max_s),
                           stall_timeout_s=None, failed_after=1000)
    with grabber:
        source.push(1)
        assert grabber.wait_for_frame(0, WAIT) is not None
        source.available = False
        time.sleep(6.0)  # unplugged for a while: backoff must not grow past the cap
        attempts = [t for t in source.open_attempts[1:]]
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert len(attempts) >= 4 and max(gaps) <= cam.reopen_backoff_max_s + 0.5, gaps
        source.available = True
        source.push(2)
        assert grabber.wait_for_frame(1, cam.reopen_backoff_max_s + 2.0) is not None


def test_history_keeps_the_last_frames_oldest_first(source):
    with grabber_for(source, history_frames=3) as grabber:
        source.push(1, 2, 3, 4, 5)
        wait_until(lambda: grabber.last_seq == 5)
        assert [value(f) for f in grabber.binding_view().history] == [3, 4, 5]
        assert grabber.wait_for_new(5, 0.05) == 5  # nothing newer: returns after the timeout


def test_skipped_corrupt_files_are_counted_in_health(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    cv2.imwrite(str(tmp_path / "b.png"), np.full((8, 8), 200, np.uint8))
    from edge_agent.agent import DeferredSource

    with FrameGrabber(DeferredSource(str(tmp_path), loop=False), SystemClock(), FAST_BACKOFF) as grabber:
        assert grabber.wait_for_frame(0, WAIT) is not None
        wait_until(lambda: grabber.bad_frames == 1)
        assert grabber.health()["bad_frames"] == 1


def test_folder_frames_are_decoded_only_when_an_item_asks(tmp_path):
    from edge_agent.sources import DirectorySource

    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((8, 8, 3), 90, np.uint8))
    with FrameGrabber(DirectorySource(tmp_path), SystemClock(), FAST_BACKOFF) as grabber:
        frame = grabber.wait_for_frame(0, WAIT)
        assert frame is not None and frame.encoded is not None and not frame.decoded
        assert frame.for_reading().ndim == 2  # straight to grey for the reader
        assert not frame.image.flags.writeable and frame.image.shape == (8, 8, 3)
        assert frame.decoded


def test_a_source_that_knows_its_capture_time_stamps_the_frame(tmp_path):
    from edge_agent.sources import EncodedImage

    data = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    source = ScriptedSource()
    source.frames.append(EncodedImage(data, "cam", captured_at=1234.5))
    with FrameGrabber(source, FixedWallClock(), FAST_BACKOFF) as grabber:
        frame = grabber.wait_for_frame(0, WAIT)
        assert frame is not None and frame.captured_at == 1234.5


def test_the_timeline_is_complete_up_to_a_stamping_cameras_newest_frame_only():
    """Binding waits for a self-stamping camera's frames in transit (binding.bind_frame): the
    grabber says up to when its timeline is complete. An empty read does not move it: a frame
    taken before that read may still be on its way (the burst benchmark bound a previous
    envelope's frame when it did)."""
    from edge_agent.sources import EncodedImage

    data = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    source = ScriptedSource()
    source.frames.append(EncodedImage(data, "cam", captured_at=1234.5))
    with FrameGrabber(source, FixedWallClock(), FAST_BACKOFF) as grabber:
        assert grabber.wait_for_frame(0, WAIT) is not None
        reads = source.reads
        deadline = time.monotonic() + WAIT
        while source.reads < reads + 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # several empty reads (the wall clock says 1_700_000_000)
        assert source.reads >= reads + 5
        assert grabber.binding_view().newest_stamp == 1234.5
        source.frames.append(EncodedImage(data, "cam", captured_at=1240.0))
        assert grabber.wait_for_frame(1, WAIT) is not None
        assert grabber.binding_view().newest_stamp == 1240.0


def test_a_grabber_is_caught_up_only_after_a_read_that_found_nothing_waiting():
    """Binding may treat a stamping camera's timeline as complete by the clock only once the
    grabber has found the camera empty (binding.timeline_complete_until): while every read
    returns a frame at once (a backlog) it has not."""
    from edge_agent.sources import EncodedImage

    data = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()

    class Backlog(ScriptedSource):
        """Always a frame waiting, until the test lets the camera run dry."""

        def __init__(self) -> None:
            super().__init__()
            self.dry = False

        def read(self):
            self.reads += 1
            return None if self.dry else EncodedImage(data, "cam", captured_at=1234.5 + self.reads / 1000)

    source = Backlog()
    with FrameGrabber(source, FixedWallClock(), FAST_BACKOFF, history_frames=4) as grabber:
        assert grabber.wait_for_frame(50, WAIT) is not None  # 50 frames read back to back
        assert grabber.binding_view().caught_up_at == float("-inf")
        source.dry = True
        reads = source.reads
        deadline = time.monotonic() + WAIT
        while source.reads < reads + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert grabber.binding_view().caught_up_at == FixedWallClock().time()


def test_a_binding_view_never_vouches_for_a_frame_its_timeline_lacks():
    """The agent binds an item from one view of the grabber (agent._frame_in_window). Its marks of
    completeness must describe the very timeline it holds: were they read after the timeline's
    copy, a frame arriving in between would be vouched for but missing, and an item triggered at
    that frame would be bound to the one before it (the previous envelope). Frames stream in
    from a stamping camera while the views are taken."""
    from edge_agent.sources import EncodedImage

    data = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()

    class Streaming(ScriptedSource):
        """A stamping camera with a frame always waiting, now and then none (caught up)."""

        def read(self):
            self.reads += 1
            if self.reads % 7 == 0:
                return None
            return EncodedImage(data, "cam", captured_at=1000.0 + self.reads / 1000)

    views = 0
    with FrameGrabber(Streaming(), FixedWallClock(), FAST_BACKOFF, history_frames=4) as grabber:
        assert grabber.wait_for_frame(0, WAIT) is not None
        deadline = time.monotonic() + 2.0
        while views < 20_000 and time.monotonic() < deadline:
            view = grabber.binding_view()
            views += 1
            newest_held = view.timeline[-1][1]
            assert view.newest_stamp == newest_held  # never a newer stamp than the copy holds
            assert {f.seq for f in view.history} <= {seq for seq, _ in view.timeline}
            assert view.history[-1].captured_at == newest_held
    assert views > 100


def test_frames_stamped_on_arrival_leave_no_gap_in_the_timeline():
    source = ScriptedSource()
    source.push(1)
    with FrameGrabber(source, FixedWallClock(), FAST_BACKOFF) as grabber:
        assert grabber.wait_for_frame(0, WAIT) is not None
        assert grabber.binding_view().newest_stamp == float("inf")
