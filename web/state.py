"""What the dashboard knows about each line of the site, learnt only from what the agents publish.

Pure and thread-safe: the MQTT adapter feeds it raw payloads, the web views read snapshots.
Every buffer is bounded (lines, time series, reads, errors, sync events), so a long run or a
chatty or hostile publisher cannot grow the process.

Models: edge-sync says which version it activated (retained ``sync``) and each step of a pull
(``events/sync``); the agent says which version it runs (``status``, ``events/health``,
``events/model``). A line whose agent runs another version than the active one for longer than
a short grace period is a *model mismatch*: the rollout state an operator must see.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple

LINE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}\Z")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
WORD = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")  # sync outcomes and event names

MAX_LINES = 64  # a site with more lines than this is a misconfiguration (or someone publishing junk)
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_READS = 12  # last reads kept per line, with their crops
MAX_ERRORS = 20
MAX_ALARMS = 20
MAX_CROPS_CHARS = 64 * 1024  # a strip of five crops is about 1.5 KB of base64
MAX_MINUTES = 240  # longest chart range served
FINE_SPAN_S = 30 * 60.0  # one point per health report for the last 30 minutes ...
FINE_MAX_POINTS = 1800
COARSE_STEP_S = 60.0  # ... then one point a minute up to MAX_MINUTES
MAX_CHART_POINTS = 360  # a chart is at most this wide in points: long ranges are thinned
MISSED_HEALTH_PERIODS = 3  # a line whose health stopped for this many periods is down
# The agent follows a switch within a second or two and says so in its next status and health:
# a version different from the active one for longer than this many periods is a mismatch.
MISMATCH_HEALTH_PERIODS = 2
MAX_SYNC_EVENTS = 20  # last sync steps and model switches kept per line
STABLE_CHANNEL = "stable"
# Agents that do not say their period reported every 10 s.
DEFAULT_HEALTH_PERIOD_S = 10.0
STAGES = ("wait_frame", "locate", "classify", "decide", "store", "publish_ack", "trigger_to_result")


class LineStatus(str, Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # the broker is unreachable: what a line does now cannot be seen


class BrokerState(str, Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"


class MessageKind(str, Enum):
    STATUS = "status"
    HEALTH = "health"
    READ = "read"
    DRIFT = "drift"
    ERROR = "error"
    SYNC = "sync"  # edge-sync's retained state
    SYNC_EVENT = "sync_event"  # one step of a pull
    MODEL_EVENT = "model_event"  # the agent switched models


class Rollout(str, Enum):
    """Does the agent run the version sync made active?"""

    IN_SYNC = "in_sync"
    SWITCHING = "switching"  # different, within the grace period
    MISMATCH = "mismatch"  # different for longer: the switch did not happen (or went back)
    UNKNOWN = "unknown"  # no sync state, no version from the agent, or the line is not up


# Outcomes of the last pull that an operator must act on (or at least read).
SYNC_PROBLEMS = ("refused", "rolled_back")


class SeriesPoint(NamedTuple):
    at: float
    reads_per_min: float | None
    auto_sort_pct: float | None
    review_pct: float | None
    p50_ms: float | None
    p99_ms: float | None
    outbox_pending: float | None


SERIES_FIELDS = SeriesPoint._fields


class StateUnavailable(RuntimeError):
    """The state source cannot answer (the views turn it into 503)."""


# -- defensive readers: agents of several versions publish, none of them is trusted --------------

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _round(value: Any, digits: int = 2) -> float | None:
    value = _num(value)
    return None if value is None else round(value, digits)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int = 200) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value) if isinstance(value, (int, float, bool)) else None
        if value is None:
            return None
    return value[:limit]


def _numbers(value: Any, limit: int) -> list[float | None] | None:
    if not isinstance(value, list) or not value or len(value) > limit:
        return None
    return [_round(v, 6) for v in value]


def _flat(value: Any, limit: int = 40) -> dict[str, Any]:
    """A dict of scalars (numbers, short strings, booleans, None), at most ``limit`` keys."""
    out: dict[str, Any] = {}
    for key, item in list(_dict(value).items())[:limit]:
        if isinstance(item, (bool, int)) or item is None:
            out[str(key)[:64]] = item
        elif isinstance(item, float):
            out[str(key)[:64]] = _round(item, 3)
        elif isinstance(item, str):
            out[str(key)[:64]] = item[:200]
    return out


def _version(value: Any) -> str | None:
    """A model version name, or None: versions are shown and compared, so nothing else passes."""
    return value if isinstance(value, str) and VERSION.match(value) else None


def _word(value: Any) -> str | None:
    return value if isinstance(value, str) and WORD.match(value) else None


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 text (edge-sync writes both)."""
    if isinstance(value, str) and len(value) <= 40:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None  # a local time from another box is not comparable
        value = moment.timestamp()
    value = _num(value)
    return round(value, 3) if value is not None and value > 0 else None


def _sync_result(value: Any) -> dict[str, Any] | None:
    """``last_result`` of a sync state: ``{outcome, version, reason, at}``, or a bare outcome word."""
    if isinstance(value, str):
        value = {"outcome": value}
    value = _dict(value)
    outcome = _word(value.get("outcome"))
    if outcome is None:
        return None
    return {"outcome": outcome, "version": _version(value.get("version")),
            "reason": _text(value.get("reason"), 300) or None, "at": _epoch(value.get("at"))}


def _sync_state(body: dict[str, Any]) -> dict[str, Any]:
    return {"active": _version(body.get("active")), "previous": _version(body.get("previous")),
            "channel": _text(body.get("channel"), 64), "last_result": _sync_result(body.get("last_result")),
            "last_error": _text(body.get("last_error"), 300) or None, "at": _epoch(body.get("at"))}


def _sync_event(body: dict[str, Any], now: float) -> dict[str, Any] | None:
    """One step of a pull as the page lists it; None when it names no step."""
    event = _word(body.get("event"))
    if event is None:
        return None
    at = _epoch(body.get("at"))
    return {"source": "sync", "event": event, "at": at if at is not None and at <= now + 60 else round(now, 3),
            "version": _version(body.get("version")),
            "from": _version(_first(body, "active", "previous")), "to": _version(body.get("to")),
            "channel": _text(body.get("channel"), 64), "reason": _text(body.get("reason"), 300) or None}


def _model_event(body: dict[str, Any], now: float) -> dict[str, Any] | None:
    """The agent's ``events/model`` (``{from, to, bundle}``); None without a version switched to."""
    to = _version(body.get("to"))
    if to is None:
        return None
    return {"source": "agent", "event": "switched", "at": round(now, 3), "version": to,
            "from": _version(body.get("from")), "to": to, "channel": None, "reason": None}


def _url(value: Any) -> str | None:
    """Only plain http(s) links reach the page (never javascript: or credentials)."""
    text = _text(value, 300)
    if text and re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?", text):
        return text
    return None


def _percentiles(value: Any) -> dict[str, float | None]:
    value = _dict(value)
    return {"p50": _round(value.get("p50"), 3), "p99": _round(value.get("p99"), 3)}


def _alarm(value: Any) -> dict[str, Any] | None:
    value = _dict(value)
    if not value:
        return None
    return {"kind": _text(value.get("kind"), 64), "figure": _text(value.get("figure"), 64),
            "value": _round(value.get("value"), 4), "level": _round(value.get("level"), 4),
            "message": _text(value.get("message"), 300)}


def _alarms(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [a for a in (_alarm(v) for v in value[:MAX_ALARMS]) if a is not None]


def _histogram(value: Any) -> dict[str, Any] | None:
    value = _dict(value)
    counts = _numbers(value.get("counts"), 200)
    if counts is None:
        return None
    edges = _numbers(value.get("edges"), 201)
    return {"edges": edges if edges and len(edges) == len(counts) + 1 else None, "counts": counts}


def _distribution(value: Any) -> list[float | None] | None:
    values = _numbers(value, 10)
    return values if values is not None and len(values) == 10 else None


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present: agents of different versions name some fields differently."""
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def _sample(section: dict[str, Any]) -> dict[str, Any]:
    """What a window or the reference says about the reads it holds."""
    positions = _first(section, "by_position", "digit_distribution_by_position")
    rows = [_distribution(row) for row in positions[:12]] if isinstance(positions, list) else []
    digits_per_frame = _dict(section.get("digits_per_frame"))
    complete = section.get("complete")
    return {
        "reads": _num(section.get("reads")),
        "complete": complete if isinstance(complete, bool) else None,
        "span_s": _round(section.get("span_s"), 1),
        "digit_distribution": _distribution(section.get("digit_distribution")),
        "by_position": [row for row in rows if row is not None],
        "confidence_histogram": _histogram(section.get("confidence_histogram")),
        "review_rate": _round(section.get("review_rate"), 4),
        "review_rate_by_reason": _flat(section.get("review_rate_by_reason")),
        "digits_per_frame_mean": _round(digits_per_frame.get("mean"), 3),
        "input_quality": _flat(_first(section, "input_quality", "quality")),
    }


def _chute_threshold(value: Any) -> dict[str, Any] | None:
    """The chute bar of a line with a sort plan (None without one), to four and more decimals."""
    value = _dict(value)
    if _num(value.get("threshold")) is None:
        return None
    acceptance = value.get("acceptance")
    return {"threshold": _round(value.get("threshold"), 6), "strict": _round(value.get("strict"), 6),
            "acceptance": acceptance if acceptance in ("spent", "per_item") else None,
            "reads": _num(value.get("reads")), "min_reads": _num(value.get("min_reads"))}


def _observability(value: Any) -> dict[str, Any] | None:
    """The model-health part of a health report, in a shape the page can rely on."""
    value = _dict(value)
    if not value:
        return None
    training, drift = _dict(value.get("training")), _dict(value.get("drift"))
    judged = drift.get("judged")
    return {
        "window": _sample(_dict(value.get("window"))),
        "reference": _sample(_dict(value.get("reference"))),
        "training": {
            "digit_distribution": _distribution(_first(training, "digit_distribution", "class_distribution")),
            "confidence_histogram": _histogram(training.get("confidence_histogram")),
        },
        "drift": {
            "judged": judged if isinstance(judged, bool) else None,
            "figures": _flat(drift.get("figures")),
            "levels": _flat(drift.get("levels")),
            "alarms": _alarms(drift.get("alarms")),
        },
    }


def _read(value: Any, now: float) -> dict[str, Any] | None:
    value = _dict(value)
    if not value:
        return None
    crops = value.get("crops_png")
    if not (isinstance(crops, str) and len(crops) <= MAX_CROPS_CHARS and BASE64.match(crops)):
        crops = None
    digits = value.get("digits")
    digits = [{"digit": d.get("digit") if isinstance(d.get("digit"), int) else None,
               "confidence": _round(d.get("confidence"), 4)}
              for d in (digits[:12] if isinstance(digits, list) else []) if isinstance(d, dict)]
    accepted = value.get("accepted")
    return {
        "result_id": _text(value.get("result_id"), 100),
        "item_id": _text(value.get("item_id"), 100),
        "postcode": _text(value.get("postcode"), 32),
        "accepted": accepted if isinstance(accepted, bool) else None,
        "reason": _text(value.get("reason"), 64),
        "confidence": _round(value.get("confidence"), 4),
        "digits": digits,
        "decided_at": _round(value.get("decided_at"), 3) or round(now, 3),
        "latency_ms": _round(value.get("latency_ms"), 2),
        "crops_png": crops,
    }


class _Line:
    """Everything kept about one line (guarded by the SiteState's lock)."""

    def __init__(self, line_id: str) -> None:
        self.line_id = line_id
        self.status: dict[str, Any] | None = None
        self.status_at: float | None = None  # when that status was true (its "at", or arrival)
        self.health: dict[str, Any] | None = None
        self.health_at: float | None = None  # arrival
        self.drift: dict[str, Any] | None = None
        self.drift_at: float | None = None
        self.fine: deque[SeriesPoint] = deque(maxlen=FINE_MAX_POINTS)
        self.coarse: deque[SeriesPoint] = deque(maxlen=int(MAX_MINUTES * 60 / COARSE_STEP_S) + 1)
        self.reads: deque[dict[str, Any]] = deque(maxlen=MAX_READS)
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)
        self.sync: dict[str, Any] | None = None  # edge-sync's retained state, normalised
        self.sync_at: float | None = None  # arrival
        self.channel: str | None = None  # from the sync state or the last pull's "check" step
        self.pin: str | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_SYNC_EVENTS)  # sync steps, model switches
        self.running: str | None = None  # the version the agent last said it runs
        self.diverged_since: float | None = None  # running != active since then
        self.last_heard: float = 0.0
        self._previous: tuple[float, float, float] | None = None  # (arrival, reads, accepted)

    def health_period_s(self) -> float:
        period = _num(_dict(self.health).get("health_period_s"))
        return period if period and period > 0 else DEFAULT_HEALTH_PERIOD_S

    def saw_running(self, version: Any, now: float) -> None:
        version = _version(version)
        if version is not None:
            self.running = version
        self.track_rollout(now)

    def track_rollout(self, now: float) -> None:
        """Start (or stop) the clock on a difference between the running and the active version."""
        active = self.sync["active"] if self.sync else None
        if active and self.running and active != self.running:
            if self.diverged_since is None:
                self.diverged_since = now
        else:
            self.diverged_since = None

    def add_point(self, health: dict[str, Any], now: float) -> None:
        rates = _dict(health.get("rates"))
        counters = _dict(health.get("counters"))
        reads, accepted = _num(counters.get("reads")), _num(counters.get("accepted"))
        rate, auto_sort = _num(rates.get("reads_per_min")), _num(rates.get("auto_sort_pct"))
        # Agents without "rates": the same figures from the change in their counters.
        if reads is not None and accepted is not None:
            if (rate is None or auto_sort is None) and self._previous is not None:
                then, reads_then, accepted_then = self._previous
                if now > then and reads >= reads_then:
                    if rate is None:
                        rate = (reads - reads_then) * 60.0 / (now - then)
                    if auto_sort is None and reads > reads_then:
                        auto_sort = 100.0 * (accepted - accepted_then) / (reads - reads_then)
            self._previous = (now, reads, accepted)
        by_reason = rates.get("review_pct_by_reason")
        review = None
        if isinstance(by_reason, dict):
            review = sum(v for v in (_num(x) for x in by_reason.values()) if v is not None)
        elif auto_sort is not None:
            review = 100.0 - auto_sort
        latency = _dict(_dict(health.get("stages_ms")).get("trigger_to_result")) or _dict(health.get("latency_ms"))
        point = SeriesPoint(now, _round(rate), _round(auto_sort), _round(review), _round(latency.get("p50"), 3),
                            _round(latency.get("p99"), 3), _num(_dict(health.get("outbox")).get("pending")))
        self.fine.append(point)
        while self.fine and self.fine[0].at < now - FINE_SPAN_S:
            self.fine.popleft()
        # The coarse series keeps the latest point of each minute.
        if self.coarse and self.coarse[-1].at // COARSE_STEP_S == now // COARSE_STEP_S:
            self.coarse[-1] = point
        else:
            self.coarse.append(point)

    def series(self, minutes: int, now: float) -> dict[str, list[Any]]:
        since = now - minutes * 60.0
        source = self.fine if minutes * 60.0 <= FINE_SPAN_S else self.coarse
        points = [p for p in source if p.at >= since]
        if len(points) > MAX_CHART_POINTS:
            step = math.ceil(len(points) / MAX_CHART_POINTS)
            points = points[::-1][::step][::-1]  # keep the newest point
        columns: dict[str, list[Any]] = {name: [] for name in SERIES_FIELDS}
        for point in points:
            for name, value in zip(SERIES_FIELDS, point):
                columns[name].append(round(value, 1) if name == "at" else value)
        return columns


class SiteState:
    """Thread-safe view of every line of one site, fed with raw MQTT payloads."""

    def __init__(self, site: str, clock: Callable[[], float] = time.time, *, broker: str = "") -> None:
        self.site = site
        self.broker_address = broker
        self._clock = clock
        self._lock = threading.Lock()
        self._lines: dict[str, _Line] = {}
        self._broker_state = BrokerState.CONNECTING
        self._broker_since = clock()
        self._broker_error: str | None = None
        self._ignored = 0  # messages that were not JSON objects, too big, or for a bad line id

    # -- feeding ---------------------------------------------------------------------------------

    def broker_connected(self, now: float | None = None) -> None:
        """edge-web's own MQTT connection is up (retained status and drift come again)."""
        with self._lock:
            if self._broker_state is not BrokerState.CONNECTED:
                self._broker_state, self._broker_since = BrokerState.CONNECTED, self._now(now)
            self._broker_error = None

    def broker_lost(self, error: str, now: float | None = None) -> None:
        """edge-web's own MQTT connection is down: keep the last known state, say so."""
        with self._lock:
            if self._broker_state is not BrokerState.UNREACHABLE:
                self._broker_state, self._broker_since = BrokerState.UNREACHABLE, self._now(now)
            self._broker_error = error[:300]

    def handle(self, line_id: str, kind: MessageKind, payload: bytes, *, retained: bool = False,
               now: float | None = None) -> bool:
        """Take one message about one line; False (and counted) when it is not usable."""
        if not LINE_ID.match(line_id) or len(payload) > MAX_PAYLOAD_BYTES:
            return self._ignore()
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return self._ignore()
        if not isinstance(body, dict):
            return self._ignore()
        with self._lock:
            now = self._now(now)
            line = self._line(line_id, now)
            line.last_heard = now
            if kind is MessageKind.STATUS:
                at = _num(body.get("at"))
                line.status = _flat(body)
                # A retained status may be old news: it was true at its own "at", not now.
                line.status_at = min(at, now) if retained and at is not None else now
                line.saw_running(body.get("model_version"), now)
            elif kind is MessageKind.HEALTH:
                line.health, line.health_at = body, now
                line.add_point(body, now)
                line.saw_running(body.get("model_version"), now)
            elif kind is MessageKind.READ:
                read = _read(body, now)
                if read is not None:
                    line.reads.append(read)
            elif kind is MessageKind.DRIFT:
                state = body.get("state")
                judged = body.get("judged")
                line.drift = {"state": state if state in ("alarm", "ok") else None,
                              "alarms": _alarms(body.get("alarms")), "at": _round(body.get("at"), 3),
                              "judged": judged if isinstance(judged, bool) else None}
                line.drift_at = now
            elif kind is MessageKind.ERROR:
                line.errors.append({"at": round(now, 3), "kind": _text(body.get("kind"), 64),
                                    "error": _text(body.get("error"), 300)})
            elif kind is MessageKind.SYNC:
                line.sync, line.sync_at = _sync_state(body), now
                if line.sync["channel"]:
                    line.channel = line.sync["channel"]
                line.track_rollout(now)
            elif kind is MessageKind.SYNC_EVENT:
                event = _sync_event(body, now)
                if event is None:
                    self._ignored += 1
                    return False
                if event["event"] == "check":
                    # edge-sync names the channel (and a pin) only at the start of each pull.
                    line.channel = event["channel"] or line.channel
                    line.pin = _version(body.get("pin"))
                line.events.append(event)
            elif kind is MessageKind.MODEL_EVENT:
                event = _model_event(body, now)
                if event is None:
                    self._ignored += 1
                    return False
                line.events.append(event)
                line.saw_running(event["to"], now)
        return True

    def _ignore(self) -> bool:
        with self._lock:
            self._ignored += 1
        return False

    def _line(self, line_id: str, now: float) -> _Line:
        line = self._lines.get(line_id)
        if line is None:
            if len(self._lines) >= MAX_LINES:
                # Forget the line heard from longest ago rather than grow without bound.
                oldest = min(self._lines.values(), key=lambda item: item.last_heard)
                del self._lines[oldest.line_id]
            line = self._lines[line_id] = _Line(line_id)
        return line

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    # -- reading ---------------------------------------------------------------------------------

    def line_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._lines)

    def snapshot(self, minutes: int = 30, now: float | None = None) -> dict[str, Any]:
        """Every line, the broker connection and a summary, as JSON-ready values."""
        with self._lock:
            now = self._now(now)
            majority = self._majority_version()
            lines = [self._line_view(self._lines[k], minutes, now, majority) for k in sorted(self._lines)]
            broker = self._broker_view(now)
            ignored = self._ignored
        versions = Counter(v["model_version"] for v in lines if v["model_version"])
        return {
            "site": self.site,
            "generated_at": round(now, 3),
            "broker": broker,
            "summary": {
                "lines": len(lines),
                "up": sum(v["status"] == LineStatus.UP.value for v in lines),
                "down": sum(v["status"] == LineStatus.DOWN.value for v in lines),
                "drift_alarms": sum(v["drift"]["state"] == "alarm" for v in lines),
                "model_versions": dict(sorted(versions.items())),
                "model_majority": majority,
                "model_mismatches": sum(v["model"]["rollout"] == Rollout.MISMATCH.value for v in lines),
                "canary_lines": sum(v["model"]["canary"] for v in lines),
                "sync_problems": sum(v["sync"]["problem"] is not None for v in lines),
                "ignored_messages": ignored,
            },
            "lines": lines,
        }

    def line(self, line_id: str, minutes: int = 30, now: float | None = None) -> dict[str, Any] | None:
        """One line's view, or None when nothing was heard from it."""
        with self._lock:
            line = self._lines.get(line_id)
            if line is None:
                return None
            now = self._now(now)
            view = self._line_view(line, minutes, now, self._majority_version())
            view["broker"] = self._broker_view(now)
        return view

    def _majority_version(self) -> str | None:
        """The version most lines run, when more lines run it than any other (guarded by the lock)."""
        counts = Counter(v for v in (line.running or (line.sync or {}).get("active")
                                     for line in self._lines.values()) if v).most_common(2)
        if not counts or (len(counts) == 2 and counts[0][1] == counts[1][1]):
            return None
        return counts[0][0]

    def _broker_view(self, now: float) -> dict[str, Any]:
        return {"state": self._broker_state.value, "connected": self._broker_state is BrokerState.CONNECTED,
                "address": self.broker_address, "since": round(self._broker_since, 3),
                "for_s": round(now - self._broker_since, 1), "error": self._broker_error}

    def line_status(self, line: _Line, now: float) -> tuple[LineStatus, str]:
        """Up, down or unknown, and why (guarded by the lock)."""
        if self._broker_state is not BrokerState.CONNECTED:
            heard = f"{now - line.last_heard:.0f} s ago" if line.last_heard else "never"
            return LineStatus.UNKNOWN, f"broker unreachable; last heard {heard}"
        status = line.status or {}
        if status.get("state") == "offline":
            reason = status.get("reason") or "offline"
            return LineStatus.DOWN, "agent stopped" if reason == "stopped" else f"agent offline: {reason}"
        # Silence is measured from when edge-web could hear again, not across its own outage.
        heard_from = max(line.health_at or 0.0, self._broker_since)
        period = line.health_period_s()
        if line.health_at is not None and now - heard_from > MISSED_HEALTH_PERIODS * period:
            return LineStatus.DOWN, f"no health report for {now - line.health_at:.0f} s"
        if status.get("state") == "online":
            ttl = _num(status.get("ttl_s"))
            age = now - (line.status_at or now)
            if ttl is not None and age > ttl:
                return LineStatus.DOWN, f"status not refreshed for {age:.0f} s (ttl {ttl:.0f} s)"
            return LineStatus.UP, "online"
        if line.health_at is not None:
            return LineStatus.UP, "reporting health"
        return LineStatus.DOWN, "no status or health heard"

    def _line_view(self, line: _Line, minutes: int, now: float, majority: str | None) -> dict[str, Any]:
        status, reason = self.line_status(line, now)
        health = line.health or {}
        rates = _dict(health.get("rates"))
        latest = line.fine[-1] if line.fine else None
        by_reason = {str(k)[:64]: _round(v) for k, v in list(_dict(rates.get("review_pct_by_reason")).items())[:20]}
        stages = _dict(health.get("stages_ms"))
        observability = _observability(health.get("observability"))
        drift = self._drift_view(line, observability)
        agent = line.status or {}
        return {
            "line": line.line_id,
            "status": status.value,
            "status_reason": reason,
            "agent": {"state": agent.get("state"), "reason": agent.get("reason"), "client_id": agent.get("client_id"),
                      "protocol": agent.get("protocol"), "since": _round(agent.get("since"), 3),
                      "ttl_s": _num(agent.get("ttl_s"))},
            "last_heard_s": round(now - line.last_heard, 1) if line.last_heard else None,
            "health_age_s": round(now - line.health_at, 1) if line.health_at is not None else None,
            "health_period_s": line.health_period_s(),
            "model_version": line.running or (line.sync or {}).get("active"),
            "metrics_url": _url(health.get("metrics_url")),
            "rates": {
                "reads_per_min": latest.reads_per_min if latest else None,
                "auto_sort_pct": latest.auto_sort_pct if latest else None,
                "review_pct": latest.review_pct if latest else None,
                "review_pct_by_reason": by_reason,
            },
            "latency_ms": {"p50": latest.p50_ms if latest else None, "p99": latest.p99_ms if latest else None},
            "stages_ms": {stage: _percentiles(stages.get(stage)) for stage in STAGES if stage in stages},
            "counters": _flat(health.get("counters")),
            "queue": _flat(health.get("queue")),
            "outbox": _flat(health.get("outbox")),
            "camera": _flat(health.get("camera")) or None,
            "mqtt": _flat(health.get("mqtt")) or None,
            "system": _flat(health.get("system")) or None,
            "observability": observability,
            "chute_threshold": _chute_threshold(health.get("chute_threshold")),
            "drift": drift,
            "model": self._model_view(line, status, now, majority),
            "sync": self._sync_view(line, now),
            "sync_events": list(reversed(line.events)),
            "series": line.series(minutes, now),
            "reads": list(reversed(line.reads)),
            "errors": list(reversed(line.errors)),
        }

    @staticmethod
    def _drift_view(line: _Line, observability: dict[str, Any] | None) -> dict[str, Any]:
        """The fresher of the retained drift event and the health report's drift section."""
        from_health = observability["drift"] if observability else None
        if line.drift is not None and (from_health is None or (line.drift_at or 0) >= (line.health_at or 0)):
            alarms = line.drift["alarms"]
            state = line.drift["state"] or ("alarm" if alarms else "ok")
            return {"state": state, "alarms": alarms, "at": line.drift["at"], "judged": line.drift["judged"]}
        if from_health is not None:
            return {"state": "alarm" if from_health["alarms"] else "ok", "alarms": from_health["alarms"],
                    "at": None, "judged": from_health["judged"]}
        return {"state": None, "alarms": [], "at": None, "judged": None}

    @staticmethod
    def _model_view(line: _Line, status: LineStatus, now: float, majority: str | None) -> dict[str, Any]:
        """Which version runs, which one sync made active, and whether that is a rollout to watch."""
        sync = line.sync or {}
        active, running = sync.get("active"), line.running
        grace = MISMATCH_HEALTH_PERIODS * line.health_period_s()
        diverged_for = None if line.diverged_since is None else round(now - line.diverged_since, 1)
        if status is not LineStatus.UP or not active or not running:
            rollout = Rollout.UNKNOWN  # a stopped agent runs nothing; without sync there is no target
        elif diverged_for is None:
            rollout = Rollout.IN_SYNC
        else:
            rollout = Rollout.MISMATCH if diverged_for > grace else Rollout.SWITCHING
        version = running or active
        canary_reason = None
        if line.channel and line.channel != STABLE_CHANNEL:
            canary_reason = f"channel {line.channel}"
        elif version and majority and version != majority:
            canary_reason = f"runs {version}; most lines run {majority}"
        return {
            "running": running, "active": active, "previous": sync.get("previous"),
            "channel": line.channel, "pin": line.pin,
            "rollout": rollout.value,
            "mismatch": rollout is Rollout.MISMATCH,
            "mismatch_for_s": diverged_for if rollout is Rollout.MISMATCH else None,
            "mismatch_reason": (f"agent runs {running}, sync's active version is {active} (for {diverged_for:.0f} s)"
                                if rollout is Rollout.MISMATCH else None),
            "canary": canary_reason is not None, "canary_reason": canary_reason,
        }

    @staticmethod
    def _sync_view(line: _Line, now: float) -> dict[str, Any]:
        """edge-sync's last word on this line, with how long ago, and the problem if it is one."""
        sync = line.sync
        if sync is None:
            return {"heard": False, "at": None, "age_s": None, "last_result": None, "last_error": None,
                    "problem": None}
        result = sync["last_result"]
        if result is not None:
            result = {**result, "age_s": None if result["at"] is None else round(max(0.0, now - result["at"]), 1)}
        problem = None
        if result is not None and result["outcome"] in SYNC_PROBLEMS:
            problem = {"outcome": result["outcome"], "version": result["version"],
                       "reason": result["reason"] or sync["last_error"] or result["outcome"].replace("_", " ")}
        at = sync["at"] or round(line.sync_at or now, 3)
        return {"heard": True, "at": at, "age_s": round(max(0.0, now - at), 1), "last_result": result,
                "last_error": sync["last_error"], "problem": problem}
