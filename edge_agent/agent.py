"""The agent service: triggers in, frames grabbed, postcodes read, results into the outbox.

``Agent`` receives every collaborator (reader, frame grabber, MQTT link, outbox, review
store, clock); ``build_agent`` wires them from the one config object. Start-up is a flat
list of steps so an engineer can read what runs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig, mqtt_password
from edge_agent.grabber import FrameGrabber
from edge_agent.loader import load_bundle
from edge_agent.mqtt import MqttLink, MqttSettings, TlsSettings
from edge_agent.outbox import Outbox
from edge_agent.pipeline import FrameRead, PostcodeReader, postcode_read
from edge_agent.reader import ReaderConfig
from edge_agent.review import ReviewStore
from edge_agent.sources import SourceError, decode_image, open_source, redact_url
from edge_agent.triggers import (IntervalTrigger, SceneChangeDetector, SceneSettings, TriggerError,
                                 parse_trigger, run_interval)
from edge_agent.types import Clock, Frame, PostcodeRead, SystemClock, Trigger

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


@dataclass
class AgentCounters:
    triggers: int = 0
    bad_triggers: int = 0
    reads: int = 0
    accepted: int = 0
    reviews: int = 0
    read_errors: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class Agent:
    """Turns triggers into stored results on reader worker threads (in trigger order with one)."""

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
        self.stopping = threading.Event()
        # Each trigger waits with the camera's frame count when it arrived (see _frame_for).
        self._queue: queue.Queue[tuple[Trigger, int]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._latencies_ms: list[float] = []
        self._counter_lock = threading.Lock()

    # -- triggers -------------------------------------------------------------

    def on_mqtt_trigger(self, payload: bytes, response_topic: str | None,
                        correlation_data: bytes | None) -> None:
        """Called on paho's thread: parse and queue; a bad payload is an error event, not a crash."""
        try:
            trigger = parse_trigger(payload, self.clock, max_bytes=self.config.trigger.max_payload_bytes,
                                    response_topic=response_topic, correlation_data=correlation_data)
        except TriggerError as exc:
            with self._counter_lock:
                self.counters.bad_triggers += 1
            log.error("rejected trigger: %s", exc)
            self.link.publish_event("error", {"kind": "bad_trigger", "error": str(exc),
                                              "payload_bytes": len(payload)})
            return
        self.submit(trigger)

    def submit(self, trigger: Trigger) -> None:
        with self._counter_lock:
            self.counters.triggers += 1
        self._queue.put((trigger, self.grabber.last_seq if self.grabber is not None else 0))

    def on_frame(self, detector: SceneChangeDetector):
        """A grabber callback that triggers a read when a new envelope settles under the camera."""
        def check(frame: Frame) -> None:
            if detector.update(frame.image, self.clock.monotonic()):
                now = self.clock.time()
                self.submit(Trigger(item_id=f"scene-{int(now * 1000)}-{detector.triggers}",
                                    received_at=now))
        return check

    # -- the read path --------------------------------------------------------

    def _frame_for(self, seq_at_trigger: int) -> Frame | None:
        """The frame to read for an item, never one that may show an earlier envelope.

        By default the newest frame if it is younger than max_frame_age_ms (a live camera's
        frame is at most one frame interval old); otherwise, or with wait_after_trigger,
        the first frame the camera delivers after the trigger, waiting up to
        frame_wait_ms. None sends the item to review as no_frame.
        """
        if self.grabber is None:
            return None
        cam = self.config.camera
        if not cam.wait_after_trigger:
            frame = self.grabber.latest(max_age_s=cam.max_frame_age_ms / 1000.0)
            if frame is not None:
                return frame
        return self.grabber.wait_for_frame(seq_at_trigger, cam.frame_wait_ms / 1000.0)

    def process(self, trigger: Trigger, seq_at_trigger: int = 0) -> PostcodeRead:
        """Read the right frame for one item and store the result durably."""
        frame = self._frame_for(seq_at_trigger)
        read: FrameRead | None = None
        if frame is not None:
            try:
                read = self.reader.read_frame(frame)
            except Exception as exc:  # a frame we cannot read must not stop the line
                log.exception("reading frame %s failed", frame.seq)
                with self._counter_lock:
                    self.counters.read_errors += 1
                self.link.publish_event("error", {"kind": "read_failed", "item_id": trigger.item_id,
                                                  "error": str(exc)})
        result = postcode_read(trigger, frame, read, self.clock.time(), self.reader.model.version)
        self.store(result, trigger, read)
        return result

    def store(self, result: PostcodeRead, trigger: Trigger, read: FrameRead | None) -> None:
        """Outbox first (durable), then the delivery loop publishes; reviews also keep their crops."""
        payload_dict = result.to_payload()
        payload = json.dumps(payload_dict, separators=(",", ":")).encode()
        audit = {
            "result_id": result.result_id, "item_id": result.item_id, "postcode": result.postcode,
            "accepted": result.accepted, "reason": payload_dict["reason"],
            "digits": payload_dict["digits"], "model_version": result.model_version,
            "image_sha256": result.image_sha256, "captured_at": result.captured_at,
        }
        expires_at = self.clock.time() + self.config.mqtt.result_expiry_s
        self.link.submit(payload, audit, expires_at=expires_at, response_topic=trigger.response_topic,
                         correlation_data=trigger.correlation_data)
        if not result.accepted:
            self.outbox.add(self.config.topic("review"), payload, 1, None, audit)
            self.review.save(result, read.located if read else None)
        with self._counter_lock:
            c = self.counters
            c.reads += 1
            c.accepted += result.accepted
            c.reviews += not result.accepted
            if result.reason is not None:
                c.by_reason[result.reason.value] = c.by_reason.get(result.reason.value, 0) + 1
            self._latencies_ms.append(result.latency_ms)
            del self._latencies_ms[:-1000]

    def _work(self) -> None:
        while not self.stopping.is_set() or not self._queue.empty():
            try:
                trigger, seq_at_trigger = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(trigger, seq_at_trigger)
            except Exception as exc:  # the outbox refused (disk full, corrupt): say so loudly, keep serving
                log.exception("could not store the result of item %s", trigger.item_id)
                self.link.publish_event("error", {"kind": "store_failed", "item_id": trigger.item_id,
                                                  "error": str(exc)})

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.config.reader.workers):
            self._spawn(f"reader-{n}", self._work)
        self._spawn("health", self._report_health)
        if self.config.trigger.mode == "interval":
            interval = IntervalTrigger(self.config.trigger.interval_ms / 1000.0)
            self._spawn("interval", lambda: run_interval(interval, self.clock, self.submit, self.stopping))

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, drain_s: float = 5.0) -> None:
        """Finish queued items, give the link a moment to deliver, then shut down in order."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=drain_s)
        if self.grabber is not None:
            self.grabber.stop()
        self.link.flush(drain_s)
        self.link.stop()
        self.outbox.close()

    def health(self) -> dict[str, Any]:
        """A snapshot for the status event and the status page."""
        with self._counter_lock:
            latencies = np.array(self._latencies_ms) if self._latencies_ms else np.zeros(1)
            counters = dict(vars(self.counters), by_reason=dict(self.counters.by_reason))
        return {
            "model_version": self.reader.model.version,
            "counters": counters,
            "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 3),
                           "p99": round(float(np.percentile(latencies, 99)), 3)},
            "queue": self._queue.qsize(),
            "camera": self.grabber.health() if self.grabber is not None else None,
            "outbox": self.outbox.stats(),
            "mqtt": {"connected": self.link.connected, "protocol": self.link.protocol},
        }

    def _report_health(self, period_s: float = 10.0) -> None:
        while not self.stopping.wait(period_s):
            try:
                self.outbox.prune()
                self.link.publish_event("health", self.health())
            except Exception:
                log.exception("health report failed")


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
        events_topic=config.topic("events"), window=m.max_inflight,
    )


def build_agent(config: AgentConfig, clock: Clock | None = None) -> Agent:
    """Wire every stage from the config (nothing started yet)."""
    clock = clock or SystemClock()
    model = load_bundle(config.model.bundle, num_threads=config.model.num_threads)
    reader = PostcodeReader(model, ReaderConfig(roi=config.reader.roi,
                                                expected_lengths=config.reader.postcode_lengths),
                            threshold_override=config.model.acceptance_threshold)
    config.outbox.path.parent.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(config.outbox.path, clock=clock, max_pending=config.outbox.max_pending,
                    retention_s=config.outbox.retention_days * 86_400)
    review = ReviewStore(config.review.crops_dir, config.review.max_items)
    grabber = FrameGrabber(DeferredSource(config.camera.source, config.camera.loop), clock,
                           (config.camera.reopen_backoff_min_s, config.camera.reopen_backoff_max_s),
                           file_fps=config.camera.fps)
    link = MqttLink(mqtt_settings(config), outbox, clock)
    agent = Agent(config, reader, grabber, link, outbox, review, clock)
    link.on_trigger = agent.on_mqtt_trigger
    if config.trigger.mode == "change":
        detector = SceneChangeDetector(SceneSettings(settle_frames=config.trigger.settle_frames,
                                                     min_still_s=config.trigger.settle_ms / 1000.0))
        if config.trigger.background_image is not None:
            # Without it the empty belt between envelopes is a "new scene" too, read as no_postcode.
            detector.set_background(decode_image(config.trigger.background_image.read_bytes(),
                                                 str(config.trigger.background_image)))
        grabber.on_frame = agent.on_frame(detector)
    return agent


def run_agent(config: AgentConfig, stop: threading.Event, clock: Clock | None = None) -> Agent:
    """Start everything, serve until ``stop`` is set, then shut down cleanly."""
    agent = build_agent(config, clock)
    agent.link.start()
    agent.grabber.start()
    agent.start()
    log.info("agent serving %s (model %s, trigger %s)", config.topic_base, agent.reader.model.version,
             config.trigger.mode)
    stop.wait()
    log.info("agent stopping")
    agent.stop()
    return agent
