"""When to read: a PLC trigger message, a fixed interval, or a new envelope settling in view.

``parse_trigger``, ``IntervalTrigger.due`` and ``SceneChangeDetector.update`` are
pure decisions on values; the only loop here (``run_interval``) just waits and
calls them.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.types import Clock, Reason, Trigger

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIGGER_BYTES = 4096
DEFAULT_MAX_ITEM_ID_CHARS = 64
_EXAMPLE = '{"item_id": "A1234"}'


class TriggerError(ValueError):
    """A trigger message the agent cannot act on; the message says what is wrong with it."""


def parse_trigger(
    payload: bytes,
    clock: Clock,
    *,
    max_bytes: int = DEFAULT_MAX_TRIGGER_BYTES,
    max_item_id_chars: int = DEFAULT_MAX_ITEM_ID_CHARS,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    received_at: float | None = None,
) -> Trigger:
    """Parse a PLC trigger payload like {"item_id": "A1234"}; raise TriggerError for anything else.

    ``received_at`` is when the message arrived (default: the clock's now).

    ``response_topic`` and ``correlation_data`` come from the MQTT v5 message
    properties, not the payload, and are passed through to the Trigger.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TriggerError(f"trigger payload must be bytes, not {type(payload).__name__}")
    # Size first: a broker will happily deliver megabytes, and parsing them
    # would stall the trigger path.
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if size > max_bytes:
        raise TriggerError(f"trigger payload is {size} bytes; the limit is {max_bytes}")
    if size == 0:
        raise TriggerError(f"trigger payload is empty; expected JSON like {_EXAMPLE}")
    try:
        # utf-8-sig: tolerate a byte-order mark, which some PLC string blocks add.
        text = bytes(payload).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TriggerError(f"trigger payload is not UTF-8 text (bad byte at offset {exc.start})") from exc
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise TriggerError("trigger payload is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and int-too-long from huge limits
        raise TriggerError(f"trigger payload is not JSON ({exc}); expected {_EXAMPLE}") from exc
    if not isinstance(data, dict):
        raise TriggerError(f"trigger payload must be a JSON object like {_EXAMPLE}, not {type(data).__name__}")
    if "item_id" not in data:
        raise TriggerError(f"trigger payload has no item_id; expected {_EXAMPLE}")
    item_id = _item_id(data["item_id"], max_item_id_chars)
    received_at = clock.time() if received_at is None else received_at
    triggered_at, stale = None, None
    if "triggered_at" in data:
        triggered_at = _stamp(data["triggered_at"])
        if triggered_at is None:
            # The item is named, so it gets an answer; but a stamp we cannot read could
            # put its frame window anywhere, so that answer is a review, not a read.
            stale = Reason.BAD_TRIGGER
        else:
            # A stamp from the future only means the PLC's clock runs ahead of ours.
            triggered_at = min(triggered_at, received_at)
    return Trigger(
        item_id=item_id,
        received_at=received_at,
        response_topic=response_topic,
        correlation_data=correlation_data,
        triggered_at=triggered_at,
        stale=stale,
    )


def _stamp(value: object) -> float | None:
    """A PLC's ``triggered_at`` as epoch seconds, or None if it is not a plausible one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    stamp = float(value)
    # Seconds since 1970 between 2001 and 2286: a value outside is milliseconds, a
    # counter or garbage, and guessing which would bind the wrong frame.
    return stamp if math.isfinite(stamp) and 1e9 <= stamp < 1e10 else None


def response_topic_refusal(topic: str, allowed_prefix: str, own_base: str, product_prefix: str) -> str | None:
    """Why an MQTT v5 response topic must not be published to, or None if it may.

    A trigger's response topic makes the agent publish its answer wherever the sender
    asks: allowed only under the site's configured prefix, never onto the agent's own
    topics or any line's result/review/status/trigger topics.
    """
    if not allowed_prefix:
        return "response topics are not enabled (mqtt.response_topic_prefix is empty)"
    if any(c in topic for c in "+#") or not topic or len(topic) > 1024:
        return "not a valid topic name"
    # Whole topic levels: the prefix "plc" must not admit "plc-evil/...".
    levels = allowed_prefix if allowed_prefix.endswith("/") else allowed_prefix + "/"
    if not topic.startswith(levels):
        return f"outside the allowed prefix {allowed_prefix!r}"
    if topic == own_base or topic.startswith(own_base + "/"):
        return "one of the agent's own topics"
    parts = topic.split("/")
    product = product_prefix.rstrip("/").split("/")
    if parts[:len(product)] == product and len(parts) >= len(product) + 3 \
            and parts[len(product) + 2] in PRODUCT_TOPIC_KINDS:
        return "another line's topic"
    return None


PRODUCT_TOPIC_KINDS = frozenset({"trigger", "result", "review", "status", "events", "drift"})


def _item_id(value: object, max_chars: int) -> str:
    """The item id as a clean string, or TriggerError."""
    # bool is an int in Python, but `true` is never an item number.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TriggerError(f"item_id must be a string or an integer, not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise TriggerError(f"item_id must not be negative, got {value}")
        text = str(value) if value.bit_length() <= 4 * max_chars else ""
    else:
        text = value.strip()
    if not text:
        raise TriggerError("item_id is empty" if isinstance(value, str) else "item_id is too long")
    if len(text) > max_chars:
        raise TriggerError(f"item_id is {len(text)} characters; the limit is {max_chars}")
    # Ids end up in logs, SQLite and MQTT payloads: control characters would
    # break log lines and lone surrogates cannot be encoded as UTF-8 at all.
    if not text.isprintable():
        raise TriggerError("item_id contains control or unprintable characters")
    return text


class IntervalTrigger:
    """Synthetic triggers every ``period_s`` seconds (no PLC): ids like ``auto-1718000000123-7``.

    Times are monotonic seconds; the id carries the wall-clock milliseconds so
    ids stay unique across agent restarts.
    """

    def __init__(self, period_s: float, prefix: str = "auto", start_at: float | None = None) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, not {period_s}")
        self.period_s = period_s
        self.prefix = prefix
        self.count = 0
        self._next_at = start_at  # None: due at the first look

    def due(self, now: float) -> bool:
        """Whether a trigger is due at monotonic time ``now`` (no side effects)."""
        return self._next_at is None or now >= self._next_at

    def seconds_until_due(self, now: float) -> float:
        """How long to wait from ``now`` until the next trigger is due (0 if it is due)."""
        return 0.0 if self._next_at is None else max(0.0, self._next_at - now)

    def fire(self, now: float, wall_time: float) -> Trigger:
        """Make the next trigger and schedule the one after it."""
        self.count += 1
        base = now if self._next_at is None else self._next_at
        # Keep a steady cadence, but after a long stall start afresh rather
        # than firing a burst of catch-up triggers.
        self._next_at = base + self.period_s if now - base < self.period_s else now + self.period_s
        return Trigger(item_id=f"{self.prefix}-{int(wall_time * 1000)}-{self.count}", received_at=wall_time)

    def poll(self, clock: Clock) -> Trigger | None:
        """A trigger if one is due now, else None."""
        now = clock.monotonic()
        return self.fire(now, clock.time()) if self.due(now) else None


def run_interval(
    trigger: IntervalTrigger,
    clock: Clock,
    emit: Callable[[Trigger], None],
    stop: threading.Event,
) -> None:
    """Call ``emit`` with each interval trigger until ``stop`` is set (run it on its own thread)."""
    while not stop.is_set():
        fired = trigger.poll(clock)
        if fired is not None:
            try:
                emit(fired)
            except Exception:  # noqa: BLE001 - one failed hand-off must not end interval mode
                log.exception("emitting interval trigger %s failed", fired.item_id)
        stop.wait(max(trigger.seconds_until_due(clock.monotonic()), 0.001))


class SceneState(str, enum.Enum):
    STARTING = "starting"  # no motion seen since the first frame
    MOTION = "motion"
    STILL = "still"


def small_grey(image: np.ndarray, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Downscale to ``size`` (width, height) greyscale float32: cheap to compare, blind to sensor noise."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected a 2-D or 3-D image array, got {getattr(image, 'shape', type(image).__name__)}")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        elif image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        else:
            image = image[:, :, 0]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)


def changed_fraction(a: np.ndarray, b: np.ndarray, pixel_threshold: float) -> float:
    """Fraction of pixels that differ by more than ``pixel_threshold`` grey levels.

    The mean brightness difference is removed first, so a camera's
    auto-exposure stepping up or down does not look like a new envelope.
    """
    diff = a - b
    diff -= float(diff.mean())
    return float(np.count_nonzero(np.abs(diff) > pixel_threshold)) / diff.size


@dataclass(frozen=True)
class SceneSettings:
    """Tuning for SceneChangeDetector; defaults suit a fixed camera over the postcode field."""

    size: tuple[int, int] = (64, 48)  # (width, height) the frames are compared at
    pixel_threshold: float = 20.0  # grey levels a pixel must change by to count as changed
    # Two envelopes that differ in one handwritten digit differ in only ~0.5% of
    # the pixels at 64x48 while sensor noise changes none, so both fractions are
    # small. Erring low costs a duplicate read; erring high loses an envelope.
    motion_fraction: float = 0.002  # changed pixels vs the still-run anchor that mean "moving"
    change_fraction: float = 0.003  # changed pixels vs the last settled scene that mean "new envelope"
    # If the view changed this much from the last settled scene at any moment of
    # the motion, the old envelope left: whatever settles is a new item, even
    # a look-alike (same printed label, same stop position).
    swap_fraction: float = 0.3
    settle_frames: int = 3  # still frames in a row before the scene counts as settled
    min_still_s: float = 0.0  # and at least this long still (makes settling fps-independent)

    def __post_init__(self) -> None:
        if self.settle_frames < 1:
            raise ValueError("settle_frames must be at least 1")
        if not 0 <= self.motion_fraction <= self.change_fraction < 1:
            # A swap too small to count as motion would be absorbed into the
            # still run and never compared: that envelope would not be read.
            raise ValueError(
                f"need 0 <= motion_fraction ({self.motion_fraction}) <= change_fraction ({self.change_fraction}) < 1"
            )
        if not self.change_fraction <= self.swap_fraction <= 1:
            raise ValueError(f"need change_fraction <= swap_fraction ({self.swap_fraction}) <= 1")
        if min(self.size) < 8:
            raise ValueError(f"size {self.size} is too small to tell envelopes apart")


class SceneChangeDetector:
    """Say True once per new envelope settling under the camera, never while the scene stays still.

    Feed every frame to ``update``. Motion starts when a frame differs from the
    first frame of the current still run; the scene has settled after
    ``settle_frames`` still frames. A settled scene triggers only if it differs
    from the previous settled scene (or the motion changed most of the view,
    so the old envelope left) and from the empty background (if set).
    Comparing with the previous *settled* scene (not only the last triggered
    one) means an empty belt between two look-alike envelopes still resets it,
    and slow drift of one envelope never adds up to a second read.
    """

    def __init__(self, settings: SceneSettings = SceneSettings(), background: np.ndarray | None = None) -> None:
        self.settings = settings
        self.state = SceneState.STARTING
        self.triggers = 0
        self.last_diff = 0.0
        self._background: np.ndarray | None = None
        self._anchor: np.ndarray | None = None  # first frame of the current still run
        self._still_frames = 0
        self._still_since = 0.0
        self._reference: np.ndarray | None = None  # the last settled scene
        self._peak_change = 0.0  # largest change vs the reference during this motion
        if background is not None:
            self.set_background(background)

    def set_background(self, image: np.ndarray | None) -> None:
        """Remember what the empty view looks like (None forgets it); settling on it never triggers."""
        self._background = None if image is None else small_grey(image, self.settings.size)

    def _differs(self, a: np.ndarray, b: np.ndarray | None) -> bool:
        if b is None:
            return True
        return changed_fraction(a, b, self.settings.pixel_threshold) > self.settings.change_fraction

    def update(self, image: np.ndarray, now: float) -> bool:
        """Feed one frame (any size, BGR or grey) seen at monotonic ``now``; True means read this item."""
        s = self.settings
        small = small_grey(image, s.size)
        if self._anchor is None:
            self._anchor, self._still_frames, self._still_since = small, 1, now
            return False
        self.last_diff = changed_fraction(small, self._anchor, s.pixel_threshold)
        if self.last_diff > s.motion_fraction:
            if self.state is not SceneState.MOTION:
                self._peak_change = 0.0
            self.state = SceneState.MOTION
            if self._reference is not None:
                self._peak_change = max(self._peak_change, changed_fraction(small, self._reference, s.pixel_threshold))
            self._anchor, self._still_frames, self._still_since = small, 1, now
            return False
        self._still_frames += 1
        if self.state is SceneState.STILL:
            return False
        if self._still_frames < s.settle_frames or now - self._still_since < s.min_still_s:
            return False
        # Settled. Still since start-up means nothing arrived: the scene is just
        # the reference (an envelope moving in at start-up does trigger).
        was_starting = self.state is SceneState.STARTING
        self.state = SceneState.STILL
        left = self._peak_change >= s.swap_fraction
        is_new = (left or self._differs(small, self._reference)) and self._differs(small, self._background)
        self._reference = small
        if was_starting or not is_new:
            return False
        self.triggers += 1
        return True
