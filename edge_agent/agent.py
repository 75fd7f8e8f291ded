"""The agent service: triggers in, frames grabbed, postcodes read, results into the outbox.

``Agent`` receives every collaborator (reader, frame grabber, MQTT link, outbox, review
store, clock); ``build_agent`` wires them from the one config object. Start-up is a flat
list of steps so an engineer can read what runs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_agent.binding import (FRAME_DROPPED, FrameWindow, SurgeGuard, bind_frame, timeline_complete_until,
                                too_late_to_read)
from edge_agent import chute_bar
from edge_agent.bundle import BundleError
from edge_agent.config import AgentConfig, mqtt_password, security_warnings
from edge_agent.decision import chance_wrong
from edge_agent.endpoints import EndpointServer, make_app
from edge_agent.grabber import BindingView, FrameGrabber
from edge_agent.liveness import Heartbeats, verdict
from edge_agent.loader import load_bundle
from edge_agent.metrics import STAGES, AgentMetrics, RateWindow, SnapshotCollector, SystemProbe, ThreadCpuCollector
from edge_agent.observability import DriftMonitor, ObservedRead, Reference, TrainingBaseline
from edge_agent.mqtt import MqttLink, MqttSettings, TlsSettings
from edge_agent.outbox import Answer, Journaled, JournalOutcome, Outbox, OutboxError, OutgoingMessage
from edge_agent.pipeline import FrameRead, PostcodeReader, postcode_read
from edge_agent.reader import ReaderConfig
from edge_agent.review import ReviewStore, crops_strip_png
from edge_agent.signals import StopSignal
from edge_agent.decoder import DecodePolicy, misdirect_budget
from edge_agent.sortplan import SortPlanError, load_sort_plan
from edge_agent.sdnotify import Notifier
from edge_agent.threads import name_os_threads, thread_cpu_seconds
from edge_agent.sources import SourceError, decode_image, open_source, redact_url
from edge_agent.triggers import (IntervalTrigger, SceneChangeDetector, SceneSettings, TriggerError,
                                 parse_trigger, response_topic_refusal, run_interval)
from edge_agent.types import (Check, Clock, Frame, PostcodeRead, Reason, SystemClock, Trigger,
                              TriggerMessage)

log = logging.getLogger(__name__)


class DeferredSource:
    """A frame source built on first open, so a camera path that is missing at start-up is retried."""

    def __init__(self, spec: str, loop: bool):
        self.name = redact_url(spec)  # a camera URL may carry a password
        self._spec, self._loop = spec, loop
        self._inner: Any = None
        self.live = True  # the grabber re-reads this after each open

    def open(self) -> None:
        if self._inner is None:
            self._inner = open_source(self._spec, loop=self._loop)  # raises SourceError
            self.live = bool(getattr(self._inner, "live", True))
        self._inner.open()

    def read(self) -> np.ndarray | None:
        if self._inner is None:
            raise SourceError(f"camera {self.name} is not open")
        return self._inner.read()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    @property
    def bad_frames(self) -> int:
        """Files or frames the source skipped because they could not be decoded."""
        return int(getattr(self._inner, "bad_files", 0) or 0)


@dataclass
class AgentCounters:
    triggers: int = 0
    bad_triggers: int = 0
    reads: int = 0
    accepted: int = 0
    reviews: int = 0
    read_errors: int = 0
    repeats: int = 0  # an item_id answered before: the stored answer was sent again
    duplicates: int = 0  # an item_id whose earlier trigger was still being answered
    recovered: int = 0  # journaled triggers found unanswered at start-up
    refused_response_topics: int = 0
    journal_failures: int = 0
    store_failures: int = 0
    bad_frames: int = 0
    crops_skipped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Item:
    """One item on its way from trigger to stored answer."""

    trigger: Trigger
    journal_id: int | None
    frame: Frame | None = None


@dataclass
class _Answer:
    result: PostcodeRead
    item: _Item
    read: FrameRead | None
    first_of_frame: bool = True  # False when an earlier item already read the same frame


# What one read is assumed to take before any was timed; a read that would end past the
# deadline is not started (the item is answered "late" at once instead).
_FIRST_READ_ESTIMATE_S = 0.05
_BATCH = 500  # triggers journaled, or answers stored, per transaction under a burst
_MAX_QUEUED_CROPS = 1000  # review crops waiting for the disk; past this they are skipped and counted
_CAMERA_SILENT_S = 5.0  # /readyz: a live camera silent this long is not delivering frames
_PRUNE_EVERY_S = 600.0  # the audit trail's retention is days: pruning every few minutes is plenty
# The spent chute bar's posteriors are written this often (and at a stop): a crash loses at most
# this long's reads of a window that spans minutes to hours of mail.
_KEEP_CHUTE_BAR_EVERY_S = 10.0


class Agent:
    """Turns triggers into stored answers: exactly one per trigger, about its own frame, in time.

    Stages, each on its own thread(s), joined by queues:
    intake (paho thread: parse, bind the frame at the trigger time) -> journal (SQLite, then
    PUBACK) -> binder (items still waiting for a frame in their window) -> readers -> store
    (answer and journal row in one transaction) -> the MQTT link's delivery loop.
    """

    def __init__(self, config: AgentConfig, reader: PostcodeReader, grabber: FrameGrabber | None,
                 link: MqttLink, outbox: Outbox, review: ReviewStore, clock: Clock):
        self.config = config
        self.reader = reader
        self.grabber = grabber
        self.link = link
        self.outbox = outbox
        self.review = review
        self.clock = clock
        self.counters = AgentCounters()
        self.window = FrameWindow(config.camera.max_frame_age_ms / 1000.0, config.camera.frame_wait_ms / 1000.0,
                                  after_only=config.camera.wait_after_trigger)
        self.budget_s = config.trigger.decision_budget_ms / 1000.0
        self.stopping = threading.Event()  # no new triggers from interval/scene producers
        self._shutdown = threading.Event()  # every stage thread ends
        self._intake: queue.Queue[tuple[Trigger, Any, Frame | None]] = queue.Queue()
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._answers: queue.Queue[_Answer] = queue.Queue()
        self._crops: queue.Queue[tuple[PostcodeRead, Any]] = queue.Queue(maxsize=_MAX_QUEUED_CROPS)
        self._waiting: list[_Item] = []
        self._waiting_lock = threading.Lock()
        # Set while _waiting holds items: with none, the binder sleeps instead of waking for
        # every camera frame (at 200 fps those wake-ups slowed the reads on a shared core).
        self._items_waiting = threading.Event()
        self._outstanding = 0  # triggers taken in whose answer is not stored yet
        self._outstanding_cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._heartbeats = Heartbeats(self.clock.monotonic)
        self._plan_stamp: tuple[int, ...] | None = None  # the sort plan file's (mtime, size, inode) last loaded
        self._plan_errors: list[str] = []
        self._latencies_ms: list[float] = []
        self._counter_lock = threading.Lock()
        self._read_estimate_s = _FIRST_READ_ESTIMATE_S
        self._surge = SurgeGuard(config.trigger.surge_rate_per_s)  # only the paho thread uses it
        self._bad_frames_seen = 0
        self.metrics = AgentMetrics()
        self.metrics.model.info({"version": reader.model.version, "name": reader.model.manifest.name})
        self.endpoint: EndpointServer | None = None
        self._system = SystemProbe(config.outbox.path.parent)
        self._system_figures: dict[str, Any] = {}
        self._rates = RateWindow(60.0)
        self._stage_samples = {stage: deque(maxlen=1000) for stage in (*STAGES, "trigger_to_result")}
        self._last_trigger_at: float | None = None  # clock.monotonic()
        self._last_answer_at: float | None = None
        self._read_events = _TokenBucket(config.observability.read_events_per_s)
        self.drift = DriftMonitor(config.observability, TrainingBaseline.from_manifest(reader.model.manifest.raw),
                                  model_version=reader.model.version)
        self._drift_lock = threading.Lock()
        self._drift_published: tuple[str, ...] | None = None  # alarm kinds last published (retained)
        self._reference_path = config.outbox.path.parent / f"reference-{_safe_name(reader.model.version)}.json"
        self._chute_bar_path = config.outbox.path.parent / "chute-bar.json"
        self._chute_bar_kept_at = 0  # the budget's count of reads observed when the bar was last written
        self._restore_reference()
        # model.bundle may be the sync's "active" pointer (a symlink): followed between frames.
        self._bundle_target = config.model.bundle.resolve()
        # Last: registering takes a first snapshot, which needs everything above.
        self.metrics.registry.register(SnapshotCollector(self.health))
        self.metrics.registry.register(ThreadCpuCollector(thread_cpu_seconds))

    # -- intake ---------------------------------------------------------------

    def on_mqtt_trigger(self, message: TriggerMessage) -> None:
        """Called on paho's thread: parse, fix the item's time and frame, hand to the journal."""
        cfg = self.config
        try:
            trigger = parse_trigger(message.payload, self.clock, max_bytes=cfg.trigger.max_payload_bytes,
                                    response_topic=message.response_topic,
                                    correlation_data=message.correlation_data, received_at=message.received_at)
        except TriggerError as exc:
            with self._counter_lock:
                self.counters.bad_triggers += 1
            self.metrics.bad_triggers.inc()
            log.error("rejected trigger: %s", exc)
            self._report_error("bad_trigger", {"error": str(exc),
                                              "payload_bytes": len(message.payload)})
            self.link.ack(message.ack_token)  # nothing to answer: no item was named
            return
        if trigger.response_topic is not None:
            refusal = response_topic_refusal(trigger.response_topic, cfg.mqtt.response_topic_prefix,
                                             cfg.topic_base, cfg.mqtt.topic_prefix)
            if refusal is not None:
                with self._counter_lock:
                    self.counters.refused_response_topics += 1
                log.error("item %s: not replying on response topic %r: %s", trigger.item_id,
                          trigger.response_topic, refusal)
                self._report_error("response_topic_refused", {"item_id": trigger.item_id,
                                                  "topic": trigger.response_topic, "error": refusal})
                trigger = replace(trigger, response_topic=None, correlation_data=None)
        stale = trigger.stale or self._stale_reason(message, trigger)
        self._take_in(replace(trigger, stale=stale), message.ack_token)

    def _report_error(self, kind: str, fields: dict[str, Any]) -> None:
        """An error event on MQTT (events/error) and a count in /metrics, for every kind of error."""
        self.metrics.error(kind)
        self.link.publish_event("error", {"kind": kind, **fields})

    def _stale_reason(self, message: TriggerMessage, trigger: Trigger) -> Reason | None:
        """A reason to answer without reading, when the trigger's time cannot be trusted."""
        if trigger.triggered_at is not None:
            return None  # stamped by the PLC: its window and deadline are known exactly
        if message.replayed:
            # Queued at the broker while we were away: its envelope has passed the camera.
            return Reason.AGENT_RESTART if message.first_connection else Reason.LATE
        guard_s = self.config.trigger.reconnect_guard_ms / 1000.0
        if message.since_reconnect_s is not None and message.since_reconnect_s < guard_s:
            # Just after a broker outage the PLC may be flushing triggers it buffered: sent
            # seconds ago, they would be read from a later envelope's frame.
            return Reason.LATE
        if self._surge.surging(self.clock.monotonic()):
            # A flood queues at the broker and in our socket: a trigger taken in now may have
            # been sent a second ago, and "now" shows a later envelope.
            return Reason.SURGE
        return None

    def submit(self, trigger: Trigger, frame: Frame | None = None) -> None:
        """Take in a trigger made on site (interval, scene change); ``frame`` if it is already known."""
        self._take_in(trigger, None, frame, source=self.config.trigger.mode)

    def _take_in(self, trigger: Trigger, ack_token: Any, frame: Frame | None = None, source: str = "mqtt") -> None:
        trigger = replace(trigger, deadline=trigger.at + self.budget_s)
        if frame is None and trigger.stale is None:
            frame = self._frame_in_window(trigger)  # now, while the history still holds it
            if frame is FRAME_DROPPED:
                trigger, frame = replace(trigger, stale=Reason.LATE), None
        with self._outstanding_cond:
            # One step with stop()'s: a site-made trigger is either counted before the stop
            # began (and answered before the agent exits) or not taken in at all. MQTT
            # triggers are held back by the link (close_intake), unacknowledged.
            if ack_token is None and self.stopping.is_set():
                log.warning("item %s: triggered on site while stopping; not taken in", trigger.item_id)
                return
            self._outstanding += 1
        self.metrics.count_trigger(source)
        self._last_trigger_at = self.clock.monotonic()
        with self._counter_lock:
            self.counters.triggers += 1
        self._intake.put((trigger, ack_token, frame))

    def on_frame(self, detector: SceneChangeDetector):
        """A grabber callback that triggers a read when a new envelope settles under the camera."""
        def check(frame: Frame) -> None:
            if self.stopping.is_set():
                return
            if detector.update(frame.image, self.clock.monotonic()):
                now = self.clock.time()
                self.submit(Trigger(item_id=f"scene-{int(now * 1000)}-{detector.triggers}", received_at=now),
                            frame)
        return check

    def _frame_in_window(self, trigger: Trigger):
        """The item's frame, None while it is not captured yet, or FRAME_DROPPED if it was let go."""
        if self.grabber is None:
            return None
        view = self.grabber.binding_view()
        return bind_frame(view.history, view.timeline, trigger.at, self.window, self._complete_until(view))

    def _complete_until(self, view: BindingView) -> float:
        """Up to when the view's timeline holds every frame taken (binding.timeline_complete_until)."""
        return timeline_complete_until(view.newest_stamp, view.caught_up_at, self.window)

    # -- journal: durable before acknowledged -----------------------------------

    def _journal_loop(self) -> None:
        while not self._shutdown.is_set():
            self._beat()
            batch = _take_batch(self._intake, _BATCH)
            if not batch:
                continue
            triggers = [t for t, _token, _frame in batch]
            try:
                outcomes = self.outbox.journal_triggers(triggers, self.config.trigger.dedup_window_s,
                                                        self.config.topic("result"))
            except (OutboxError, ValueError) as exc:
                # Still answer them (nothing is lost while this process lives); say so loudly.
                log.error("could not journal %d trigger(s): %s", len(batch), exc)
                with self._counter_lock:
                    self.counters.journal_failures += len(batch)
                self._report_error("journal_failed", {"error": str(exc),
                                                  "triggers": len(batch)})
                outcomes = [Journaled(JournalOutcome.NEW) for _ in batch]
            for (trigger, _token, frame), outcome in zip(batch, outcomes):
                if outcome.outcome is JournalOutcome.NEW:
                    self._schedule(_Item(trigger, outcome.journal_id, frame))
                    continue
                if outcome.outcome is JournalOutcome.ANSWERED and outcome.earlier_answer is not None:
                    self._answer_again(trigger, outcome.earlier_answer)
                else:
                    with self._counter_lock:
                        self.counters.duplicates += 1
                self._settled(1)
            for _trigger, token, _frame in batch:
                if token is not None:
                    self.link.ack(token)

    def _answer_again(self, trigger: Trigger, payload: bytes) -> None:
        """The same item asked again: the same stored answer (same result_id), never a second read."""
        with self._counter_lock:
            self.counters.repeats += 1
        self.metrics.repeats.inc()
        try:
            stored = json.loads(payload)
            audit = {"result_id": stored.get("result_id"), "item_id": trigger.item_id, "repeat": True}
            self.link.submit(payload, audit, expires_at=self.clock.time() + self.config.mqtt.result_expiry_s,
                             response_topic=trigger.response_topic, correlation_data=trigger.correlation_data)
        except (OutboxError, ValueError) as exc:
            log.error("could not send item %s its earlier answer again: %s", trigger.item_id, exc)

    # -- binding: each item's own frame ---------------------------------------------

    def _schedule(self, item: _Item) -> None:
        if item.trigger.stale is not None:
            self._answer_unread(item, item.trigger.stale)
            return
        if item.frame is None:
            frame = self._frame_in_window(item.trigger)
            if frame is FRAME_DROPPED:
                self._answer_unread(item, Reason.LATE, error=_DROPPED_DETAIL)
                return
            item.frame = frame
        if item.frame is not None:
            self.record_stage("wait_frame", 0.0)
            self._ready.put(item)
            return
        with self._waiting_lock:
            self._waiting.append(item)
            self._items_waiting.set()

    def _bind_loop(self) -> None:
        """Give waiting items the first frame captured in their window, or answer them when it closes."""
        seq = self.grabber.last_seq if self.grabber is not None else 0
        while not self._shutdown.is_set():
            self._beat()
            if not self._items_waiting.wait(0.2):
                continue
            if self.grabber is not None:
                seq = self.grabber.wait_for_new(seq, 0.02)
            else:
                self._shutdown.wait(0.02)
            with self._waiting_lock:
                waiting, self._waiting = self._waiting, []
                self._items_waiting.clear()
            if not waiting:
                continue
            if self.grabber is not None:
                view = self.grabber.binding_view()
                history, timeline, complete_until = view.history, view.timeline, self._complete_until(view)
            else:
                history, timeline, complete_until = [], None, float("inf")
            now = self.clock.time()
            still: list[_Item] = []
            for item in waiting:
                frame = bind_frame(history, timeline, item.trigger.at, self.window, complete_until)
                if frame is FRAME_DROPPED:
                    self._answer_unread(item, Reason.LATE, error=_DROPPED_DETAIL)
                elif frame is not None:
                    item.frame = frame
                    self.record_stage("wait_frame", now - item.trigger.received_at)
                    self._ready.put(item)
                elif now >= item.trigger.deadline:
                    self._answer_unread(item, Reason.LATE)
                elif now > self.window.closes_at(item.trigger.at):
                    self._answer_unread(item, Reason.NO_FRAME)
                else:
                    still.append(item)
            with self._waiting_lock:
                self._waiting[:0] = still
                if self._waiting:
                    self._items_waiting.set()

    # -- reading -----------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._shutdown.is_set():
            self._beat()
            try:
                item = self._ready.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._read_item(item)
            except Exception as exc:  # never leave an item unanswered
                log.exception("reading item %s failed", item.trigger.item_id)
                self._answer_unread(item, Reason.BAD_FRAME, error=str(exc))

    def _read_item(self, item: _Item) -> None:
        trigger, frame = item.trigger, item.frame
        assert frame is not None and trigger.deadline is not None
        if too_late_to_read(self.clock.time(), trigger.deadline, self._read_estimate_s):
            self._answer_unread(item, Reason.LATE, frame=frame)
            return
        started = self.clock.monotonic()
        read: FrameRead | None = None
        cached = False
        try:
            read, cached = self.reader.read_frame_cached(frame)
            if not cached:
                for stage, seconds in zip(("locate", "classify", "decide"), read.seconds):
                    self.record_stage(stage, seconds)
        except Exception as exc:  # a frame we cannot read must not stop the line
            log.exception("reading frame %s failed", frame.seq)
            with self._counter_lock:
                self.counters.read_errors += 1
            self._report_error("read_failed", {"item_id": trigger.item_id,
                                              "error": str(exc)})
        took = self.clock.monotonic() - started
        # Cached reads (items sharing a frame) take no time, fresh ones several ms: the
        # average is what the next read will likely cost.
        self._read_estimate_s = max(0.8 * self._read_estimate_s + 0.2 * took, 0.005)
        finished = self.clock.time()
        late = Reason.LATE if finished > trigger.deadline else None
        result = postcode_read(trigger, frame, read, finished, self.reader.model.version, review_reason=late)
        self._answers.put(_Answer(result, item, read, first_of_frame=not cached))

    def _answer_unread(self, item: _Item, reason: Reason, *, frame: Frame | None = None, error: str = "") -> None:
        result = postcode_read(item.trigger, frame, None, self.clock.time(), self.reader.model.version,
                               review_reason=reason)
        if error:
            result = replace(result, extra=result.extra | {"detail": error})
        self._answers.put(_Answer(result, item, None))

    # -- storing: the answer and its journal row together ------------------------------

    def _store_loop(self) -> None:
        while not self._shutdown.is_set():
            self._beat()
            batch = _take_batch(self._answers, _BATCH)
            if not batch:
                continue
            records = [self._answer_record(a) for a in batch]
            while True:
                try:
                    self.outbox.record_answers(records)
                    break
                except (OutboxError, ValueError) as exc:
                    with self._counter_lock:
                        self.counters.store_failures += 1
                    log.error("could not store %d answer(s): %s; retrying", len(batch), exc)
                    self._report_error("store_failed", {"error": str(exc),
                                                      "items": [a.item.trigger.item_id for a in batch][:20]})
                    self._beat()  # failing, not stuck: a restart would not make the disk writable
                    if self._shutdown.wait(1.0):
                        log.error("stopping with %d answer(s) unstored: %s", len(batch),
                                  [a.item.trigger.item_id for a in batch])
                        return
            stored_at = self.clock.time()
            for answer in batch:
                self.record_stage("store", stored_at - answer.result.extra.get("decided_at", stored_at))
                self.record_stage("trigger_to_result", stored_at - answer.item.trigger.at)
                self._after_store(answer)
            self._settled(len(batch))

    def _answer_record(self, answer: _Answer) -> Answer:
        result, trigger = answer.result, answer.item.trigger
        payload_dict = result.to_payload()
        payload = json.dumps(payload_dict, separators=(",", ":")).encode()
        audit = {
            "result_id": result.result_id, "item_id": result.item_id, "postcode": result.postcode,
            "accepted": result.accepted, "reason": payload_dict["reason"],
            "digits": payload_dict["digits"], "model_version": result.model_version,
            "image_sha256": result.image_sha256, "captured_at": result.captured_at,
            "triggered_at": trigger.at, "deadline": trigger.deadline,
        }
        expires_at = self.clock.time() + self.config.mqtt.result_expiry_s
        messages = [OutgoingMessage(self.config.topic("result"), payload, self.link.settings.result_qos,
                                    expires_at)]
        if trigger.response_topic:
            messages.append(OutgoingMessage(trigger.response_topic, payload, self.link.settings.result_qos,
                                            expires_at, trigger.correlation_data))
        if _worth_a_look(result, answer.read):
            messages.append(OutgoingMessage(self.config.topic("review"), payload, 1, None))
        return Answer(answer.item.journal_id, result.result_id, result.item_id, tuple(messages), audit)

    def _after_store(self, answer: _Answer) -> None:
        result = answer.result
        reason = result.reason.value if result.reason is not None else None
        self.metrics.count_answer(result.accepted, reason,
                                  chance_wrong(result.extra.get("chute_confidence"), result.confidence))
        now = self.clock.monotonic()
        self._last_answer_at = now
        self._rates.add(now, result.accepted, reason)
        if answer.read is not None and self._read_events.take(now):
            self._publish_read(result, answer.read)
        if answer.first_of_frame:
            # One observation per image: a burst of items sharing one frame would otherwise
            # fill the window (and the site's reference) with copies of a few envelopes.
            self._observe(result, answer.read, now)
        if _worth_a_look(result, answer.read):
            # Crops are for labelling, best effort and off the answer path: under a burst the
            # disk writes would otherwise hold back the answers queued behind them.
            try:
                self._crops.put_nowait((result, answer.read.located))
            except queue.Full:
                with self._counter_lock:
                    self.counters.crops_skipped += 1
        with self._counter_lock:
            c = self.counters
            c.reads += answer.read is not None
            c.accepted += result.accepted
            c.reviews += not result.accepted
            if reason is not None:
                c.by_reason[reason] = c.by_reason.get(reason, 0) + 1
            self._latencies_ms.append(result.latency_ms)
            del self._latencies_ms[:-1000]

    def _observe(self, result: PostcodeRead, read: FrameRead | None, now: float) -> None:
        """Feed the drift monitor; keep the site's reference once it is complete."""
        heights = [box[3] * read.located.scale for box in read.located.boxes] if read is not None else []
        observed = ObservedRead.from_postcode_read(result, read.quality if read is not None else None, heights)
        with self._drift_lock:
            was_complete = self.drift.reference.complete
            self.drift.observe(observed, now)
            completed = not was_complete and self.drift.reference.complete
            reference = self.drift.reference.to_json() if completed else None
        if reference is not None:
            self._save_reference(reference)

    def _restore_reference(self) -> None:
        """The reference window survives restarts: it belongs to the model version, not the process."""
        if not self._reference_path.exists():
            return
        try:
            self.drift.restore_reference(Reference.from_json(self._reference_path.read_text()))
            log.info("drift reference restored from %s", self._reference_path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the saved drift reference %s (%s); a new one is being built",
                        self._reference_path, exc)

    def _save_reference(self, text: str) -> None:
        try:
            fd = os.open(self._reference_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            log.info("drift reference complete (%d reads); kept in %s", self.config.observability.reference_reads,
                     self._reference_path)
        except OSError as exc:
            log.error("could not keep the drift reference in %s: %s", self._reference_path, exc)

    def _chute_bar_key(self) -> dict[str, object] | None:
        """What the spent bar's posteriors depend on now; None while no bar is spent."""
        reader = self.reader
        plan, budget = reader.plan, reader.budget
        if plan is None or budget is None or not budget.spends_on(plan):
            return None
        manifest = reader.model.manifest
        return chute_bar.bar_key(manifest.sha256, manifest.temperature, plan.sha256, reader.policy.invalid_prior)

    def _restore_chute_bar(self) -> None:
        """The spent bar survives restarts: the posteriors kept for this model, plan and prior."""
        key = self._chute_bar_key()
        if key is None:
            return
        budget = self.reader.budget
        try:
            posteriors = chute_bar.kept(self._chute_bar_path, key)
            if posteriors is None:
                return
            budget.restore(posteriors)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the kept chute bar %s (%s); items are held to the strict bar until %d reads "
                        "are known", self._chute_bar_path, exc, budget.min_reads)
            return
        self._chute_bar_kept_at = budget.recent()[1]
        log.info("chute bar restored from %s: %d reads, bar %.4f", self._chute_bar_path, len(posteriors),
                 budget.threshold())

    def _keep_chute_bar(self) -> None:
        """Write the spent bar's posteriors if reads came since they were last written."""
        key = self._chute_bar_key()
        if key is None:
            return
        posteriors, observed = self.reader.budget.recent()
        if observed == self._chute_bar_kept_at or not posteriors:
            return
        try:
            chute_bar.keep(self._chute_bar_path, key, posteriors)
        except OSError as exc:
            log.error("could not keep the chute bar in %s: %s", self._chute_bar_path, exc)
            return
        self._chute_bar_kept_at = observed

    def _publish_drift(self) -> None:
        """Retained drift state on MQTT whenever the set of alarms changes (and once at start)."""
        now = self.clock.monotonic()
        with self._drift_lock:
            report = self.drift.assess(now)
        if report.kinds == self._drift_published:
            return
        state = {"state": "alarm" if report.alarms else "ok", "at": self.clock.time(),
                 "model_version": self.reader.model.version, **report.to_json()}
        if self.link.publish_state("drift", state):
            if report.alarms:
                log.warning("drift alarm: %s", "; ".join(a.message for a in report.alarms))
            elif self._drift_published:
                log.info("drift alarms cleared")
            self._drift_published = report.kinds

    def _publish_read(self, result: PostcodeRead, read: FrameRead) -> None:
        """One read with its digit crops, for the site dashboard (QoS 0, rate-limited)."""
        payload = result.to_payload()
        self.link.publish_event("read", {
            key: payload.get(key) for key in ("result_id", "item_id", "postcode", "accepted", "reason", "confidence",
                                               "digits", "decided_at", "latency_ms", "captured_at")
        } | {"crops_png": crops_strip_base64(read.located.digits)})

    def record_stage(self, stage: str, seconds: float) -> None:
        """One item's time in one stage, for /metrics and the health event."""
        if stage == "trigger_to_result":
            self.metrics.trigger_to_result.observe(max(0.0, seconds))
        else:
            self.metrics.observe_stage(stage, seconds)
        self._stage_samples[stage].append(seconds)

    def _crops_loop(self) -> None:
        while not self._shutdown.is_set() or not self._crops.empty():
            self._beat()
            try:
                result, located = self._crops.get(timeout=0.2)
            except queue.Empty:
                continue
            self.review.save(result, located)

    def _settled(self, n: int) -> None:
        with self._outstanding_cond:
            self._outstanding -= n
            self._outstanding_cond.notify_all()

    # -- lifecycle ------------------------------------------------------------

    def recover(self) -> int:
        """Answer every trigger a previous run journaled but did not answer (call before start).

        After a run that never closed the outbox (killed, power cut), the results the broker
        acknowledged in its last ``mqtt.resend_window_s`` are also sent again: a broker that went
        down with the agent forgets what it acknowledged since its last save.
        """
        window = self.config.mqtt.resend_window_s
        if self.outbox.ended_uncleanly and window > 0:
            again = self.outbox.last_delivered_ids(window)
            if again:
                self.link.resend_after_connect(again)
                log.warning("the last run ended without closing the outbox: sending again the %d result(s) the "
                            "broker acknowledged in its last %d s (subscribers drop duplicates by result_id)",
                            len(again), window)
        now = self.clock.time()
        recovered = self.outbox.open_triggers()
        for entry in recovered:
            trigger = entry.trigger
            if trigger.stale is None and (trigger.deadline is None or now >= trigger.deadline):
                trigger = replace(trigger, stale=Reason.AGENT_RESTART)
            with self._outstanding_cond:
                self._outstanding += 1
            self._schedule(_Item(trigger, entry.journal_id))
        if recovered:
            with self._counter_lock:
                self.counters.recovered += len(recovered)
            log.warning("answering %d trigger(s) journaled but not answered before the last stop",
                        len(recovered))
        return len(recovered)

    def start(self) -> None:
        self._spawn("journal", self._journal_loop)
        self._spawn("binder", self._bind_loop)
        for n in range(self.config.reader.workers):
            self._spawn(f"reader-{n}", self._read_loop)
        self._spawn("store", self._store_loop)
        self._spawn("review-crops", self._crops_loop)
        self._spawn("health", self._report_health)
        if self.config.trigger.mode == "interval":
            interval = IntervalTrigger(self.config.trigger.interval_ms / 1000.0)
            self._spawn("interval", lambda: run_interval(interval, self.clock, self.submit, self.stopping),
                        watched=False)

    def _spawn(self, name: str, target, *, watched: bool = True) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        if watched:  # the loop beats once per turn (see _beat); the watchdog checks it does
            self._heartbeats.watch(name, thread)
        thread.start()
        self._threads.append(thread)

    def _beat(self) -> None:
        self._heartbeats.beat(threading.current_thread().name)

    def liveness(self) -> dict[str, Check]:
        """What /healthz and the systemd watchdog check: every part still makes progress.

        Unlike readiness, a camera that is unplugged or a broker that is down is not a failure
        here: the agent retries them itself, and a restart would not bring them back. A call
        that never returns, a loop that stopped turning or a dead network thread is.
        """
        wd = self.config.watchdog
        checks = {"pipeline": self._heartbeats.vital(wd.stage_stall_s)}
        if self.grabber is not None:
            stuck = self.grabber.stuck_call(wd.camera_stall_s)
            checks["camera"] = Check(stuck is None, stuck or "camera calls return")
        checks["mqtt"] = self.link.vital()
        return checks

    def drain(self, timeout_s: float) -> bool:
        """Wait until every trigger taken in has its answer stored; False if some had not by then."""
        deadline = self.clock.monotonic() + timeout_s
        with self._outstanding_cond:
            while self._outstanding > 0:
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    return False
                self._outstanding_cond.wait(min(left, 0.1))
        return True

    def stop(self, drain_s: float | None = None) -> None:
        """Take no more triggers, answer every one taken in, deliver, then shut down in order."""
        if drain_s is None:
            drain_s = self.window.wait_s + self.budget_s + 5.0
        with self._outstanding_cond:  # see _take_in
            self.stopping.set()
        self.link.close_intake()  # returns once a trigger being handed over is counted
        if not self.drain(drain_s):
            with self._outstanding_cond:
                left = self._outstanding
            log.error("stopping with %d trigger(s) unanswered; they stay journaled and are answered "
                      "at the next start", left)
        self._shutdown.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._keep_chute_bar()
        if self.grabber is not None:
            self.grabber.stop()
        self.link.flush(drain_s)
        self.link.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        self.outbox.close()

    def _chute_threshold(self) -> dict[str, Any]:
        """The bar a chute posterior must reach now, and what it rests on (None without a plan)."""
        reader = self.reader
        if reader.plan is None:
            return {"threshold": None}
        budget = reader.budget
        setting = self.config.sort_plan.acceptance
        if budget is None or not budget.spends_on(reader.plan):
            return {"threshold": reader.policy.strict_threshold, "acceptance": "per_item", "setting": setting}
        return {"threshold": budget.threshold(), "acceptance": "spent", "setting": setting, "strict": budget.strict,
                "reads": budget.reads(), "min_reads": budget.min_reads}

    def health(self) -> dict[str, Any]:
        """A snapshot for the health event, the site dashboard and /metrics."""
        cfg = self.config
        with self._counter_lock:
            latencies = np.array(self._latencies_ms) if self._latencies_ms else np.zeros(1)
            counters = dict(vars(self.counters), by_reason=dict(self.counters.by_reason))
        with self._waiting_lock:
            waiting = len(self._waiting)
        return {
            "site": cfg.site.site_id,
            "line": cfg.site.line_id,
            "at": self.clock.time(),
            "model_version": self.reader.model.version,
            "sort_plan": self.reader.plan.summary() if self.reader.plan is not None else None,
            "sort_plan_errors": self._plan_errors[:5],
            "chute_threshold": self._chute_threshold(),
            "metrics_url": f"{self.endpoint.url}/metrics" if self.endpoint is not None else None,
            "health_period_s": cfg.observability.health_period_s,
            "counters": counters,
            "rates": self._rates.rates(self.clock.monotonic()),
            # Load shed to keep every answer in time: items answered "late" or after a restart.
            "shed": {reason: counters["by_reason"].get(reason, 0)
                     for reason in (Reason.LATE.value, Reason.AGENT_RESTART.value, Reason.SURGE.value)},
            "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 3),
                           "p99": round(float(np.percentile(latencies, 99)), 3)},
            "stages_ms": {stage: _percentiles_ms(samples) for stage, samples in self._stage_samples.items()},
            "queue": {"intake": self._intake.qsize(), "waiting_for_frame": waiting,
                      "reading": self._ready.qsize(), "storing": self._answers.qsize()},
            "read_estimate_ms": round(self._read_estimate_s * 1000.0, 2),
            "camera": self.grabber.health() if self.grabber is not None else None,
            "outbox": self.outbox.stats(),
            "journal": self.outbox.journal_stats(),
            # connected, protocol, in flight, and since start: connects, disconnects, published,
            # acked, republished (no PUBACK in time), resent (after a lost connection or run), ...
            "mqtt": self.link.stats(),
            "system": dict(self._system_figures),
            "observability": self._observability_snapshot(),
        }

    def _observability_snapshot(self) -> dict[str, Any]:
        with self._drift_lock:
            return self.drift.snapshot(self.clock.monotonic())

    def readiness(self) -> dict[str, Check]:
        """What /readyz checks: model loaded, camera delivering, broker connected, reads completing."""
        now = self.clock.monotonic()
        checks = {"model": Check(self.reader.model is not None, f"model {self.reader.model.version}")}
        camera = self.grabber.health() if self.grabber is not None else None
        if camera is None:
            checks["camera"] = Check(False, "no camera configured")
        else:
            age = camera.get("last_frame_age_s")
            live = bool(getattr(self.grabber, "live", True))
            delivering = camera["state"] == "ok" and (not live or (age is not None and age < _CAMERA_SILENT_S))
            checks["camera"] = Check(delivering, f"state {camera['state']}, last frame "
                                     + ("never" if age is None else f"{age:.1f} s ago")
                                     + (f", last error: {camera['last_error']}" if camera.get("last_error") else ""))
        if self.config.sort_plan.path is not None:
            plan = self.reader.plan
            checks["sort_plan"] = Check(plan is not None and not self._plan_errors,
                                        (f"plan {plan.sha256[:16]}, {plan.size} rows" if plan else "no plan loaded")
                                        + (f"; the file on disk is refused: {self._plan_errors[0]}"
                                           if self._plan_errors else ""))
        checks["broker"] = Check(self.link.connected, "connected" if self.link.connected else
                                 f"not connected to {self.config.mqtt.host}:{self.config.mqtt.port}")
        max_age = self.config.http.ready_max_read_age_s
        busy = self._last_trigger_at is not None and now - self._last_trigger_at < max_age
        recent = self._last_answer_at is not None and now - self._last_answer_at < max_age
        checks["reads"] = Check(recent or not busy,
                                "idle: no trigger lately" if not busy else
                                ("a read completed in the last %.0f s" % max_age if recent else
                                 f"triggers arrive but no answer was stored in the last {max_age:.0f} s"))
        return checks

    def start_endpoint(self) -> None:
        """Serve /metrics, /healthz and /readyz on the configured address (raises OSError if taken)."""
        http = self.config.http
        if http.enabled and self.endpoint is None:
            self.endpoint = EndpointServer(make_app(self.metrics.registry, self.readiness, self.liveness),
                                           http.host, http.port).start()

    def _report_health(self) -> None:
        period_s = self.config.observability.health_period_s
        next_report = next_prune = next_keep = self.clock.monotonic()
        while not self._shutdown.wait(min(1.0, period_s)):
            self._beat()
            try:
                self._check_bad_frames()
                self._follow_active_bundle()
                self.follow_sort_plan()
                # The WAL into the database here, off the threads an answer waits for.
                self.outbox.checkpoint()
                now = self.clock.monotonic()
                if now >= next_prune:
                    next_prune = now + _PRUNE_EVERY_S
                    self.outbox.prune()
                if now >= next_keep:
                    next_keep = now + _KEEP_CHUTE_BAR_EVERY_S
                    self._keep_chute_bar()
                if now < next_report:
                    continue
                next_report = now + period_s
                self._system_figures = self._system.read()
                name_os_threads()  # a camera or broker thread started since
                self._publish_drift()
                self.link.refresh_status()
                self.link.publish_event("health", self.health())
            except Exception:
                log.exception("health report failed")

    def _follow_active_bundle(self) -> None:
        """Hot-swap the model when ``model.bundle`` (a symlink kept by edge-sync) points elsewhere.

        The new interpreter is built aside; the reader swaps the reference between two reads
        (reads in progress finish on the old one), so no item is dropped or answered twice.
        """
        target = self.config.model.bundle.resolve()
        if target == self._bundle_target:
            return
        self._bundle_target = target  # tried once per switch: a broken bundle is not retried every second
        old = self.reader.model.version
        try:
            model = load_bundle(target, num_threads=self.config.model.num_threads)
        except BundleError as exc:
            log.error("not switching to the bundle at %s: %s; still running model %s", target, exc, old)
            self._report_error("model_swap_failed", {"bundle": str(target), "error": str(exc), "running": old})
            return
        # Warm up aside: the first invoke at each batch size allocates tensors, which the line
        # would otherwise wait for on the first reads after the switch.
        for length in sorted(set(self.config.reader.postcode_lengths)):
            model.classifier.classify(np.zeros((length, 28, 28), np.uint8))
        self.reader.swap_model(model)
        self.metrics.model.info({"version": model.version, "name": model.manifest.name})
        with self._drift_lock:
            # The old model's reads say nothing about the new one: a new site reference is built.
            self.drift.reset_reference(model.version)
            self._reference_path = self.config.outbox.path.parent / f"reference-{_safe_name(model.version)}.json"
            self._drift_published = None
        self._restore_reference()
        self._restore_chute_bar()
        self.link.status_fields["model_version"] = model.version
        self.link.refresh_status()
        self.link.publish_event("model", {"from": old, "to": model.version, "bundle": str(target)})
        log.info("model switched from %s to %s (%s)", old, model.version, target)

    def follow_sort_plan(self) -> None:
        """Load the sort plan at start and again whenever its file changes.

        A file that cannot be used keeps the plan in force (or, at start, the digit-by-digit rule),
        raises an error event naming every bad row, and fails /readyz until it is fixed. A read in
        progress keeps the plan it started with.
        """
        path = self.config.sort_plan.path
        if path is None:
            return
        try:
            st = path.stat()
            stamp: tuple[int, ...] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._plan_stamp and self._plan_stamp is not None:
            return
        self._plan_stamp = stamp
        try:
            plan = load_sort_plan(path, self.config.reader.postcode_lengths)
        except SortPlanError as exc:
            running = self.reader.plan
            self._plan_errors = exc.errors
            log.error("sort plan %s refused (%d problem(s)): %s; %s", path, len(exc.errors), "; ".join(exc.errors[:5]),
                      f"still sorting by plan {running.sha256[:16]}" if running else
                      "deciding digit by digit on the bundle's threshold until it is fixed")
            self._report_error("sort_plan_invalid", {"path": str(path), "errors": exc.errors,
                                                     "in_force": running.summary() if running else None})
            return
        if self.reader.plan is not None and plan.sha256 == self.reader.plan.sha256:
            self._plan_errors = []
            return  # touched, not changed
        old = self.reader.plan
        self.reader.swap_plan(plan)
        self._plan_errors = []
        self._restore_chute_bar()
        acceptance = self._chute_threshold().get("acceptance")
        summary = plan.summary() | {"path": str(path), "exact": len(plan.exact), "prefixes": len(plan.prefixes),
                                    "chutes": len(plan.chutes), "valid_share": round(plan.valid_share, 6),
                                    "acceptance": acceptance}
        log.info("sort plan %s in force: %d rows, %d chutes, %.1f%% of codes valid, chute bar %s (sha256 %s)",
                 path, plan.size, len(plan.chutes), 100 * plan.valid_share, acceptance, plan.sha256[:16])
        self.link.publish_event("sort_plan", summary | {"replaced": old.summary() if old else None})

    def _check_bad_frames(self) -> None:
        """Frames the camera delivered but nobody could decode: an error event and a count."""
        if self.grabber is None:
            return
        bad = self.grabber.bad_frames
        new, self._bad_frames_seen = bad - self._bad_frames_seen, bad
        if new > 0:
            with self._counter_lock:
                self.counters.bad_frames += new
            self._report_error("bad_frame", {"count": new, "total": bad,
                                              "source": self.grabber.source.name})


_DROPPED_DETAIL = "its frame had already left the camera history (the line fell behind); any later frame shows another envelope"


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:64] or "model"


def crops_strip_base64(digits: np.ndarray) -> str | None:
    """The digit crops side by side as one small base64 PNG (about 1 KB for five digits)."""
    try:
        png = crops_strip_png(np.asarray(digits)[:12])
    except OSError:
        return None
    return base64.b64encode(png).decode("ascii") if png is not None else None


def _percentiles_ms(samples: "deque[float]") -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p99": None, "n": 0}
    # A copy first: other threads append while the health thread reads.
    values = np.array(tuple(samples), float) * 1000.0
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "n": len(values)}


class _TokenBucket:
    """At most ``rate`` events a second on average, in bursts of up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return False
        if self._at is not None:
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _worth_a_look(result: PostcodeRead, read: FrameRead | None) -> bool:
    """A review a person can learn from: a doubtful read with its crops.

    Every review reaches the sorting machine on the result topic (and the envelope goes to
    manual keying); the review topic and the kept crops are for reads whose digits were in
    doubt, not for items that were never read (no frame, late, restart): under a burst those
    would double the messages on the wire and the writes to disk for nothing to label.
    """
    return not result.accepted and read is not None and result.reason not in _NOT_DOUBTFUL


_NOT_DOUBTFUL = frozenset({Reason.LATE, Reason.AGENT_RESTART, Reason.SURGE})


def _take_batch(q: "queue.Queue[Any]", limit: int) -> list[Any]:
    """Up to ``limit`` items: waits briefly for the first, then takes whatever is already there."""
    try:
        batch = [q.get(timeout=0.2)]
    except queue.Empty:
        return []
    while len(batch) < limit:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            break
    return batch


def mqtt_settings(config: AgentConfig) -> MqttSettings:
    m = config.mqtt
    tls = None
    if m.tls:
        tls = TlsSettings(ca_certs=str(m.ca_file) if m.ca_file else None,
                          certfile=str(m.cert_file) if m.cert_file else None,
                          keyfile=str(m.key_file) if m.key_file else None)
    return MqttSettings(
        host=m.host, port=m.port, client_id=config.client_id, keepalive_s=m.keepalive_s,
        username=m.username or None, password=mqtt_password(m) if m.username else None, tls=tls,
        protocol=m.protocol, topic_prefix=config.topic_base, status_topic=config.topic("status"),
        results_topic=config.topic("result"), trigger_topic=config.topic("trigger"),
        events_topic=config.topic("events"), window=m.max_inflight, session_expiry_s=m.session_expiry_s,
        resend_window_s=m.resend_window_s,
        probe_period_s=config.watchdog.mqtt_probe_s, echo_timeout_s=config.watchdog.mqtt_echo_timeout_s,
    )


def build_agent(config: AgentConfig, clock: Clock | None = None, *, start_fresh: bool = False) -> Agent:
    """Wire every stage from the config (nothing started yet).

    ``start_fresh``: accept a missing or empty outbox where an earlier run kept state.
    """
    clock = clock or SystemClock()
    model = load_bundle(config.model.bundle, num_threads=config.model.num_threads)
    reader = PostcodeReader(model, ReaderConfig(roi=config.reader.roi,
                                                expected_lengths=config.reader.postcode_lengths),
                            threshold_override=config.model.acceptance_threshold, frame_hash=config.reader.frame_hash,
                            policy=DecodePolicy(target_misdirect_rate=config.sort_plan.target_misdirect_rate,
                                                invalid_prior=config.sort_plan.invalid_prior),
                            budget=misdirect_budget(config.sort_plan.acceptance,
                                                    config.sort_plan.target_misdirect_rate,
                                                    config.sort_plan.spent_window))
    config.outbox.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    outbox = Outbox(config.outbox.path, clock=clock, max_pending=config.outbox.max_pending,
                    retention_s=config.outbox.retention_days * 86_400, start_fresh=start_fresh)
    review = ReviewStore(config.review.crops_dir, config.review.max_items)
    grabber = FrameGrabber(DeferredSource(config.camera.source, config.camera.loop), clock,
                           (config.camera.reopen_backoff_min_s, config.camera.reopen_backoff_max_s),
                           file_fps=config.camera.fps)
    link = MqttLink(mqtt_settings(config), outbox, clock)
    agent = Agent(config, reader, grabber, link, outbox, review, clock)
    agent.follow_sort_plan()  # before any read: a bad plan is reported, and the line reads digit by digit
    link.on_trigger = agent.on_mqtt_trigger
    link.on_ack_latency = lambda seconds: agent.record_stage("publish_ack", seconds)
    link.status_fields["model_version"] = model.version
    if config.trigger.mode == "change":
        detector = SceneChangeDetector(SceneSettings(settle_frames=config.trigger.settle_frames,
                                                     min_still_s=config.trigger.settle_ms / 1000.0))
        if config.trigger.background_image is not None:
            # Without it the empty belt between envelopes is a "new scene" too, read as no_postcode.
            detector.set_background(decode_image(config.trigger.background_image.read_bytes(),
                                                 str(config.trigger.background_image)))
        grabber.on_frame = agent.on_frame(detector)
    return agent


def start_agent(agent: Agent) -> None:
    """Start in the order that loses nothing: camera, journaled leftovers, stages, then the broker."""
    for warning in security_warnings(agent.config):
        log.warning("%s", warning)
    agent.start_endpoint()  # first: a port already taken stops the start before anything runs
    agent.grabber.start()
    agent.recover()
    agent.start()
    agent.link.start()
    name_os_threads()  # `top -H` shows reader-0, store, mqtt-network, ... instead of python


def run_agent(config: AgentConfig, stop: threading.Event | StopSignal, clock: Clock | None = None, *,
              start_fresh: bool = False, notifier: Notifier | None = None) -> Agent:
    """Start everything, serve until ``stop`` is set, then answer what was taken in and shut down.

    Under systemd (Type=notify) it says READY=1 once every stage runs, and WATCHDOG=1 from this
    loop only while ``Agent.liveness()`` passes, so systemd restarts an agent that is stuck.
    """
    notifier = notifier or Notifier()
    agent = build_agent(config, clock, start_fresh=start_fresh)
    start_agent(agent)
    log.info("agent serving %s (model %s, trigger %s)", config.topic_base, agent.reader.model.version,
             config.trigger.mode)
    notifier.ready(f"reading {config.topic_base} with model {agent.reader.model.version}")
    watch_liveness(agent.liveness, notifier, stop)
    log.info("agent stopping")
    notifier.stopping("answering the triggers taken in, then delivering")
    agent.stop()
    return agent


def watch_liveness(liveness, notifier: Notifier, stop: threading.Event | StopSignal) -> None:
    """Until ``stop``: ping the watchdog while every check passes; say why in STATUS= when not."""
    period_s = min(notifier.watchdog_period_s or 2.0, 2.0)
    healthy = True
    while not stop.wait(period_s):
        ok, summary = verdict(liveness())
        if ok:
            notifier.watchdog()
        if ok != healthy:
            healthy = ok
            if ok:
                log.info("all parts make progress again; watchdog pings resumed")
            else:
                log.error("not alive: %s; watchdog pings stopped (systemd restarts the agent; "
                          "the journal answers every trigger taken in)", summary)
            notifier.status("healthy" if ok else f"unhealthy: {summary}")
