"""Value types and stage interfaces shared by the agent's pipeline stages."""

from __future__ import annotations

import enum
import time as _time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Frame:
    """One camera image (BGR or greyscale uint8) with when and where it was captured.

    A frame from a source that delivers encoded images (image files, MJPEG) keeps the bytes in
    ``encoded`` and is decoded only when ``image`` is first asked for, then kept: a frame no item
    reads is never decoded. ``encoded`` is anything with ``data`` (the bytes), ``sha256`` and
    ``decode(grey=False)`` (``edge_agent.sources.EncodedImage``). Immutable, like the value it is.
    """

    __slots__ = ("captured_at", "seq", "source", "encoded", "_pixels")

    def __init__(self, image: np.ndarray | None = None, captured_at: float = 0.0, seq: int = 0,
                 source: str = "", encoded: Any = None) -> None:
        if image is None and encoded is None:
            raise ValueError("a frame needs its pixels or its encoded bytes")
        set_ = object.__setattr__
        set_(self, "captured_at", captured_at)  # wall-clock seconds since the epoch
        set_(self, "seq", seq)  # increases by one per frame the source delivered
        set_(self, "source", source)
        set_(self, "encoded", encoded)
        set_(self, "_pixels", image)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Frame is immutable: cannot set {name}")

    @property
    def image(self) -> np.ndarray:
        """The pixels as the source gives them (BGR, or grey for grey images); decoded on first use."""
        pixels = self._pixels
        if pixels is None:
            # Two threads asking at once both get the encoded image's one cached decode.
            pixels = self.encoded.decode()
            object.__setattr__(self, "_pixels", pixels)
        return pixels

    def for_reading(self) -> np.ndarray:
        """The pixels a reader that works in grey needs, cheapest first.

        Colour or grey pixels already decoded as they are; else the bytes decoded straight to
        grey (a JPEG's luma plane: no colour conversion, a third of the memory).
        """
        if self._pixels is None and self.encoded is not None:
            return self.encoded.decode(grey=True)
        return self.image

    @property
    def decoded(self) -> bool:
        """Whether the pixels exist yet (always, for a frame that came as pixels)."""
        return self._pixels is not None or bool(getattr(self.encoded, "decoded", False))

    def __repr__(self) -> str:
        kind = "encoded" if self.encoded is not None else "pixels"
        return f"Frame(seq={self.seq}, source={self.source!r}, captured_at={self.captured_at}, {kind})"


@dataclass(frozen=True)
class LocatedDigits:
    """What the OpenCV reader found in a frame: MNIST-style digit crops, left to right."""

    digits: np.ndarray  # (N, 28, 28) uint8, white ink on black, centred by centre of mass
    boxes: tuple[tuple[int, int, int, int], ...]  # (x, y, w, h) in frame pixels, per digit
    inverted: bool = False  # True when the frame was light ink on a dark background
    note: str = ""  # why nothing was found, for the review reason's detail
    # Per digit, how the reader mended the row to make it ("" = a mark as found; "split",
    # "split_to_count", "recovered", "merged"): evidence the decision weighs.
    repairs: tuple[str, ...] = ()
    scale: float = 1.0  # working pixels per frame pixel (frames beyond reader.max_side are shrunk first)
    left_behind: tuple[float, ...] = ()  # per digit: ink beside it that no mark took, as a share of its own


class Reason(str, enum.Enum):
    """Why a read went to human review instead of the sorting machine."""

    DIGIT_COUNT = "digit_count"
    LOW_CONFIDENCE = "low_confidence"
    NO_POSTCODE = "no_postcode"
    BAD_FRAME = "bad_frame"
    NO_FRAME = "no_frame"  # no frame was captured within the item's window
    LATE = "late"  # it could not be answered within the line's decision budget
    AGENT_RESTART = "agent_restart"  # its trigger arrived before a crash or while the agent was down
    SURGE = "surge"  # triggers arrived faster than envelopes can pass the camera: their moment is unknown
    BAD_TRIGGER = "bad_trigger"  # the trigger named the item but carried a value the agent cannot trust
    INVALID_POSTCODE = "invalid_postcode"  # most likely written code is not in the site's sort plan
    AMBIGUOUS = "ambiguous"  # no chute is probable enough for the target misdirect rate


@dataclass(frozen=True)
class DigitRead:
    digit: int
    confidence: float


@dataclass(frozen=True)
class Trigger:
    """A request to read the item now under the camera.

    ``triggered_at`` is when the item was under the camera: the PLC's own stamp when it
    sends one, else when the agent received the trigger. The item's frame window and its
    deadline are measured from it, never from when a reader happens to be free.
    """

    item_id: str
    received_at: float  # wall-clock seconds when the agent received it
    response_topic: str | None = None  # MQTT v5: where the PLC wants the answer
    correlation_data: bytes | None = None
    triggered_at: float | None = None  # the PLC's stamp (wall-clock seconds), if it sent one
    deadline: float | None = None  # answer by then or answer "late"; set when the trigger is taken in
    # Known before any frame is looked at: this trigger can only be answered as review for this
    # reason (it arrived in a replayed backlog, or was journaled before a crash).
    stale: Reason | None = None

    @property
    def at(self) -> float:
        """When the item was under the camera (the start of its frame window)."""
        return self.triggered_at if self.triggered_at is not None else self.received_at


@dataclass(frozen=True)
class PostcodeRead:
    """The decision for one item: what goes to the sorting machine or to review."""

    result_id: str
    item_id: str
    postcode: str
    accepted: bool
    confidence: float
    digits: tuple[DigitRead, ...]
    reason: Reason | None
    model_version: str
    captured_at: float
    latency_ms: float
    image_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The JSON body published to MQTT (and stored in the outbox)."""
        return {
            "result_id": self.result_id,
            "item_id": self.item_id,
            "postcode": self.postcode,
            "accepted": self.accepted,
            "confidence": round(self.confidence, 5),
            "digits": [{"digit": d.digit, "confidence": round(d.confidence, 5)} for d in self.digits],
            "reason": self.reason.value if self.reason else None,
            "model_version": self.model_version,
            "captured_at": self.captured_at,
            "latency_ms": round(self.latency_ms, 3),
            "image_sha256": self.image_sha256,
            **self.extra,
        }


@dataclass(frozen=True)
class TriggerMessage:
    """A trigger as the MQTT link received it, before it is parsed or acknowledged."""

    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    received_at: float  # wall-clock seconds
    ack_token: Any  # hand back to the link's ack() once the trigger is journaled
    # Delivered from the session's backlog (queued at the broker while the agent was away)
    # or retained: its envelope has long passed the camera.
    replayed: bool = False
    first_connection: bool = True  # on this process's first broker connection
    since_reconnect_s: float | None = None  # seconds since a reconnect after a lost connection


class FrameSource(Protocol):
    """A camera, stream, file or folder that yields frames; ``read`` returns None when it has none."""

    name: str

    def open(self) -> None: ...

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock; tests pass their own."""

    def time(self) -> float:
        return _time.time()

    def monotonic(self) -> float:
        return _time.monotonic()


@dataclass(frozen=True)
class Check:
    """One health or readiness check: whether it passes and, if not, why (a site engineer's words)."""

    ok: bool
    detail: str = ""
