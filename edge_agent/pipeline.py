"""The per-item read: frame -> reader -> int8 classifier -> decision -> PostcodeRead.

No sockets, threads or files here: the agent service (agent.py) feeds it frames and
triggers and takes the PostcodeRead to the outbox. ``predict`` uses it directly.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edge_agent.decision import Decision, decide, decide_with_budget, stem_left_behind, with_row_doubt
from edge_agent.decoder import DecodePolicy, MisdirectBudget
from edge_agent.loader import Int8Classifier, LoadedModel
from edge_agent.observability import InputQuality, input_quality
from edge_agent.reader import ReaderConfig, locate_digits
from edge_agent.sortplan import SortPlan
from edge_agent.types import Frame, LocatedDigits, PostcodeRead, Reason, Trigger


@dataclass(frozen=True)
class FrameRead:
    """Everything one frame yields, independent of which item asked for it."""

    located: LocatedDigits
    decision: Decision
    model_version: str
    image_sha256: str
    error: str = ""
    seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # locate, classify, decide (for the metrics)
    quality: InputQuality | None = None  # brightness, contrast, sharpness of the frame (for drift)


@dataclass(frozen=True)
class DigitEvidence:
    """What the decision weighs: the row's marks, the classifier's labels and probabilities, and
    the doubt the row adds to them (``probabilities``)."""

    located: LocatedDigits
    labels: np.ndarray
    classified: np.ndarray  # the classifier's own probabilities, one row per digit
    seconds: tuple[float, float]  # locate, classify

    def probabilities(self, with_plan: bool) -> np.ndarray:
        """The digit probabilities the decision uses. A fragment far shorter than its row and a
        mark the reader made to fill the row are always doubted. Ink left beside a mark (the
        rest of a digit cut short) is doubted without a sort plan; with one, the directory is
        the second opinion, and only a "1" with half its own ink or more left beside it (the
        stem of a wider digit) is doubted: doubting every such mark there cost 4 points of
        sorted mail on validation envelopes (docs/MODELS.md sections 6 and 8)."""
        left_behind = self.located.left_behind
        if with_plan:
            left_behind = stem_left_behind(self.classified, left_behind)
        return with_row_doubt(self.classified, self.located.boxes, self.located.repairs, left_behind)


def digit_evidence(image: np.ndarray, classifier: Int8Classifier, reader_config: ReaderConfig) -> DigitEvidence:
    """Locate the row's digits and classify them in one batch.

    The one place this sequence lives: the agent, ``predict``, ``evaluate`` and the accuracy and
    sorting benchmarks all read through it, so a benchmark measures what a site runs.
    """
    started = time.perf_counter()
    located = locate_digits(image, reader_config)
    located_at = time.perf_counter()
    result = classifier.classify(located.digits)
    seconds = (located_at - started, time.perf_counter() - located_at)
    return DigitEvidence(located, result.labels, result.probabilities, seconds)


def image_sha256(image: np.ndarray | bytes) -> str:
    """The audit trail's link to the exact image read: SHA-256 of encoded bytes, else of the pixels.

    Bytes (a JPEG or PNG as the camera or folder delivered it) hash as they are, so
    ``sha256sum envelope.jpg`` gives the same value. Decoded pixels hash their shape's text,
    e.g. ``(480, 640, 3)``, then the C-ordered uint8 pixels.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def frame_sha256(frame: Frame, frame_hash: str = "pixels") -> str:
    """The audit hash of a frame: ``image_sha256`` of its bytes ("encoded", when it came encoded) or pixels."""
    if frame_hash == "encoded" and frame.encoded is not None:
        return frame.encoded.sha256
    return image_sha256(frame.image)


FRAME_HASHES = ("pixels", "encoded")
_CACHED_READS = 8


class PostcodeReader:
    """Reads postcodes with the current model; the model can be swapped while reads continue."""

    def __init__(self, model: LoadedModel, reader_config: ReaderConfig,
                 threshold_override: float | None = None, plan: SortPlan | None = None,
                 policy: DecodePolicy = DecodePolicy(), frame_hash: str = "pixels",
                 budget: MisdirectBudget | None = None):
        """``frame_hash``: what a frame's ``image_sha256`` is the hash of. "pixels" (the default):
        its decoded BGR pixels, as ``image_sha256(cv2.imread(path))``. "encoded": the bytes a frame
        came as (``sha256sum`` of the file), where it came encoded; the frame is then decoded
        straight to grey and never to colour. Frames that came as pixels hash their pixels.
        ``budget``: with a plan, the chute bar is spent over the recent reads (MisdirectBudget)
        instead of ``policy``'s strict one; it is reset when the model or the plan changes."""
        if frame_hash not in FRAME_HASHES:
            raise ValueError(f"frame_hash must be one of {FRAME_HASHES}, not {frame_hash!r}")
        self.frame_hash = frame_hash
        self._model = model
        self.reader_config = reader_config
        self.threshold_override = threshold_override
        self._plan = plan
        self.policy = policy
        self.budget = budget
        self._cache_lock = threading.Lock()
        # A few recent frames' reads: under a burst, items bound to the same frame share one read.
        self._cache: OrderedDict[tuple[str, int], FrameRead] = OrderedDict()
        self._reading: dict[tuple[str, int], threading.Event] = {}  # frames being read right now

    @property
    def model(self) -> LoadedModel:
        return self._model

    def swap_model(self, model: LoadedModel) -> None:
        """Atomic reference swap: reads in progress finish on the old interpreter."""
        self._model = model
        self._forget_reads()

    def _forget_reads(self) -> None:
        """A new model or plan: cached reads and the posteriors the spent bar rests on are stale."""
        with self._cache_lock:
            self._cache.clear()
        if self.budget is not None:
            self.budget.reset()

    @property
    def plan(self) -> SortPlan | None:
        return self._plan

    def swap_plan(self, plan: SortPlan | None) -> None:
        """Atomic reference swap: a read in progress is decided by the plan it started with."""
        self._plan = plan
        self._forget_reads()

    @property
    def threshold(self) -> float:
        """The bundle's threshold, or the site's override where that is stricter.

        Stricter only, also after a model swap: a new bundle with a higher threshold of its
        own must not be loosened by an override written for the old one.
        """
        own = self._model.manifest.acceptance_threshold
        return max(own, self.threshold_override) if self.threshold_override else own

    def read_image(self, image: np.ndarray, sha256: str | None = None) -> FrameRead:
        """Locate, classify (one batch) and decide on one image (``sha256``: its audit hash, if known)."""
        model, plan = self._model, self._plan  # one of each for the whole read, even across a swap
        sha = sha256 if sha256 is not None else image_sha256(image)
        evidence = digit_evidence(image, model.classifier, self.reader_config)
        decided_from = time.perf_counter()
        decision = self.decide(evidence, plan)
        located = evidence.located
        seconds = (*evidence.seconds, time.perf_counter() - decided_from)
        return FrameRead(located, decision, model.version, sha, seconds=seconds,
                         quality=input_quality(image, located.inverted))

    def decide(self, evidence: DigitEvidence, plan: SortPlan | None) -> Decision:
        """One read's decision: by ``plan`` (held to the budget's bar where one is spent), or
        digit by digit on the threshold without a plan. A read that finds a chute feeds the budget."""
        probabilities = evidence.probabilities(with_plan=plan is not None)
        if plan is None:
            return decide(evidence.labels, probabilities, self.reader_config.expected_lengths, self.threshold)
        return decide_with_budget(evidence.labels, probabilities, self.reader_config.expected_lengths,
                                  plan, self.policy, self.budget)

    def read_frame(self, frame: Frame) -> FrameRead:
        """As read_image, but a frame already read (same source and sequence) is not read again."""
        return self.read_frame_cached(frame)[0]

    def read_frame_cached(self, frame: Frame) -> tuple[FrameRead, bool]:
        """The frame's read, and whether it came from the cache (so its stage times are not new).

        Identical pixels give an identical read, so items triggered faster than the
        camera delivers frames share the work, not the result id.
        """
        key = (frame.source, frame.seq)
        while True:
            with self._cache_lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached, True
                running = self._reading.get(key)
                if running is None:
                    # This worker reads the frame; another one asking meanwhile waits for it
                    # instead of reading the same pixels again.
                    running = self._reading[key] = threading.Event()
                    break
            running.wait()  # then look in the cache again (or read it, if that read failed)
        try:
            if self.frame_hash == "encoded":
                read = self.read_image(frame.for_reading(), frame_sha256(frame, "encoded"))
            else:
                read = self.read_image(frame.image)
            with self._cache_lock:
                self._cache[key] = read
                while len(self._cache) > _CACHED_READS:
                    self._cache.popitem(last=False)
            return read, False
        finally:
            with self._cache_lock:
                del self._reading[key]
            running.set()


def postcode_read(trigger: Trigger, frame: Frame | None, read: FrameRead | None,
                  finished_at: float, model_version: str, *, review_reason: Reason | None = None) -> PostcodeRead:
    """The result for one item; with no frame or a failed read it is a review with the reason.

    ``review_reason`` forces a review whatever was read (e.g. "late": decided after the
    deadline); what was read stays in the payload for the audit trail.
    """
    result_id = uuid.uuid4().hex
    latency_ms = max(0.0, (finished_at - trigger.received_at) * 1000.0)
    timing = {"triggered_at": trigger.at, "decided_at": finished_at}
    if trigger.deadline is not None:
        timing["deadline"] = trigger.deadline
    if frame is None or read is None:
        reason = review_reason or (Reason.NO_FRAME if frame is None else Reason.BAD_FRAME)
        return PostcodeRead(result_id, trigger.item_id, "", False, 0.0, (), reason, model_version,
                            frame.captured_at if frame else 0.0, latency_ms,
                            extra=timing | ({"frame_seq": frame.seq} if frame else {}))
    d = read.decision
    accepted = d.accepted and review_reason is None
    reason = review_reason if review_reason is not None else d.reason
    return PostcodeRead(
        result_id=result_id, item_id=trigger.item_id, postcode=d.postcode, accepted=accepted,
        confidence=d.confidence, digits=d.digits, reason=reason, model_version=read.model_version,
        captured_at=frame.captured_at, latency_ms=latency_ms, image_sha256=read.image_sha256,
        extra=timing | {"frame_seq": frame.seq, "inverted": read.located.inverted} | d.plan_fields()
        | ({"detail": read.located.note} if read.located.note and not accepted else {}),
    )
