"""edge-sync on MQTT: step events, the retained sync state, and the post-activation health check.

The only paho import in ``sync/``. MQTT is best effort: a broker that cannot be reached is one
warning, and the pull goes on (without events and without a health check).

Topics (``<prefix>/<site>/<line>/...``):
  events/sync   every step event of a pull, JSON, QoS 0
  sync          retained, QoS 1: {active, previous, last_result, last_error, at}
  status        read: the agent's retained status (state, model_version)
  events/health read: the agent's periodic health (model_version, counters.accepted / reviews)
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

log = logging.getLogger("sync.mqtt")


@dataclass(frozen=True)
class HealthCriteria:
    timeout_s: float = 60.0
    min_reads: int = 5
    max_review_pct: float = 90.0


@dataclass(frozen=True)
class HealthVerdict:
    healthy: bool
    reason: str
    reads: int = 0
    review_pct: float | None = None
    judged: bool = True  # False: the broker link was lost, so the line could not be watched


class SyncMqtt:
    """A small client: connect, publish events and the retained state, watch status and health."""

    def __init__(self, host: str, port: int, site: str, line: str, prefix: str = "postcode",
                 connect_timeout_s: float = 5.0, *, username: str | None = None, password: str | None = None,
                 tls: bool = False, ca_file: Path | None = None):
        self.host, self.port = host, port
        self.base = f"{prefix}/{site}/{line}"
        self.connect_timeout_s = connect_timeout_s
        self.connected = False
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._health: queue.Queue[dict[str, Any]] = queue.Queue()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-sync-{uuid.uuid4().hex[:8]}",
                                   protocol=MQTTProtocolVersion.MQTTv311)
        if username:
            # The line's own login: the broker's ACL lets it publish under the line's topics only.
            self._client.username_pw_set(username, password)
        if tls:
            self._client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self.disconnects = 0

    # ------------------------------------------------------------ connection
    def connect(self) -> bool:
        """True when connected; else one warning line and False (the caller goes on without MQTT)."""
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            log.warning(f"MQTT broker {self.host}:{self.port} unreachable ({exc}); "
                        "pulling without MQTT events or health check")
            return False
        self._client.loop_start()
        if not self._connected.wait(self.connect_timeout_s):
            self._client.loop_stop()
            log.warning(f"MQTT broker {self.host}:{self.port} did not accept a connection within "
                        f"{self.connect_timeout_s:.0f} s; pulling without MQTT events or health check")
            return False
        self.connected = True
        return True

    def close(self) -> None:
        if self.connected:
            self._client.disconnect()
            self._client.loop_stop()
            self.connected = False

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            return
        client.subscribe([(f"{self.base}/status", 1), (f"{self.base}/events/health", 0)])
        self._connected.set()

    def link_up(self) -> bool:
        return self._client.is_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if self.connected:
            self.disconnects += 1

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if message.topic.endswith("/status"):
            with self._lock:
                self._status = payload
        else:
            self._health.put(payload)

    # ------------------------------------------------------------ publishing
    def _publish(self, topic: str, data: dict[str, Any], qos: int, retain: bool) -> None:
        if not self.connected:
            return
        info = self._client.publish(topic, json.dumps(data, sort_keys=True), qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            pass  # lost connection: best effort

    def event(self, event: dict[str, Any]) -> None:
        self._publish(f"{self.base}/events/sync", {**event, "at": time.time()}, qos=0, retain=False)

    def state(self, state: dict[str, Any]) -> None:
        self._publish(f"{self.base}/sync", {**state, "at": time.time()}, qos=1, retain=True)

    # ------------------------------------------------------------ health check
    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def wait_healthy(self, version: str, criteria: HealthCriteria,
                     clock=time.monotonic) -> HealthVerdict:
        """Within ``timeout_s``: the retained status online on ``version``, and at least ``min_reads``
        answers from ``version`` (accepted + reviews counter deltas since its first health event)
        with a review share of at most ``max_review_pct``. The verdict says why not, if not."""
        deadline = clock() + criteria.timeout_s
        disconnects = self.disconnects
        base: tuple[int, int] | None = None
        reads = reviews = 0
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                break
            try:
                health = self._health.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                health = None
            if health is not None and health.get("model_version") == version:
                counters = health.get("counters") or {}
                accepted, reviewed = int(counters.get("accepted", 0)), int(counters.get("reviews", 0))
                if base is None or accepted < base[0] or reviewed < base[1]:
                    base = (accepted, reviewed)  # first event on the version, or the agent restarted
                    reads = reviews = 0
                else:
                    reads = accepted - base[0] + reviewed - base[1]
                    reviews = reviewed - base[1]
            status = self.status()
            online = status.get("state") == "online" and status.get("model_version") == version
            if online and reads >= max(1, criteria.min_reads) and 100.0 * reviews / reads <= criteria.max_review_pct:
                return HealthVerdict(True, f"{reads} reads on {version}, {100.0 * reviews / reads:.0f}% to review",
                                     reads, round(100.0 * reviews / reads, 1))
        status = self.status()
        waited = f"in {criteria.timeout_s:g} s"
        if self.disconnects != disconnects or not self.link_up():
            return HealthVerdict(False, f"MQTT link to {self.host}:{self.port} lost during the health check; "
                                        f"{version} not judged", reads, judged=False)
        if not (status.get("state") == "online" and status.get("model_version") == version):
            seen = (f"{status.get('state')} on {status.get('model_version')}" if status else "no status")
            return HealthVerdict(False, f"agent status never said online on {version} {waited} (last: {seen})")
        if base is None:
            return HealthVerdict(False, f"no health event from {version} {waited}")
        if reads < max(1, criteria.min_reads):
            return HealthVerdict(False, f"only {reads} reads on {version} {waited} "
                                        f"(need {criteria.min_reads})", reads)
        pct = 100.0 * reviews / reads
        return HealthVerdict(False, f"{pct:.0f}% of {reads} reads on {version} went to review "
                                    f"(max {criteria.max_review_pct:g}%)", reads, round(pct, 1))
