"""The dashboard's only MQTT adapter: subscribes to the site's lines and feeds a SiteState."""

from __future__ import annotations

import logging
import ssl
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from web.config import BrokerSettings
from web.state import MessageKind, SiteState

log = logging.getLogger(__name__)

# topic suffix after <prefix>/<site>/<line>/ -> (kind, QoS). Status, drift and edge-sync's state
# are retained and must not be missed; health, reads and errors come again in seconds; sync steps
# and model switches are QoS 0 events (the retained sync state carries their outcome).
SUBSCRIPTIONS: dict[str, tuple[MessageKind, int]] = {
    "status": (MessageKind.STATUS, 1),
    "drift": (MessageKind.DRIFT, 1),
    "sync": (MessageKind.SYNC, 1),
    "events/health": (MessageKind.HEALTH, 0),
    "events/read": (MessageKind.READ, 0),
    "events/error": (MessageKind.ERROR, 0),
    "events/sync": (MessageKind.SYNC_EVENT, 0),
    "events/model": (MessageKind.MODEL_EVENT, 0),
}


class MqttSource:
    """A paho client on its own thread; reconnects by itself and tells the state when it cannot."""

    def __init__(self, state: SiteState, settings: BrokerSettings) -> None:
        self.state = state
        self.settings = settings
        self._base = settings.site_base + "/"
        self._stopping = False
        client_id = settings.client_id or f"edge-web-{settings.site}-{uuid.uuid4().hex[:8]}"
        # MQTT 3.1.1: a read-only subscriber needs nothing from v5, and the demo's embedded
        # broker (amqtt) speaks only 3.1.1. Clean session: retained messages give the state.
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv311, clean_session=True)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self._client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                                 cert_reqs=ssl.CERT_REQUIRED)
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def alive(self) -> bool:
        """paho's network thread still runs. paho keeps it in Client._thread and clears it when it
        ends (an exception escaping a callback); it has no public liveness API, and after that
        death it still reports itself connected while no message arrives."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Connect in the background; the page shows "connecting" until it is done."""
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks (on paho's thread) ---------------------------------------------------

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any,
                    _properties: Any) -> None:
        if reason_code.is_failure:
            self.state.broker_lost(f"connection refused: {reason_code}")
            log.warning("broker %s refused the connection: %s", self.settings.address, reason_code)
            return
        client.subscribe([(self._base + "+/" + suffix, qos) for suffix, (_kind, qos) in SUBSCRIPTIONS.items()])
        self.state.broker_connected()
        log.info("connected to broker %s; watching %s+/...", self.settings.address, self._base)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self.state.broker_lost(f"cannot connect to {self.settings.address}")

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any,
                       _properties: Any) -> None:
        if self._stopping:
            return
        self.state.broker_lost(f"connection to {self.settings.address} lost ({reason_code})")
        log.warning("lost the broker %s (%s); showing the last known state", self.settings.address, reason_code)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        if not topic.startswith(self._base):
            return
        line_id, _, suffix = topic[len(self._base):].partition("/")
        route = SUBSCRIPTIONS.get(suffix)
        if route is None:
            return
        try:
            self.state.handle(line_id, route[0], message.payload, retained=bool(message.retain))
        except Exception:  # a bad message must never stop paho's thread
            log.exception("could not take a message on %s", topic)
