"""Read a source continuously and keep its last few frames, on a thread that survives camera failures.

A trigger must read the envelope that was under the camera when it fired, not one
that sat in a buffer, so the grabber reads continuously and keeps only a short
history of stamped frames (``binding_view()``) for the agent to pick each item's frame from. When the source fails it is closed and reopened with
exponential backoff; the agent keeps running and ``health()`` says why.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.sources import EncodedImage, SourceEnded
from edge_agent.types import Clock, Frame, FrameSource

log = logging.getLogger(__name__)

FrameCallback = Callable[[Frame], None]

# How long to pause after a live source returned no frame, so a source that
# fails instantly does not spin a core.
_LIVE_IDLE_WAIT_S = 0.005


class GrabberState(str, enum.Enum):
    """What the grabber is doing, for the status page and /metrics."""

    STARTING = "starting"  # not started, or opening the source for the first time
    OK = "ok"  # source open, frames arriving (or a folder waiting for files)
    RECONNECTING = "reconnecting"  # source failed; closing and reopening with backoff
    FAILED = "failed"  # `failed_after` failures in a row; still retrying at the longest backoff
    ENDED = "ended"  # a finite source (video file without loop) delivered its last frame
    STOPPED = "stopped"  # stop() was called


@dataclass(frozen=True)
class BindingView:
    """One consistent look at the grabber, for binding an item to its frame (``binding.bind_frame``).

    Taken under one lock: ``newest_stamp`` and ``caught_up_at`` describe exactly this
    ``timeline``. Read one by one, a frame could arrive between the timeline's copy and the
    marks, which would then vouch for a frame the copy lacks, and the item would be bound to
    the frame before it: the previous envelope's.
    """

    history: list[Frame]  # the frames still held, oldest first
    timeline: list[tuple[int, float]]  # (seq, captured_at) of recent frames, held or not
    newest_stamp: float  # +inf for frames stamped on arrival, else the newest stamp (frames come in order)
    caught_up_at: float  # wall clock of the last read that found nothing waiting (-inf if never)


class FrameGrabber:
    """Read a FrameSource on a background thread and keep only the latest Frame.

    A source may return pixels or an ``EncodedImage`` (a folder's files): the latter stay encoded
    in the history and are decoded only when an item's read (or an ``on_frame`` callback) asks.
    """

    def __init__(
        self,
        source: FrameSource,
        clock: Clock,
        reopen_backoff: tuple[float, float] = (0.5, 30.0),
        *,
        file_fps: float = 10.0,
        stall_timeout_s: float | None = 5.0,
        failed_after: int = 5,
        on_frame: FrameCallback | None = None,
        fps_window: int = 30,
        history_frames: int = 16,
    ) -> None:
        low, high = reopen_backoff
        if not 0 < low <= high:
            raise ValueError(f"reopen_backoff must be (min, max) with 0 < min <= max, not {reopen_backoff}")
        if file_fps <= 0:
            raise ValueError(f"file_fps must be positive, not {file_fps}")
        self.source = source
        self.clock = clock
        self.reopen_backoff = (float(low), float(high))
        self.live = self._source_is_live()
        self.file_fps = file_fps
        self.stall_timeout_s = stall_timeout_s
        self.failed_after = failed_after
        self.on_frame = on_frame

        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._is_open = False  # touched only by the reading thread
        # ("open" | "read", clock.monotonic() when it began) while a call into the source runs:
        # a camera call that never returns is what the watchdog must see.
        self._in_call: tuple[str, float] | None = None
        self._latest: Frame | None = None
        self._seq = 0
        self._state = GrabberState.STARTING
        self._failures = 0
        self._failures_in_row = 0
        self._last_error: str | None = None
        self._callback_errors = 0
        self._frame_times: deque[float] = deque(maxlen=max(2, fps_window))
        # Half a second at 30 fps: items are bound to their frame as their trigger arrives, so
        # this only has to cover a PLC stamp's transit and max_frame_age; ~1 MB a decoded 640x480
        # frame, the file's size (30-300 KB) while a frame from a folder stays encoded.
        self._history: deque[Frame] = deque(maxlen=max(1, history_frames))
        # Every recent frame's (seq, captured_at), long after its pixels are let go: binding
        # tells "not captured yet" from "captured and dropped" with it (binding.bind_frame).
        self._timeline: deque[tuple[int, float]] = deque(maxlen=1024)
        # Up to when the timeline holds every frame taken (binding.bind_frame). Frames stamped
        # here on arrival leave no gap (one still on its way will be stamped later), so +inf;
        # a camera that stamps its own frames is known complete only up to its newest stamp
        # (frames arrive in the order they were taken). Not up to a read that found nothing
        # waiting: a frame taken before that read may still be in transit (seen under load);
        # such a read counts only a frame window later (_caught_up_at below, used by
        # binding.timeline_complete_until).
        self._complete_until = float("inf")
        # Wall-clock start of the latest read that found nothing waiting: the grabber had then
        # taken in everything the camera had delivered. A grabber behind a backlog never gets one.
        self._caught_up_at = float("-inf")

    # -- public API -------------------------------------------------------

    def start(self) -> "FrameGrabber":
        """Start the reading thread; returns self so it can be chained."""
        if self._thread is not None:
            raise RuntimeError("grabber already started")
        self._thread = threading.Thread(target=self._run, name=f"grabber[{self.source.name}]", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop reading and close the source; False if the thread is stuck in a blocking read."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is None:
            self._set_state(GrabberState.STOPPED)
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Closing the capture from this thread could crash OpenCV; the daemon
            # thread closes it itself when the read returns.
            log.warning("grabber for %s did not stop within %.1fs (blocked in read)", self.source.name, timeout)
            return False
        return True

    def __enter__(self) -> "FrameGrabber":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def latest(self, max_age_s: float | None = None) -> Frame | None:
        """The newest frame, or None before the first one (or if older than max_age_s)."""
        with self._cond:
            frame = self._latest
            if frame is None or max_age_s is None:
                return frame
            # While the camera reconnects the last frame can be minutes old:
            # reading it would answer for the wrong envelope.
            age = self.clock.monotonic() - self._frame_times[-1]
            return frame if age <= max_age_s else None

    def binding_view(self) -> BindingView:
        """History, timeline and both completeness marks, all from one moment."""
        with self._cond:
            return BindingView(list(self._history), list(self._timeline), self._complete_until, self._caught_up_at)

    def wait_for_new(self, after_seq: int, timeout: float) -> int:
        """Wait up to ``timeout`` for a frame with seq > after_seq (or stop); returns the newest seq."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after_seq or self._finished(), timeout)
            return self._seq

    def stuck_call(self, stall_s: float) -> str | None:
        """What is wrong if a call into the source has not returned for ``stall_s``, or the thread died."""
        call = self._in_call
        if call is not None and self.clock.monotonic() - call[1] > stall_s:
            return (f"camera {call[0]} on {self.source.name} has not returned for "
                    f"{self.clock.monotonic() - call[1]:.0f} s")
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set() \
                and self._state is not GrabberState.ENDED:
            return f"the grabber thread for {self.source.name} has ended ({self._last_error or 'no error recorded'})"
        return None

    @property
    def bad_frames(self) -> int:
        """Frames the source could not decode and skipped (corrupt or empty files)."""
        return int(getattr(self.source, "bad_frames", 0) or 0)

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest frame (0 before the first); pass it to wait_for_frame."""
        with self._cond:
            return self._seq

    def wait_for_frame(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame with seq > after_seq, waiting up to timeout seconds; None if none came."""
        with self._cond:
            self._cond.wait_for(
                lambda: (self._latest is not None and self._latest.seq > after_seq) or self._finished(),
                timeout,
            )
            frame = self._latest
        return frame if frame is not None and frame.seq > after_seq else None

    def health(self) -> dict[str, object]:
        """State and counters for the status page: state, frames, failures, last_error, fps, ..."""
        with self._cond:
            now = self.clock.monotonic()
            times = self._frame_times
            fps = 0.0
            if len(times) >= 2 and times[-1] > times[0]:
                fps = (len(times) - 1) / (times[-1] - times[0])
            age = (now - times[-1]) if times else None
            return {
                "state": self._state.value,
                "source": self.source.name,
                "frames": self._seq,
                "failures": self._failures,
                "last_error": self._last_error,
                "fps": round(fps, 2),
                "last_frame_age_s": None if age is None else round(age, 3),
                "callback_errors": self._callback_errors,
                "bad_frames": self.bad_frames,
            }

    @property
    def state(self) -> GrabberState:
        with self._cond:
            return self._state

    # -- thread -----------------------------------------------------------

    def _source_is_live(self) -> bool:
        # Files and folders would be read as fast as the disk allows; cameras
        # pace themselves. Sources without a `live` flag are treated as cameras.
        return bool(getattr(self.source, "live", True))

    def _finished(self) -> bool:
        return self._stop.is_set() or self._state in (GrabberState.ENDED, GrabberState.STOPPED)

    def _set_state(self, state: GrabberState) -> None:
        with self._cond:
            previous = self._swap_state_locked(state)
        self._log_transition(previous, state)

    def _swap_state_locked(self, state: GrabberState) -> GrabberState | None:
        """Change the state under `_cond`; the previous state, or None if nothing changed."""
        if state is self._state:
            return None
        previous, self._state = self._state, state
        self._cond.notify_all()
        return previous

    def _log_transition(self, previous: GrabberState | None, state: GrabberState) -> None:
        if previous is None:
            return
        level = logging.WARNING if state in (GrabberState.RECONNECTING, GrabberState.FAILED) else logging.INFO
        log.log(level, "grabber %s: %s -> %s", self.source.name, previous.value, state.value)

    def _record_failure(self, message: str) -> None:
        # Counter, error and state change together, so the status page never
        # shows a failure counted while the state still says all is well.
        with self._cond:
            self._failures += 1
            self._failures_in_row += 1
            self._last_error = message
            state = GrabberState.FAILED if self._failures_in_row >= self.failed_after else GrabberState.RECONNECTING
            previous = self._swap_state_locked(state)
        log.warning("%s", message)
        self._log_transition(previous, state)

    def _run(self) -> None:
        delay = self.reopen_backoff[0]
        try:
            while not self._stop.is_set():
                try:
                    self._in_call = ("open", self.clock.monotonic())
                    self.source.open()
                except Exception as exc:  # noqa: BLE001 - any open failure means "retry later"
                    self._in_call = None
                    self._record_failure(f"cannot open {self.source.name}: {exc}")
                else:
                    self._in_call = None
                    self._is_open = True
                    # Re-read after open: a wrapper that builds its real source
                    # lazily only knows what kind it is now.
                    self.live = self._source_is_live()
                    if not self.live:
                        # A folder may rightly deliver nothing for hours; open is
                        # the proof of health. A camera proves it with a frame.
                        self._set_state(GrabberState.OK)
                    outcome, got_frame = self._read_until_failure()
                    self._close_source()
                    if got_frame:
                        delay = self.reopen_backoff[0]
                    if outcome is None:
                        break  # stopped
                    if outcome is GrabberState.ENDED:
                        self._set_state(GrabberState.ENDED)
                        return
                    self._record_failure(outcome)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.reopen_backoff[1])
        finally:
            self._close_source()
            if self._stop.is_set():
                self._set_state(GrabberState.STOPPED)

    def _read_until_failure(self) -> tuple[str | GrabberState | None, bool]:
        """Read until stop (None), end (ENDED) or failure (the error message); also whether any frame came."""
        period = 1.0 / self.file_fps
        last_frame_at = self.clock.monotonic()
        next_read_at = last_frame_at
        got_frame = False
        while not self._stop.is_set():
            if not self.live:
                wait = next_read_at - self.clock.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return None, got_frame
                # Schedule from the due time, not from now, so the average rate
                # holds; but never queue up a burst after a slow read.
                next_read_at = max(next_read_at + period, self.clock.monotonic())
            try:
                self._in_call = ("read", self.clock.monotonic())
                read_started_at = self.clock.time()
                image = self.source.read()
            except SourceEnded:
                return GrabberState.ENDED, got_frame
            except Exception as exc:  # noqa: BLE001 - a failing source must not kill the agent
                return f"{self.source.name} failed: {exc}", got_frame
            finally:
                self._in_call = None
            now = self.clock.monotonic()
            if image is None:
                with self._cond:
                    self._caught_up_at = max(self._caught_up_at, read_started_at)
                # A folder with nothing new is normal; a camera with no frames is not.
                if self.live:
                    if self.stall_timeout_s is not None and now - last_frame_at > self.stall_timeout_s:
                        return f"{self.source.name}: no frame for {now - last_frame_at:.1f}s", got_frame
                    self._stop.wait(_LIVE_IDLE_WAIT_S)
                continue
            if not (isinstance(image, EncodedImage) and len(image) > 0) and \
                    not (isinstance(image, np.ndarray) and image.size > 0):
                return f"{self.source.name} returned {type(image).__name__}, not an image", got_frame
            last_frame_at = now
            got_frame = True
            self._publish(image, now)
        return None, got_frame

    def _publish(self, image: np.ndarray | EncodedImage, monotonic_now: float) -> None:
        captured_at = None
        if isinstance(image, EncodedImage):
            # Kept encoded: decoded (once) only if an item or the scene detector asks for its pixels.
            pixels, encoded, captured_at = None, image, image.captured_at
        else:
            # Read-only because the same array goes to every consumer (trigger
            # callback, reader, debug snapshot); an in-place edit would corrupt the others.
            image.flags.writeable = False
            pixels, encoded = image, None
        with self._cond:
            self._seq += 1
            # A source that knows when its camera took the image says so (items are bound to
            # frames by that moment); otherwise the moment it was read is the best we know.
            stamp = captured_at if captured_at is not None else self.clock.time()
            if captured_at is None:
                self._complete_until = float("inf")
            elif self._complete_until == float("inf") or self._complete_until < stamp:
                self._complete_until = stamp
            frame = Frame(pixels, stamp, self._seq, self.source.name, encoded)
            self._latest = frame
            self._history.append(frame)
            self._timeline.append((frame.seq, frame.captured_at))
            self._frame_times.append(monotonic_now)
            self._failures_in_row = 0
            self._cond.notify_all()
        if self._state is not GrabberState.OK:
            self._set_state(GrabberState.OK)
        if self.on_frame is not None:
            try:
                self.on_frame(frame)
            except Exception:  # noqa: BLE001 - a bad callback must not stop frames
                with self._cond:
                    self._callback_errors += 1
                    count = self._callback_errors
                if count == 1 or count % 100 == 0:
                    log.exception("on_frame callback failed (%d times so far)", count)

    def _close_source(self) -> None:
        if not self._is_open:
            return
        self._is_open = False
        try:
            self.source.close()
        except Exception:  # noqa: BLE001
            log.exception("closing %s failed", self.source.name)
