"""A simulated sorting-machine PLC for the demo, the benchmarks and the tests.

Not part of the site service: it speaks MQTT as a real PLC would, so it imports paho
itself; the agent's only MQTT adapter stays ``edge_agent.mqtt``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.mqtt import disable_nagle


class PlcClient:
    """A simulated sorting-machine PLC: sends triggers and collects results (demo, benchmarks, tests).

    It speaks MQTT like the real PLC would (v5 when the broker does, else 3.1.1) and
    de-duplicates results on ``result_id``, as every subscriber must with at-least-once delivery.
    """

    def __init__(self, host: str, port: int, *, trigger_topic: str, result_topic: str,
                 status_topic: str, client_id: str = "simulated-plc", protocol: str = "auto",
                 persistent: bool = False, watch: tuple[str, ...] = ()) -> None:
        """``persistent`` keeps the broker session (and queued results) across disconnects;
        ``watch`` lists further topic filters whose messages are kept in ``messages``."""
        self.host, self.port = host, port
        self.trigger_topic, self.result_topic, self.status_topic = trigger_topic, result_topic, status_topic
        self._v5 = protocol != "3.1.1"
        self._persistent = persistent
        self._watch = watch
        if self._v5:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        else:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                       protocol=paho.MQTTv311, clean_session=not persistent)
        self._client.on_connect = self._on_connect
        self._client.on_socket_open = disable_nagle
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._connected = False
        self._sent: dict[str, float] = {}  # item_id -> monotonic send time
        self._results: dict[str, tuple[dict[str, Any], float]] = {}  # item_id -> first result, latency
        self._seen: set[str] = set()  # result_ids
        self.duplicates = 0
        self.status: dict[str, Any] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._order: list[str] = []  # item_ids in the order their first result arrived

    def start(self) -> None:
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600 if self._persistent else 0
            self._client.connect(self.host, self.port, keepalive=30, clean_start=not self._persistent,
                                 properties=properties)
        else:
            self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connected, 15)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        client.subscribe([(self.result_topic, 1), (self.status_topic, 1)] + [(t, 1) for t in self._watch])
        with self._cond:
            self._connected = True
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.monotonic()
        with self._cond:
            if message.topic not in (self.status_topic, self.result_topic):
                self.messages.append((message.topic, bytes(message.payload)))
                self._cond.notify_all()
                return
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        with self._cond:
            if message.topic == self.status_topic:
                self.status = payload
            elif isinstance(payload, dict) and "result_id" in payload:
                if payload["result_id"] in self._seen:
                    self.duplicates += 1
                    return
                self._seen.add(payload["result_id"])
                item = str(payload.get("item_id"))
                sent = self._sent.get(item)
                latency = (now - sent) * 1000.0 if sent is not None else float("nan")
                if item not in self._results:
                    self._results[item] = (payload, latency)
                    self._order.append(item)
            self._cond.notify_all()

    def wait_online(self, timeout_s: float) -> bool:
        """Wait for the agent's retained status to say online."""
        with self._cond:
            return self._cond.wait_for(lambda: self.status.get("state") == "online", timeout_s)

    def agent_status(self) -> dict[str, Any]:
        with self._cond:
            return dict(self.status)

    def trigger(self, item_id: str, payload: bytes | None = None) -> None:
        """Publish one trigger, as the PLC does when an item reaches the camera."""
        with self._cond:
            self._sent[item_id] = time.monotonic()
        body = payload if payload is not None else json.dumps({"item_id": item_id}).encode()
        self._client.publish(self.trigger_topic, body, qos=1)

    def result(self, item_id: str, timeout_s: float) -> tuple[dict[str, Any], float] | None:
        """The first result for an item and its trigger-to-result latency in ms, or None."""
        with self._cond:
            self._cond.wait_for(lambda: item_id in self._results, timeout_s)
            return self._results.get(item_id)

    def request(self, item_id: str, timeout_s: float) -> tuple[dict[str, Any], float] | None:
        self.trigger(item_id)
        return self.result(item_id, timeout_s)

    def burst(self, item_ids: list[str], timeout_s: float) -> list[float]:
        """Trigger all items at once; latencies (ms) of those answered within timeout_s."""
        for item in item_ids:
            self.trigger(item)
        with self._cond:
            self._cond.wait_for(lambda: all(i in self._results for i in item_ids), timeout_s)
            return [self._results[i][1] for i in item_ids if i in self._results]

    def wait_for(self, predicate: Callable[["PlcClient"], bool], timeout_s: float) -> bool:
        """Wait until predicate(self) holds (it runs under the client's lock)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout_s)

    def arrival_order(self) -> list[str]:
        with self._cond:
            return list(self._order)

    def results(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {item: payload for item, (payload, _latency) in self._results.items()}
