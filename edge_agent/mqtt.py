"""MQTT adapter: delivers the outbox to the broker and receives triggers (the only paho import).

Delivery is at-least-once. The outbox, not paho, is the source of truth: paho's
queue lives in memory, so a message counts as delivered only when the broker's
PUBACK has been written back to the outbox. Subscribers de-duplicate on the
payload's ``result_id``.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import math
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .outbox import Outbox, OutboxError, OutboxMessage
from .types import Check, Clock, TriggerMessage

# The delivery loop looks for expired messages and overdue PUBACKs at most this often (seconds).
HOUSEKEEPING_S = 0.1
# Copied for each result: paho's Properties() rebuilds its tables of names on every call.
_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it untyped

log = logging.getLogger(__name__)


class _RequestedDisconnectNoise(logging.Filter):
    """paho 2.2's loop_forever runs its loop once more after a disconnect() we asked for has closed
    the socket, and logs that as an ERROR ("Client is not connected ... MQTT_CS_DISCONNECTED") at
    about every second clean stop. That state is reached only through a requested disconnect, so
    the record is lowered to DEBUG: an ERROR at every stop would send an operator looking for a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) \
                and record.msg.startswith("Client is not connected") and "MQTT_CS_DISCONNECTED" in record.msg:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")  # paho logs the password flag, never the value
_paho_log.addFilter(_RequestedDisconnectNoise())

PROTOCOLS = ("auto", "5", "3.1.1")
# MQTT v5 reason code "Unsupported Protocol Version"; paho also reports a v3-style
# CONNACK refusal (return code 1) to a v5 CONNECT with this code.
_UNSUPPORTED_PROTOCOL_VERSION = 0x84

TriggerCallback = Callable[[TriggerMessage], None]
# CONNACK reasons that mean "who you are" is wrong, never "which protocol you speak".
_LOGIN_REFUSED = {0x86: "bad user name or password", 0x87: "not authorised", 0x8C: "bad authentication method"}


class MqttError(Exception):
    """The MQTT link is misconfigured or misused."""


class MqttConfigError(MqttError, ValueError):
    """MQTT settings that cannot work; the message names the setting."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the broker; ``ca_certs=None`` uses the system trust store."""

    ca_certs: str | None = None
    certfile: str | None = None  # client certificate, for brokers that authenticate clients by certificate
    keyfile: str | None = None
    # Skip the hostname check only (the certificate chain is still verified): for a
    # broker reached by IP address on an isolated sorting-office LAN.
    insecure: bool = False


@dataclass(frozen=True)
class MqttSettings:
    """Everything the link needs, passed in explicitly; topics default from ``topic_prefix``."""

    host: str
    port: int = 1883
    client_id: str = "postcode-reader"
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None
    protocol: str = "auto"  # "auto": MQTT v5, falling back to 3.1.1 if the broker refuses v5
    topic_prefix: str = "postcode"
    status_topic: str = ""  # retained online/offline, also the last will; default {prefix}/status
    results_topic: str = ""  # default {prefix}/result
    trigger_topic: str = ""  # default {prefix}/trigger
    events_topic: str = ""  # default {prefix}/event; publish_event(kind) uses {events_topic}/{kind}
    result_qos: int = 1
    reconnect_min_delay_s: int = 1
    reconnect_max_delay_s: int = 30
    window: int = 16  # messages in flight (published, PUBACK not yet seen)
    ack_timeout_s: float = 60.0  # connected this long without a PUBACK: publish the message again
    max_queued_events: int = 100  # QoS 0 events paho may hold; beyond that events are counted and dropped
    # Persistent session: the broker keeps the trigger subscription and queues triggers for this
    # long while the agent is away, so none is lost; 0 would make every reconnect a clean start.
    session_expiry_s: int = 3600
    marker_topic: str = ""  # default {prefix}/session-marker: ends the replay of a resumed session
    status_ttl_s: int = 30  # MQTT v5 expiry of the retained "online": a dead agent's status fades
    receive_maximum: int = 1000  # triggers the broker may have in flight to us before our PUBACKs
    replay_timeout_s: float = 10.0  # give up waiting for the session marker after this long
    # Liveness: while connected, a probe goes to the marker topic and back this often; if none
    # comes back for echo_timeout_s the network loop is dead or wedged (vital() says so).
    probe_period_s: float = 5.0
    echo_timeout_s: float = 20.0
    # After a lost connection, messages the broker acknowledged in this many seconds before its
    # last PUBACK are sent again: Mosquitto PUBACKs from memory and saves only every
    # autosave_interval, so a broker killed in between forgets them. Subscribers drop the copies
    # by result_id. 0: never.
    resend_window_s: float = 15.0

    def __post_init__(self) -> None:
        prefix = self.topic_prefix.rstrip("/")
        for name, suffix in (("status_topic", "status"), ("results_topic", "result"),
                             ("trigger_topic", "trigger"), ("events_topic", "event"),
                             ("marker_topic", "session-marker")):
            if not getattr(self, name):
                object.__setattr__(self, name, f"{prefix}/{suffix}")
        errors = []
        if not self.host:
            errors.append("mqtt.host must be set")
        if not 0 < self.port < 65536:
            errors.append(f"mqtt.port must be 1-65535, got {self.port}")
        if not self.client_id:
            errors.append("mqtt.client_id must be set (the broker uses it for the session and the will)")
        if self.keepalive_s < 5:
            errors.append(f"mqtt.keepalive_s must be at least 5, got {self.keepalive_s}")
        if self.password is not None and not self.username:
            errors.append("mqtt.password is set but mqtt.username is not")
        if self.tls and bool(self.tls.certfile) != bool(self.tls.keyfile):
            errors.append("mqtt.tls.certfile and mqtt.tls.keyfile must be given together")
        if self.protocol not in PROTOCOLS:
            errors.append(f"mqtt.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("status_topic", "results_topic", "events_topic"):
            if any(c in getattr(self, name) for c in "+#"):
                errors.append(f"mqtt.{name} must not contain wildcards: {getattr(self, name)!r}")
        if self.result_qos not in (0, 1, 2):
            errors.append(f"mqtt.result_qos must be 0, 1 or 2, got {self.result_qos}")
        if not 1 <= self.reconnect_min_delay_s <= self.reconnect_max_delay_s:
            errors.append("mqtt.reconnect_min_delay_s must be >= 1 and <= mqtt.reconnect_max_delay_s")
        if self.window < 1:
            errors.append(f"mqtt.window must be at least 1, got {self.window}")
        if self.resend_window_s < 0:
            errors.append(f"mqtt.resend_window_s must not be negative, got {self.resend_window_s}")
        if self.ack_timeout_s <= 0:
            errors.append(f"mqtt.ack_timeout_s must be positive, got {self.ack_timeout_s}")
        if self.session_expiry_s < 0:
            errors.append(f"mqtt.session_expiry_s must not be negative, got {self.session_expiry_s}")
        if not 1 <= self.receive_maximum <= 65535:
            errors.append(f"mqtt.receive_maximum must be 1-65535, got {self.receive_maximum}")
        if errors:
            raise MqttConfigError("; ".join(errors))


@dataclass
class _InFlight:
    message_id: int
    mid: int
    sent_at: float  # clock.monotonic()


class MqttLink:
    """Connection to the site broker: publishes the outbox in order, receives triggers.

    Threads: paho's network thread runs the callbacks; one delivery thread reads the
    outbox, publishes and writes acknowledgements back. Neither holds a lock of ours
    while calling into paho, because paho calls ``on_publish`` with its own message
    lock held (a lock taken in both orders would deadlock).
    """

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        clock: Clock,
        on_trigger: TriggerCallback | None = None,
    ) -> None:
        self.settings = settings
        self._outbox = outbox
        self._clock = clock
        self.on_trigger = on_trigger  # may also be set after construction, before start()
        self.on_ack_latency: Callable[[float], None] | None = None  # seconds from publish to PUBACK
        # Extra fields of the retained "online" status (the model version the agent runs).
        self.status_fields: dict[str, Any] = {}
        self._use_v5 = settings.protocol in ("auto", "5")
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # Held while deciding to publish "online" and while stop() raises _stopping, so that an
        # "online" from a late SUBACK can never land after stop()'s retained "offline".
        self._status_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards everything below
        self._inflight: dict[int, _InFlight] = {}  # paho mid -> message
        self._inflight_ids: dict[int, int] = {}  # outbox id -> paho mid
        self._acked: list[int] = []  # outbox ids acknowledged, not yet written to the outbox
        self._early: dict[int, bool] = {}  # acks that beat publish() returning its mid
        self._publishing = False
        self._fallback_requested = False
        self._connected_at = 0.0  # clock.monotonic() of the last successful connect
        self._hold_until = 0.0  # after a rejected PUBACK, pause instead of hammering the broker
        self._quiet_connect_errors = False
        self._connack_seen = False  # on the current connection attempt, any CONNACK at all
        self._v5_confirmed = False  # the broker once accepted MQTT v5: never fall back after that
        self._intake_open = True
        # Held from the intake check to the end of on_trigger (paho's thread) and by close_intake.
        self._intake_lock = threading.Lock()
        self._replaying = False  # until our session marker comes back, triggers are the session's backlog
        self._marker = ""
        self._reconnected_at: float | None = None  # clock.monotonic() of a reconnect after a lost connection
        self._had_connection = False
        self._online_since = 0.0
        self._subscribed = False  # the broker holds our trigger subscription (on this connection)
        self._subscribe_mid: int | None = None
        self._probe_sent_at: float | None = None  # clock.monotonic() of the last liveness probe
        self._echo_at = 0.0  # clock.monotonic() of the last probe that came back
        self._probes = 0
        # Highest outbox id handed to paho; 0 means "look from the start" (after a message
        # has to go out again: rejected, unacknowledged for too long, or a new client).
        self._cursor = 0
        self._housekeeping_at = float("-inf")  # clock.monotonic() of the last expiry and ack-timeout pass
        # (clock.monotonic(), outbox id) of the PUBACKs of the last resend_window_s on this connection
        self._recent_acks: collections.deque[tuple[float, int]] = collections.deque()
        self._resend_ids: set[int] = set()  # acknowledged just before a lost connection: to send again
        self._resend: list[OutboxMessage] = []  # those loaded from the outbox, published before the pending ones
        self._counts = dict.fromkeys(
            ("connects", "disconnects", "published", "acked", "rejected", "republished", "expired",
             "events_sent", "events_dropped", "triggers", "replayed_triggers", "login_refused", "resent"), 0)
        outbox.add_listener(self.wake)
        # paho.topic_matches_sub builds a matcher on every call; a topic without wildcards
        # (the usual trigger topic) is matched by equality.
        trigger_topic = settings.trigger_topic
        self._is_trigger_topic: Callable[[str], bool] = (
            (lambda topic: paho.topic_matches_sub(trigger_topic, topic))
            if "+" in trigger_topic or "#" in trigger_topic else trigger_topic.__eq__)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start connecting (in the background; a broker that is down is retried forever) and delivering."""
        if self._thread is not None:
            raise MqttError("MqttLink.start() called twice")
        self._build_client()
        self._thread = threading.Thread(target=self._deliver_loop, name="mqtt-deliver", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish the retained ``offline`` status, disconnect and stop; pending messages stay in the outbox."""
        self._outbox.remove_listener(self.wake)
        with self._status_lock:
            self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        client = self._client
        if client is None:
            return
        if self._connected.is_set():
            info = self._publish_status(client, "offline", "stopped")
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                log.warning("could not publish the offline status before disconnecting")
        client.disconnect()
        client.loop_stop()
        self._connected.clear()
        self._flush_acks()  # acknowledgements that arrived while stopping

    def __enter__(self) -> "MqttLink":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while a CONNACK-accepted connection is up and paho's network thread still runs it."""
        return self._connected.is_set() and self._network_thread_alive()

    def _network_thread_alive(self) -> bool:
        # paho keeps its network thread in Client._thread and sets it to None when the thread
        # ends (an exception escaping a callback ends it); it has no public liveness API, and
        # after that death is_connected() still says True while nothing is sent or received.
        client = self._client
        thread = getattr(client, "_thread", None) if client is not None else None
        return thread is not None and thread.is_alive()

    def vital(self) -> Check:
        """Whether the MQTT side is alive: paho's network thread, our delivery loop, the probe echo."""
        if self._client is None or self._stopping.is_set():
            return Check(True, "not running")
        if not self._network_thread_alive():
            return Check(False, "the MQTT network thread has ended; nothing is sent or received")
        if self._thread is not None and not self._thread.is_alive():
            return Check(False, "the MQTT delivery loop has ended")
        if not self._connected.is_set():
            return Check(True, f"connecting to {self.settings.host}:{self.settings.port}")
        now = self._clock.monotonic()
        with self._state_lock:
            evidence = max(self._echo_at, self._connected_at)
        silent = now - evidence
        if silent > self.settings.echo_timeout_s:
            return Check(False, f"connected, but no probe came back from the broker for {silent:.0f} s")
        return Check(True, "connected")

    @property
    def protocol(self) -> str:
        """The protocol in use or being tried: "5" or "3.1.1"."""
        return "5" if self._use_v5 else "3.1.1"

    def close_intake(self) -> None:
        """Take no more triggers: later ones stay unacknowledged, so the broker keeps them for the next run.

        Returns only once a trigger being handed over (checked open, not yet given to
        ``on_trigger``) is in the agent's hands: an agent that waits for what it took in after
        this call can then not miss one that it acknowledges a moment later.
        """
        with self._intake_lock:
            self._intake_open = False

    def ack(self, token: Any) -> None:
        """Acknowledge a trigger to the broker (PUBACK) once it is safely journaled."""
        client, mid, qos = token
        if qos == 0 or client is not self._client:
            # A PUBACK on a newer connection would name another message. The broker
            # redelivers this one to the resumed session and the journal recognises it.
            return
        client.ack(mid, qos)

    def resend_after_connect(self, message_ids: Iterable[int]) -> None:
        """Send these delivered messages again once connected (the agent's start after a crash:
        the broker may have died with it, forgetting what it had acknowledged)."""
        with self._state_lock:
            self._resend_ids.update(message_ids)
        self._wake.set()

    def publish_state(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Publish a retained state message on ``{prefix}/{kind}`` (QoS 1); False if not connected now.

        For states a late subscriber must see at once (drift alarms); the caller publishes
        again after a reconnect if it could not.
        """
        if not kind or any(c in kind for c in "/+#"):
            raise ValueError(f"state kind must be a plain word, got {kind!r}")
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        payload = json.dumps(dict(data), sort_keys=True, default=str).encode()
        info = client.publish(f"{self.settings.topic_prefix.rstrip('/')}/{kind}", payload, qos=1, retain=True)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def refresh_status(self) -> None:
        """Publish the retained "online" again, so its expiry never runs out while the agent lives."""
        client = self._client
        if client is not None and self._connected.is_set() and self._subscribed:
            self._publish_online(client)

    def wake(self) -> None:
        """Make the delivery loop look at the outbox now (the outbox calls this after each add)."""
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending or in flight; True if that happened within ``timeout_s``."""
        deadline = self._clock.monotonic() + timeout_s
        while True:
            with self._state_lock:
                busy = bool(self._inflight or self._acked)
            if not busy and self._outbox.stats()["pending"] == 0:
                return True
            if self._stopping.is_set() or self._clock.monotonic() >= deadline:
                return False
            self._wake.set()
            self._stopping.wait(0.05)

    # ------------------------------------------------------------------ pipeline-facing

    def submit(
        self,
        payload: bytes,
        audit: Mapping[str, Any],
        *,
        expires_at: float | None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> list[int]:
        """Store a result for delivery: always to the results topic, and also to a trigger's response topic.

        The results topic always gets the result, because the sorting machines and the
        audit listeners subscribe there whoever asked. A PLC that sent an MQTT v5
        trigger with a ResponseTopic also gets a direct reply carrying its
        CorrelationData, so it can match the answer to its request without parsing.
        """
        ids = [self._outbox.add(self.settings.results_topic, payload, self.settings.result_qos,
                                expires_at, audit)]
        if response_topic:
            if any(c in response_topic for c in "+#"):
                log.warning("ignoring trigger response topic with wildcards: %r", response_topic)
            else:
                ids.append(self._outbox.add(response_topic, payload, self.settings.result_qos, expires_at,
                                            audit, correlation_data=correlation_data))
        return ids

    def publish_event(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Publish a non-critical event (QoS 0, not stored); False if it could not be sent now."""
        if not kind or any(c in kind for c in "/+#"):
            raise ValueError(f"event kind must be a plain word, got {kind!r}")
        client = self._client
        if client is None or not self._connected.is_set():
            self._count("events_dropped")
            return False
        payload = json.dumps(dict(data), sort_keys=True, default=str).encode()
        info = client.publish(f"{self.settings.events_topic}/{kind}", payload, qos=0)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("events_dropped")
            return False
        self._count("events_sent")
        return True

    def stats(self) -> dict[str, Any]:
        """Connection state and counters since start (the outbox keeps the durable totals)."""
        with self._state_lock:
            counts = dict(self._counts)
            inflight = len(self._inflight)
        return {"connected": self.connected, "protocol": self.protocol, "inflight": inflight, **counts}

    # ------------------------------------------------------------------ paho client

    def _build_client(self) -> paho.Client:
        s = self.settings
        # Manual acknowledgement: a trigger is acknowledged only once it is journaled, so a
        # crash between the two makes the broker deliver it again instead of losing it.
        if self._use_v5:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                                 protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
        else:
            # Persistent session: triggers sent while we are away wait at the broker. Their
            # envelopes have passed the camera by then, so they come back marked as replayed
            # and are answered as review, but they are answered.
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                                 clean_session=s.session_expiry_s == 0,
                                 protocol=MQTTProtocolVersion.MQTTv311, manual_ack=True)
        client.enable_logger(_paho_log)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set(ca_certs=s.tls.ca_certs, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                           cert_reqs=ssl.CERT_REQUIRED)
            if s.tls.insecure:
                client.tls_insecure_set(True)
        client.will_set(s.status_topic, self._status_payload("offline", "connection lost"), qos=1, retain=True)
        client.reconnect_delay_set(s.reconnect_min_delay_s, s.reconnect_max_delay_s)
        # Our window bounds what we hand to paho; paho's queue limit sits above it so that it
        # never refuses (or, for a full queue, silently drops) a result, and the headroom
        # is for the status message and QoS 0 events.
        # 0 = no limit in paho: our window is the limit. With a limit, paho scans every message it
        # holds on each PUBACK (``_update_inflight``), a fifth of its network thread's time with
        # a full window.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(s.window + s.max_queued_events + 2)
        client.on_connect = self._on_connect
        client.on_socket_open = self._on_socket_open
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        log.info("MQTT connecting to %s:%d as %s (MQTT %s, tls=%s, user=%s)", s.host, s.port, s.client_id,
                 self.protocol, s.tls is not None, s.username or "-")
        if self._use_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = s.receive_maximum
            client.connect_async(s.host, s.port, s.keepalive_s, clean_start=s.session_expiry_s == 0,
                                 properties=properties)
        else:
            client.connect_async(s.host, s.port, s.keepalive_s)
        # Published before the network thread starts: callbacks ignore any client but
        # the current one, and the first CONNACK can arrive before we return.
        self._client = client
        client.loop_start()
        return client

    def _status_payload(self, state: str, reason: str = "") -> bytes:
        # "at" lets a reader on MQTT 3.1.1 (no message expiry) see how old an "online" is. The
        # last will has none: it is written at connect time, not when the connection dies.
        body: dict[str, Any] = {"state": state, "client_id": self.settings.client_id}
        if state == "online" or reason == "stopped":
            body["at"] = self._clock.time()
        if state == "online":
            body.update(self.status_fields)
            body["protocol"] = self.protocol
            body["since"] = self._online_since
            body["ttl_s"] = self.settings.status_ttl_s
        else:
            body["reason"] = reason
        return json.dumps(body, sort_keys=True).encode()

    def _publish_online(self, client: paho.Client) -> None:
        # Never after stop() began: its retained "offline" must be the last word. No paho lock
        # is held by stop() while it waits for this lock, so calling paho here cannot deadlock.
        with self._status_lock:
            if not self._stopping.is_set():
                self._publish_status(client, "online")

    def _publish_status(self, client: paho.Client, state: str, reason: str = "") -> paho.MQTTMessageInfo:
        properties = None
        if self._use_v5 and state == "online":
            # A broker restored from disk would otherwise show a dead agent as online for ever.
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = self.settings.status_ttl_s
        return client.publish(self.settings.status_topic, self._status_payload(state, reason), qos=1,
                              retain=True, properties=properties)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._connack_seen = False  # a new attempt: nothing answered yet
        disable_nagle(client, userdata, sock)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        self._connack_seen = True
        if reason_code.is_failure:
            if reason_code.value == _UNSUPPORTED_PROTOCOL_VERSION and self._use_v5 \
                    and self.settings.protocol == "auto" and not self._v5_confirmed:
                log.warning("broker %s refused MQTT v5; falling back to MQTT 3.1.1", self.settings.host)
                with self._state_lock:
                    self._fallback_requested = True
                self._wake.set()
            elif reason_code.value in _LOGIN_REFUSED or str(reason_code).lower().startswith("not authori"):
                self._count("login_refused")
                log.error("broker %s:%d refused the login as %r: %s; check mqtt.username and the password "
                          "(retrying with backoff)", self.settings.host, self.settings.port,
                          self.settings.username or "(anonymous)", reason_code)
            else:
                log.error("broker %s:%d refused the connection: %s (check mqtt.username/password, "
                          "client_id and the broker's ACL)", self.settings.host, self.settings.port, reason_code)
            return
        if self._use_v5:
            self._v5_confirmed = True
        now = self._clock.monotonic()
        with self._state_lock:
            self._counts["connects"] += 1
            self._connected_at = now
            if self._had_connection:
                self._reconnected_at = now
            self._had_connection = True
            # Only a resumed session can hold triggers queued while we were away. Until our
            # marker, published now, comes back behind them, every trigger is that backlog.
            self._replaying = bool(flags.session_present)
            self._marker = uuid.uuid4().hex
        self._online_since = self._clock.time()
        self._quiet_connect_errors = False
        self._connected.set()
        log.info("MQTT connected to %s:%d (MQTT %s, session present=%s)", self.settings.host,
                 self.settings.port, self.protocol, flags.session_present)
        # "online" tells the PLC to send triggers: only once the broker holds our trigger
        # subscription. A resumed session already has it; a new one has it at the SUBACK.
        self._subscribed = bool(flags.session_present)
        if self._subscribed:
            self._publish_online(client)
        # Subscribing again is harmless with a resumed session and needed without one.
        _, self._subscribe_mid = client.subscribe([(self.settings.trigger_topic, 1), (self.settings.marker_topic, 1)])
        if self._replaying:
            client.publish(self.settings.marker_topic, self._marker.encode(), qos=1)
        self._wake.set()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        # paho calls this from inside its `except OSError`, so the cause is at hand; it
        # is what tells a site engineer "refused" from "certificate name mismatch".
        cause = sys.exc_info()[1]
        # Logged once per outage: a broker down for hours would otherwise fill the journal.
        level = logging.DEBUG if self._quiet_connect_errors else logging.WARNING
        hint = " (check mqtt.tls.ca_certs and the name in the broker's certificate)" \
            if isinstance(cause, ssl.SSLError) else ""
        log.log(level, "cannot reach MQTT broker %s:%d: %s%s; retrying with backoff", self.settings.host,
                self.settings.port, cause or "connection failed", hint)
        self._quiet_connect_errors = True

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not was_connected and not self._connack_seen and not self._v5_confirmed and self._use_v5 \
                and self.settings.protocol == "auto" and not self._stopping.is_set():
            # The broker took the TCP connection and closed it without a CONNACK: a 3.1.1-only
            # broker (amqtt, old Mosquitto) that cannot parse a v5 CONNECT does exactly this.
            # A broker that is down refuses the TCP connection instead (_on_connect_fail).
            log.warning("broker %s closed the connection before answering an MQTT v5 CONNECT; "
                        "falling back to MQTT 3.1.1", self.settings.host)
            with self._state_lock:
                self._fallback_requested = True
            self._wake.set()
            return
        if was_connected and self._stopping.is_set():
            log.info("MQTT disconnected from %s:%d on stop", self.settings.host, self.settings.port)
        elif was_connected:
            with self._state_lock:
                self._counts["disconnects"] += 1
                inflight = len(self._inflight)
                self._keep_recent_acks_for_resend()
            # In-flight messages are kept: paho still holds them and resends them (DUP,
            # same mid) after reconnecting, so their PUBACKs still reach _on_publish.
            # Publishing them again from the outbox would duplicate every one of them.
            log.warning("MQTT disconnected from %s:%d (%s); %d message(s) in flight will be resent",
                        self.settings.host, self.settings.port, reason_code, inflight)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        if client is not self._client:
            return
        for rc in reason_codes:
            if rc.is_failure:
                log.error("broker refused the trigger subscription %s: %s (check the broker's ACL)",
                          self.settings.trigger_topic, rc)
        if mid == self._subscribe_mid and not self._subscribed and reason_codes and not reason_codes[0].is_failure:
            self._subscribed = True
            self._publish_online(client)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if client is not self._client:
            return
        token = (client, message.mid, message.qos)
        if message.topic == self.settings.marker_topic:
            with self._state_lock:
                if bytes(message.payload).startswith(b"probe:"):
                    self._echo_at = self._clock.monotonic()
                elif self._replaying and bytes(message.payload).decode("ascii", "replace") == self._marker:
                    self._replaying = False
                    log.info("session backlog replayed (%d trigger(s) in it)", self._counts["replayed_triggers"])
            self.ack(token)
            return
        if self.on_trigger is None or not self._is_trigger_topic(message.topic):
            self.ack(token)
            return
        with self._intake_lock:
            if not self._intake_open:
                return  # stopping: not acknowledged, so the broker hands it to the next run
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            now = self._clock.monotonic()
            with self._state_lock:
                self._counts["triggers"] += 1
                replayed = self._replaying or bool(message.retain)
                self._counts["replayed_triggers"] += replayed
                first = self._reconnected_at is None
                since = None if first else now - self._reconnected_at
            trigger = TriggerMessage(bytes(message.payload), response_topic,
                                     None if correlation is None else bytes(correlation),
                                     received_at=self._clock.time(), ack_token=token, replayed=replayed,
                                     first_connection=first, since_reconnect_s=since)
            try:
                # Runs on paho's network thread: the handler must hand off, not read the camera here.
                self.on_trigger(trigger)
            except Exception:
                # Not acknowledged: the broker delivers it again on the next connection.
                log.exception("trigger handler failed for a message on %s", message.topic)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if client is not self._client:
            return
        ok = not reason_code.is_failure
        with self._state_lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                if self._publishing:  # the PUBACK beat publish() handing us the mid
                    self._early[mid] = ok
                return
            self._settle(entry, ok, reason_code)
        self._wake.set()

    def _settle(self, entry: _InFlight, ok: bool, reason_code: ReasonCode | None = None) -> None:
        """Record a broker answer for one message; caller holds _state_lock."""
        self._inflight_ids.pop(entry.message_id, None)
        if ok:
            self._acked.append(entry.message_id)
            self._counts["acked"] += 1
            if self.settings.resend_window_s > 0:
                now = self._clock.monotonic()
                self._recent_acks.append((now, entry.message_id))
                while self._recent_acks[0][0] < now - self.settings.resend_window_s:
                    self._recent_acks.popleft()
            if self.on_ack_latency is not None:
                self.on_ack_latency(self._clock.monotonic() - entry.sent_at)
        else:
            # A v5 broker refused it (e.g. not authorised on that topic). It stays pending
            # and is retried after a pause: an ACL fix on the broker then lets it through.
            self._counts["rejected"] += 1
            self._cursor = 0
            self._hold_until = self._clock.monotonic() + max(5.0, self.settings.reconnect_min_delay_s)
            log.error("broker refused outbox message %d: %s; retrying later", entry.message_id, reason_code)

    def _count(self, name: str) -> None:
        with self._state_lock:
            self._counts[name] += 1

    # ------------------------------------------------------------------ delivery loop

    def _deliver_loop(self) -> None:
        while not self._stopping.is_set():
            # A tick without a wake-up still runs, for expiry and the ack timeout.
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._maybe_fall_back()
                self._end_stuck_replay()
                self._flush_acks()
                # Every PUBACK wakes this loop: under a burst that is thousands of times a
                # second, and expiry and the ack timeout (seconds) need not be looked at each time.
                now = self._clock.monotonic()
                housekeeping = now - self._housekeeping_at >= HOUSEKEEPING_S
                if housekeeping:
                    self._housekeeping_at = now
                    self._expire_due()
                if self._connected.is_set():
                    self._send_probe()
                    if housekeeping:
                        self._republish_stale()
                    self._load_resend()
                    self._fill_window()
            except OutboxError:
                log.exception("outbox error in the delivery loop; retrying in 5 s")
                self._stopping.wait(5.0)
            except Exception:
                log.exception("unexpected error in the delivery loop; retrying in 1 s")
                self._stopping.wait(1.0)

    def _send_probe(self) -> None:
        """A QoS 0 message to our own marker topic: its return proves the network loop and the broker work."""
        now = self._clock.monotonic()
        if self._probe_sent_at is not None and now - self._probe_sent_at < self.settings.probe_period_s:
            return
        client = self._client
        if client is None:
            return
        self._probe_sent_at = now
        self._probes += 1
        client.publish(self.settings.marker_topic, f"probe:{self._probes}".encode(), qos=0)

    def _end_stuck_replay(self) -> None:
        with self._state_lock:
            stuck = self._replaying and self._connected.is_set() and \
                self._clock.monotonic() - self._connected_at > self.settings.replay_timeout_s
            if stuck:
                self._replaying = False
        if stuck:
            log.warning("the session marker on %s did not come back within %.0f s (broker ACL?); "
                        "treating triggers as live again", self.settings.marker_topic, self.settings.replay_timeout_s)

    def _maybe_fall_back(self) -> None:
        with self._state_lock:
            if not self._fallback_requested:
                return
            self._fallback_requested = False
        old = self._client
        self._client = None  # its late callbacks are ignored from now on
        if old is not None:
            if old.is_connected():  # after a refused CONNECT it is not, and paho would log an error
                old.disconnect()
            old.loop_stop()
        with self._state_lock:
            # The old client's queue died with it: whatever it held goes out again.
            self._cursor = 0
            self._inflight.clear()
            self._inflight_ids.clear()
            self._early.clear()
        self._use_v5 = False
        self._build_client()

    def _flush_acks(self) -> None:
        with self._state_lock:
            acked, self._acked = self._acked, []
        if not acked:
            return
        try:
            self._outbox.mark_delivered_many(acked)
        except OutboxError:
            with self._state_lock:
                self._acked[:0] = acked  # keep them; a later pass writes them
            raise

    def _keep_recent_acks_for_resend(self) -> None:
        """The connection is lost: what the broker acknowledged in the window before its last
        acknowledgement is sent again after reconnecting (it may have died with those unsaved).

        Counted back from the last PUBACK, not from now: a broker host that lost power is noticed
        only when the keepalive runs out, up to 1.5 keepalives (45 s) later. Caller holds _state_lock."""
        self._resend_ids.update(i for _, i in self._recent_acks)
        self._recent_acks.clear()

    def _load_resend(self) -> None:
        """Connected again: load the messages kept by _keep_recent_acks_for_resend from the outbox.

        Runs after _flush_acks, so each of them is marked delivered already.
        """
        with self._state_lock:
            ids, self._resend_ids = self._resend_ids, set()
        if not ids:
            return
        queued = {m.id for m in self._resend}
        again = [m for m in self._outbox.delivered(ids) if m.id not in queued]
        if again:
            self._resend = sorted(self._resend + again, key=lambda m: m.id)
            log.warning("sending again the %d message(s) broker %s:%d acknowledged in the %.0f s before the "
                        "connection or the last run was lost (a broker that died before saving them forgot "
                        "them; subscribers drop duplicates by result_id)", len(again), self.settings.host,
                        self.settings.port, self.settings.resend_window_s)

    def _busy_ids(self) -> set[int]:
        with self._state_lock:
            return set(self._inflight_ids) | set(self._acked)

    def _expire_due(self) -> None:
        # Messages already handed to paho are left alone: paho may still deliver them.
        expired = self._outbox.expire_due(self._clock.time(), exclude=self._busy_ids())
        if expired:
            with self._state_lock:
                self._counts["expired"] += len(expired)

    def _republish_stale(self) -> None:
        now = self._clock.monotonic()
        with self._state_lock:
            since = max(self._connected_at, 0.0)
            stale = [e for e in self._inflight.values()
                     if now - max(e.sent_at, since) > self.settings.ack_timeout_s]
            if stale:
                self._cursor = 0
            for entry in stale:
                del self._inflight[entry.mid]
                self._inflight_ids.pop(entry.message_id, None)
                self._counts["republished"] += 1
        for entry in stale:
            log.warning("no PUBACK for outbox message %d after %.0f s connected; publishing it again",
                        entry.message_id, self.settings.ack_timeout_s)

    def _fill_window(self) -> None:
        while not self._stopping.is_set() and self._connected.is_set():
            with self._state_lock:
                free = self.settings.window - len(self._inflight)
                held = self._clock.monotonic() < self._hold_until
            if free <= 0 or held:
                return
            busy = self._busy_ids()
            with self._state_lock:
                cursor = self._cursor
            # Messages go out in id order, so the next ones are simply those after the last one
            # handed to paho; re-reading the whole window each time capped delivery under a burst.
            limit = free if cursor else free + len(busy)
            batch = [m for m in self._outbox.pending(limit, after_id=cursor) if m.id not in busy]
            if not batch:
                # Copies of what the broker may have lost go out only when nothing new waits: most
                # of their envelopes are gone, while a new result still has its deadline to meet.
                if self._resend and self._send_again(free, busy):
                    continue
                return
            sent: list[int] = []
            try:
                for message in batch[:free]:
                    if not self._publish(message):
                        return  # paho refused: keep the order, try again on the next wake-up
                    sent.append(message.id)
                    with self._state_lock:
                        self._cursor = max(self._cursor, message.id)
            finally:
                # One transaction for the batch: per-message commits capped delivery near 1,500/s.
                self._outbox.record_attempts(sent)

    def _send_again(self, free: int, busy: set[int]) -> bool:
        """Publish up to ``free`` of the queued resends (ones in flight again already are skipped);
        False if paho refused one, which stays queued."""
        batch = [m for m in self._resend[:free] if m.id not in busy]
        taken = len(self._resend[:free])
        sent: list[int] = []
        try:
            for message in batch:
                if not self._publish(message):
                    taken = self._resend.index(message)
                    return False
                sent.append(message.id)
        finally:
            del self._resend[:taken]
            with self._state_lock:
                self._counts["resent"] += len(sent)
            self._outbox.record_attempts(sent)
        return True

    def _publish(self, message: OutboxMessage) -> bool:
        client = self._client
        if client is None:
            return False
        now = self._clock.time()
        if message.expires_at is not None and message.expires_at <= now:
            if self._outbox.mark_expired(message.id):
                self._count("expired")
                log.warning("outbox message %d expired before it could be published", message.id)
            return True
        properties = None
        if self._use_v5 and (message.expires_at is not None or message.correlation_data is not None):
            properties = copy.copy(_PUBLISH_PROPERTIES)  # a third cheaper than building one
            if message.expires_at is not None:
                # The broker discards it when this runs out, so a sorting machine that
                # reconnects late never acts on a result for an envelope already gone.
                properties.MessageExpiryInterval = max(1, math.ceil(message.expires_at - now))
            if message.correlation_data is not None:
                properties.CorrelationData = message.correlation_data
        # Our locks are never held while paho runs (see the class docstring). An ack
        # arriving between paho sending the packet and publish() returning its mid is
        # parked in _early while _publishing is set, and matched just below. Only this
        # thread publishes outbox messages, so one flag is enough.
        with self._state_lock:
            self._publishing = True
            self._early.clear()
        try:
            info = client.publish(message.topic, message.payload, qos=message.qos, properties=properties)
        except ValueError as exc:
            with self._state_lock:
                self._publishing = False
            # A topic paho rejects can never be published; waiting would block the queue forever.
            log.error("outbox message %d can never be published (%s); marking it expired", message.id, exc)
            if self._outbox.mark_expired(message.id):
                self._count("expired")
            return True
        with self._state_lock:
            self._publishing = False
            early = self._early.pop(info.mid, None)
            self._early.clear()
            # NO_CONN for QoS > 0 means paho queued it and sends it after reconnecting.
            accepted = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and message.qos > 0)
            if accepted:
                self._counts["published"] += 1
                entry = _InFlight(message.id, info.mid, self._clock.monotonic())
                if early is not None:
                    self._settle(entry, early)
                else:
                    self._inflight[info.mid] = entry
                    self._inflight_ids[message.id] = info.mid
        if not accepted:
            log.warning("paho did not take outbox message %d (%s); will retry", message.id,
                        paho.error_string(info.rc))
            return False
        return True



def disable_nagle(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho leaves Nagle on: a result written right after a PUBACK would wait ~40 ms for the
    broker's delayed ACK. A sorting line wants each small packet on the wire at once."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a test double): nothing to tune
        pass
