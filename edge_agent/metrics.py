"""The agent's Prometheus metrics (prometheus-client, one registry per agent) and system figures.

Counters and histograms are updated by the stages as items pass; values that already live
elsewhere (outbox depth, camera state, broker connection, drift figures) are read at scrape
time by ``SnapshotCollector`` from the agent's own health snapshot, so there is one source of
truth and nothing to keep in step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from edge_agent.threads import thread_cpu_seconds

log = logging.getLogger(__name__)

# Seconds. Reads take milliseconds, waits for a frame up to frame_wait (0.5 s), answers up to
# the decision budget (1.5 s) and, while the broker is away, far longer.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
STAGES = ("wait_frame", "locate", "classify", "decide", "store", "publish_ack")
CAMERA_STATES = ("starting", "ok", "reconnecting", "failed", "ended", "stopped")


class AgentMetrics:
    """Every metric one agent exports; ``registry`` is what /metrics serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.triggers = Counter("postcode_triggers", "Triggers taken in, by where they came from",
                                ["source"], registry=r)
        self.bad_triggers = Counter("postcode_bad_triggers", "Trigger messages that named no item", registry=r)
        self.repeats = Counter("postcode_repeated_items",
                               "Triggers for an item already answered: the stored answer was sent again", registry=r)
        self.answers = Counter("postcode_answers", "Answers stored, by outcome (accepted or review)",
                               ["outcome"], registry=r)
        self.reviews = Counter("postcode_reviews", "Answers sent to review, by reason", ["reason"], registry=r)
        # What the sorted answers' own posteriors say about how many of them go wrong: set it
        # beside the misdirects the sorting office finds. Far more found means the posteriors are
        # too sure for this site's mail, and a spent bar should not be spent (docs/OPERATIONS.md).
        self.misdirects_expected = Counter(
            "postcode_misdirects_expected", "Misdirects the accepted answers' posteriors expect: the sum of "
            "1 - the chute's posterior (without a plan, 1 - the digits' product)", registry=r)
        self.errors = Counter("postcode_errors", "Errors by kind (read_failed, store_failed, bad_frame, ...)",
                              ["kind"], registry=r)
        self.stage_seconds = Histogram("postcode_stage_seconds", "Time spent in each stage of the read path",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.trigger_to_result = Histogram("postcode_trigger_to_result_seconds",
                                           "From the item's trigger to its stored answer",
                                           buckets=STAGE_BUCKETS, registry=r)
        self.model = Info("postcode_model", "The model bundle in use", registry=r)
        self._children: dict[tuple[Any, str], Any] = {}  # see _labelled
        for stage in STAGES:  # every stage is exported from the start, at zero
            self.stage_seconds.labels(stage=stage)
        for outcome in ("accepted", "review"):
            self.answers.labels(outcome=outcome)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._labelled(self.stage_seconds, stage).observe(max(0.0, seconds))

    def count_trigger(self, source: str) -> None:
        self._labelled(self.triggers, source).inc()

    def count_answer(self, accepted: bool, reason: str | None, chance_wrong: float = 0.0) -> None:
        """One stored answer; ``chance_wrong`` is what an accepted one's posterior gives for its going wrong."""
        self._labelled(self.answers, "accepted" if accepted else "review").inc()
        if accepted:
            self.misdirects_expected.inc(chance_wrong)
        if reason is not None:
            self._labelled(self.reviews, reason).inc()

    def _labelled(self, metric: Any, value: str) -> Any:
        """The child of a one-label metric, kept: ``labels()`` takes a lock and builds a tuple
        each call, a few microseconds that several stages pay for every item."""
        child = self._children.get((metric, value))
        if child is None:
            child = self._children[(metric, value)] = metric.labels(value)
        return child

    def error(self, kind: str, n: int = 1) -> None:
        self._labelled(self.errors, kind).inc(n)


class SnapshotCollector(Collector):
    """Gauges read at scrape time from the agent's health snapshot (one place holds each value)."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus-client's Collector protocol
        try:
            h = self._snapshot()
        except Exception:  # a broken source must not break the whole scrape
            log.exception("health snapshot for /metrics failed")
            up = GaugeMetricFamily("postcode_snapshot_ok", "1 when the agent's health snapshot could be taken")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("postcode_snapshot_ok", "1 when the agent's health snapshot could be taken")
        up.add_metric([], 1)
        yield up
        outbox = h.get("outbox") or {}
        yield _gauge("postcode_outbox_pending", "Answers stored and not yet acknowledged by the broker",
                     outbox.get("pending", 0))
        yield _gauge("postcode_outbox_dropped", "Answers dropped because the outbox was full (lifetime)",
                     outbox.get("dropped", 0))
        yield _gauge("postcode_outbox_expired", "Answers expired before delivery (lifetime)", outbox.get("expired", 0))
        journal = h.get("journal") or {}
        yield _gauge("postcode_journal_open", "Triggers journaled and not yet answered", journal.get("open", 0))
        mqtt = h.get("mqtt") or {}
        yield _gauge("postcode_broker_connected", "1 while the MQTT connection is up", int(bool(mqtt.get("connected"))))
        link = CounterMetricFamily(
            "postcode_mqtt_messages", "Since the agent started: results published, acknowledged, published "
            "again (no PUBACK in time; sent again after a lost broker connection or run), broker disconnects",
            labels=["kind"])
        for kind in ("published", "acked", "republished", "resent", "disconnects"):
            if isinstance(mqtt.get(kind), int):
                link.add_metric([kind], mqtt[kind])
        yield link
        camera = h.get("camera") or {}
        state = StateSetMetricFamily("postcode_camera_state", "What the camera grabber is doing")
        state.add_metric([], {s: s == camera.get("state") for s in CAMERA_STATES})
        yield state
        yield _gauge("postcode_camera_reopens", "Times the camera failed and was reopened", camera.get("failures", 0))
        yield _gauge("postcode_camera_fps", "Frames per second the camera delivers", camera.get("fps", 0.0))
        yield _gauge("postcode_camera_bad_frames", "Frames the source could not decode", camera.get("bad_frames", 0))
        queue = h.get("queue") or {}
        q = GaugeMetricFamily("postcode_queue_items", "Items waiting in each stage", labels=["stage"])
        for name, value in queue.items():
            q.add_metric([name], value)
        yield q
        bar = h.get("chute_threshold") or {}
        if bar.get("threshold") is not None:  # only with a sort plan
            yield _gauge("postcode_chute_threshold", "The chute posterior an item needs to be sorted now",
                         bar["threshold"])
        system = h.get("system") or {}
        for key, name, doc in (("cpu_pct", "postcode_system_cpu_percent", "CPU use of the whole box"),
                               ("mem_rss_mb", "postcode_agent_memory_rss_megabytes", "The agent's resident memory"),
                               ("disk_free_pct", "postcode_state_disk_free_percent", "Free space where state is kept"),
                               ("temperature_c", "postcode_system_temperature_celsius", "Hottest temperature sensor")):
            if system.get(key) is not None:
                yield _gauge(name, doc, system[key])
        drift = ((h.get("observability") or {}).get("drift")) or {}
        figures = GaugeMetricFamily("postcode_drift_figure",
                                    "Drift figures against the site's reference window (PSI, ratios)",
                                    labels=["figure"])
        for name, value in (drift.get("figures") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures.add_metric([name], float(value))
        yield figures
        alarms = GaugeMetricFamily("postcode_drift_alarm", "1 for each drift alarm raised now", labels=["kind"])
        for alarm in drift.get("alarms") or []:
            alarms.add_metric([str(alarm.get("kind"))], 1)
        yield alarms
        judged = drift.get("judged")
        yield _gauge("postcode_drift_judged", "1 once the reference is complete and the window full enough",
                     int(bool(judged)))


class ThreadCpuCollector(Collector):
    """CPU seconds per thread role, read from the kernel at scrape time: which stage uses the core."""

    def __init__(self, cpu_seconds: Callable[[], Mapping[str, float]]) -> None:
        self._cpu_seconds = cpu_seconds

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus-client's Collector protocol
        family = CounterMetricFamily(
            "postcode_thread_cpu_seconds", "CPU seconds (user + system) used by the agent's live threads, by "
            "role (reader-N, store, journal, mqtt-network, grabber, ...; native: threads Python did not start)",
            labels=["thread"])
        for role, seconds in sorted(self._cpu_seconds().items()):
            family.add_metric([role], seconds)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], float(value))
    return family


class SystemProbe:
    """CPU, memory, disk and temperature from psutil (cheap: call it every few seconds)."""

    def __init__(self, state_dir: Path, thread_cpu: Callable[[], Mapping[str, float]] = thread_cpu_seconds) -> None:
        self.state_dir = state_dir
        self._process = psutil.Process()
        self._thread_cpu = thread_cpu
        self._last = self._cpu_now()
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def _cpu_now(self) -> tuple[float, float, float]:
        """(monotonic clock, the agent's CPU seconds, its reader threads' CPU seconds)."""
        times = self._process.cpu_times()
        readers = sum(s for role, s in self._thread_cpu().items() if role.startswith("reader-"))
        return time.monotonic(), times.user + times.system, readers

    def read(self) -> dict[str, float | None]:
        """{cpu_pct, agent_cpu_pct, reader_cpu_pct, mem_rss_mb, mem_pct, disk_free_pct, temperature_c};
        missing sensors are None. The agent's and its readers' CPU are percent of one core since
        the last call: a line whose readers stay near 100% has no headroom left for a busier hour."""
        try:
            disk = psutil.disk_usage(str(self.state_dir))
            disk_free = round(100.0 * disk.free / disk.total, 2) if disk.total else None
        except OSError:
            disk_free = None
        (was, agent_was, readers_was), now = self._last, self._cpu_now()
        self._last = now
        span = now[0] - was
        return {
            "cpu_pct": psutil.cpu_percent(None),
            "agent_cpu_pct": round(100.0 * (now[1] - agent_was) / span, 1) if span > 0 else None,
            # Never below 0: a reader thread that ended took its seconds with it.
            "reader_cpu_pct": round(100.0 * max(0.0, now[2] - readers_was) / span, 1) if span > 0 else None,
            "mem_rss_mb": round(self._process.memory_info().rss / 1e6, 1),
            "mem_pct": psutil.virtual_memory().percent,
            "disk_free_pct": disk_free,
            "temperature_c": _hottest_sensor(),
        }


def _hottest_sensor() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    if reader is None:
        return None
    try:
        readings = [t.current for entries in reader().values() for t in entries if t.current is not None]
    except (OSError, RuntimeError):
        return None
    return round(max(readings), 1) if readings else None


class RateWindow:
    """Answers in the last ``span_s`` seconds: reads per minute, auto-sort %, review % by reason.

    Thread-safe: the store thread adds while the health thread (and /metrics) read.
    """

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self._entries: deque[tuple[float, bool, str | None]] = deque()
        self._lock = threading.Lock()

    def add(self, now: float, accepted: bool, reason: str | None) -> None:
        with self._lock:
            self._entries.append((now, accepted, reason))

    def rates(self, now: float) -> dict[str, Any]:
        with self._lock:
            while self._entries and self._entries[0][0] < now - self.span_s:
                self._entries.popleft()
            entries = list(self._entries)
        n = len(entries)
        by_reason: dict[str, float] = {}
        for _t, accepted, reason in entries:
            if not accepted and reason:
                by_reason[reason] = by_reason.get(reason, 0) + 1
        return {
            "reads_per_min": round(n * 60.0 / self.span_s, 2),
            "auto_sort_pct": round(100.0 * sum(e[1] for e in entries) / n, 2) if n else None,
            "review_pct_by_reason": {k: round(100.0 * v / n, 2) for k, v in sorted(by_reason.items())},
            "span_s": self.span_s,
        }
