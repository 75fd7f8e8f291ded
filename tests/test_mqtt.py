"""MQTT link against a real Mosquitto: delivery, acknowledgement, outages, crashes, v5 features."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt import MqttConfigError, MqttLink, MqttSettings, TlsSettings
from edge_agent.outbox import MessageState, Outbox
from edge_agent.types import DigitRead, PostcodeRead, SystemClock, TriggerMessage
from tests.broker import MosquittoBroker, V311OnlyProxy, free_port

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # generous: only ever waited on, never asserted as a duration


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any


@dataclass
class Subscriber:
    """A plain paho client standing in for a sorting machine or PLC."""

    client: paho.Client
    messages: list[Received] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, topic: str | None = None) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def result_ids(self, topic: str) -> list[str]:
        return [json.loads(m.payload)["result_id"] for m in self.received(topic)]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def subscribe(address: tuple[str, int], topics: list[str], *, v5: bool = True, client_id: str = "",
              persistent: bool = False) -> Subscriber:
    """Connect a subscriber and return once its subscriptions are acknowledged (re-subscribes on reconnect)."""
    if v5:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                             protocol=MQTTProtocolVersion.MQTTv5)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                             clean_session=not persistent, protocol=MQTTProtocolVersion.MQTTv311)
    sub = Subscriber(client)
    client.reconnect_delay_set(1, 1)

    def on_connect(c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        c.subscribe([(t, 1) for t in topics])

    def on_subscribe(c: paho.Client, u: Any, mid: int, rcs: Any, props: Any) -> None:
        sub.subscribed.set()

    def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        with sub.lock:
            sub.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(*address, keepalive=30)
    client.loop_start()
    assert sub.subscribed.wait(WAIT_S), "subscriber never got its SUBACK"
    return sub


def make_read(n: int) -> PostcodeRead:
    return PostcodeRead(
        result_id=f"res-{n:04d}", item_id=f"item-{n:04d}", postcode=f"{n:05d}", accepted=True, confidence=0.987654,
        digits=tuple(DigitRead(d, 0.99) for d in range(5)), reason=None, model_version="mnist-int8-1",
        captured_at=1_700_000_000.0 + n, latency_ms=12.3456, image_sha256="ab" * 32,
    )


def read_payload(n: int) -> bytes:
    return json.dumps(make_read(n).to_payload(), separators=(",", ":")).encode()


def audit(n: int) -> dict[str, Any]:
    read = make_read(n)
    return {"result_id": read.result_id, "item_id": read.item_id, "image_sha256": read.image_sha256,
            "model_version": read.model_version, "scores": [0.99] * 5, "decision": "accept"}


def settings_for(address: tuple[str, int], **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = dict(host=address[0], port=address[1], client_id=f"reader-{uuid.uuid4().hex[:6]}",
                                  topic_prefix=f"test/{uuid.uuid4().hex[:6]}", reconnect_min_delay_s=1,
                                  reconnect_max_delay_s=2)
    values.update(overrides)
    return MqttSettings(**values)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", clock=SystemClock(), max_pending=1000, retention_s=3600)
    yield box
    box.close()


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    """Links registered here are stopped after the test even when it fails."""
    started: list[MqttLink] = []
    yield started
    for link in started:
        link.stop(timeout_s=2)


def start_link(links: list[MqttLink], settings: MqttSettings, outbox: Outbox,
               on_trigger: Callable[[TriggerMessage], None] | None = None,
               wait_connected: bool = True) -> MqttLink:
    link = MqttLink(settings, outbox, SystemClock(), on_trigger=on_trigger)
    links.append(link)
    link.start()
    if wait_connected:
        assert wait_until(lambda: link.connected), "link never connected"
    return link


# ---------------------------------------------------------------------- delivery


def test_result_reaches_subscriber_as_exact_json(mqtt_broker: MosquittoBroker, outbox: Outbox,
                                                 links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    link = start_link(links, settings, outbox)
    [mid] = link.submit(read_payload(1), audit(1), expires_at=None)
    assert wait_until(lambda: len(sub.received()) == 1)
    [msg] = sub.received()
    assert msg.topic == settings.results_topic
    assert msg.payload == read_payload(1)
    assert json.loads(msg.payload) == make_read(1).to_payload()
    assert wait_until(lambda: outbox.state(mid) is MessageState.DELIVERED)
    [record] = outbox.audit("item-0001")
    assert record.delivered_at is not None and record.attempts == 1
    assert link.stats()["acked"] == 1
    sub.stop()


def test_marked_delivered_only_after_puback_and_window_is_bounded(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address, window=4)
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    link = start_link(links, settings, outbox)
    assert wait_until(lambda: link.stats()["connects"] == 1)
    time.sleep(0.3)  # let the online status and trigger SUBSCRIBE be acknowledged before freezing
    mqtt_broker.pause()  # the TCP connection stays up but no PUBACK comes back
    try:
        ids = [link.submit(read_payload(n), audit(n), expires_at=None)[0] for n in range(10)]
        assert wait_until(lambda: link.stats()["published"] == 4)
        time.sleep(0.5)  # give a wrong implementation the chance to mark or over-publish
        stats = link.stats()
        assert stats["published"] == 4 and stats["inflight"] == 4
        assert all(outbox.state(i) is MessageState.PENDING for i in ids)
        assert [m.attempts for m in outbox.pending(10)] == [1] * 4 + [0] * 6
    finally:
        mqtt_broker.resume()
    assert wait_until(lambda: outbox.stats()["pending"] == 0)
    assert all(outbox.state(i) is MessageState.DELIVERED for i in ids)
    assert wait_until(lambda: len(sub.received()) == 10)
    assert sub.result_ids(settings.results_topic) == [f"res-{n:04d}" for n in range(10)]
    sub.stop()


def test_broker_restart_mid_stream_loses_nothing(persistent_mqtt_broker: MosquittoBroker, outbox: Outbox,
                                                 links: list[MqttLink]) -> None:
    broker = persistent_mqtt_broker
    settings = settings_for(broker.address, window=8)
    # The sorting machine keeps a persistent session, so the broker queues results for
    # it across its own restart and while the machine is reconnecting.
    sub = subscribe(broker.address, [settings.results_topic], v5=False, client_id="sorter-1", persistent=True)
    link = start_link(links, settings, outbox)
    total = 120
    added = threading.Event()

    def produce() -> None:
        for n in range(total):
            link.submit(read_payload(n), audit(n), expires_at=None)
            time.sleep(0.01)
        added.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert wait_until(lambda: len(sub.received()) >= 20)
    broker.restart(down_s=1.5)  # mid-stream: the producer keeps adding while the broker is away
    producer.join()
    assert added.is_set()
    assert wait_until(lambda: outbox.stats()["pending"] == 0), link.stats()
    expected = {f"res-{n:04d}" for n in range(total)}
    assert wait_until(lambda: set(sub.result_ids(settings.results_topic)) == expected), (
        f"missing {sorted(expected - set(sub.result_ids(settings.results_topic)))}")
    assert link.stats()["disconnects"] >= 1
    assert outbox.stats()["delivered"] == total
    sub.stop()


def test_messages_in_flight_when_the_broker_dies_are_sent_again(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    # A long first reconnect delay lets the test's subscriber be back before the link.
    settings = settings_for(mqtt_broker.address, window=4, reconnect_min_delay_s=3, reconnect_max_delay_s=4)
    link = start_link(links, settings, outbox)
    assert wait_until(lambda: link.stats()["connects"] == 1)
    time.sleep(0.3)  # let the online status and trigger SUBSCRIBE be acknowledged before freezing
    mqtt_broker.pause()
    for n in range(6):
        link.submit(read_payload(n), audit(n), expires_at=None)
    assert wait_until(lambda: link.stats()["inflight"] == 4)
    mqtt_broker.kill()  # dies frozen: the four PUBLISH packets were never read
    mqtt_broker.start()
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    assert wait_until(lambda: outbox.stats()["pending"] == 0), link.stats()
    expected = [f"res-{n:04d}" for n in range(6)]
    assert wait_until(lambda: set(sub.result_ids(settings.results_topic)) == set(expected))
    assert list(dict.fromkeys(sub.result_ids(settings.results_topic))) == expected
    stats = link.stats()
    # paho resent the four in-flight messages itself (same mid, DUP flag), so the link did
    # not publish them a second time from the outbox.
    assert (stats["published"], stats["acked"], stats["republished"]) == (6, 6, 0)
    sub.stop()


@pytest.mark.parametrize("resend_window_s", [30.0, 0.0])
def test_results_a_broker_acknowledged_then_lost_in_a_kill_9_are_sent_again(
        resend_window_s: float, tmp_path: Path, mosquitto_executable: str, outbox: Outbox,
        links: list[MqttLink]) -> None:
    """Mosquitto PUBACKs a QoS 1 message from memory and writes it to disk at its next autosave:
    killed -9 in between, it forgets results it had acknowledged. With the window off (0) the
    test shows that loss; with it on, the link sends them again after reconnecting."""
    broker = MosquittoBroker(tmp_path / "lossy", mosquitto_executable, persistence=True,
                             extra_config=["autosave_interval 3600"])  # saves only on a clean stop
    broker.start()
    try:
        settings = settings_for(broker.address, resend_window_s=resend_window_s)
        sorter = subscribe(broker.address, [settings.results_topic], v5=False, client_id="sorter-9",
                           persistent=True)
        sorter.stop()  # away: the broker queues results in its session
        broker.restart()  # a clean stop saves that session to disk
        link = start_link(links, settings, outbox)
        ids = [link.submit(read_payload(n), audit(n), expires_at=None)[0] for n in range(3)]
        assert wait_until(lambda: all(outbox.state(i) is MessageState.DELIVERED for i in ids))
        broker.kill()  # before any autosave: the three queued results die with it
        broker.start()
        assert wait_until(lambda: link.stats()["connects"] == 2)
        sorter = subscribe(broker.address, [settings.results_topic], v5=False, client_id="sorter-9",
                           persistent=True)
        expected = {f"res-{n:04d}" for n in range(3)}
        if resend_window_s:
            assert wait_until(lambda: set(sorter.result_ids(settings.results_topic)) == expected)
            assert link.stats()["resent"] == 3
            assert [r.attempts for r in outbox.audit("item-0001")] == [2]
        else:
            time.sleep(2.0)  # time enough for anything queued to arrive
            assert sorter.result_ids(settings.results_topic) == [] and link.stats()["resent"] == 0
        assert all(outbox.state(i) is MessageState.DELIVERED for i in ids)
        assert outbox.stats()["delivered"] == 3  # sent again, counted once
        sorter.stop()
    finally:
        broker.kill()


class _ShiftedClock(SystemClock):
    """The system clock, moved forward on demand (the link's resend window is counted on it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset

    def monotonic(self) -> float:
        return super().monotonic() + self.offset


def test_only_results_acknowledged_in_the_window_before_the_last_puback_are_sent_again(
        tmp_path: Path, mosquitto_executable: str, outbox: Outbox, links: list[MqttLink]) -> None:
    broker = MosquittoBroker(tmp_path / "lossy", mosquitto_executable, persistence=True,
                             extra_config=["autosave_interval 3600"])
    broker.start()
    try:
        settings = settings_for(broker.address, resend_window_s=10.0)
        clock = _ShiftedClock()
        link = MqttLink(settings, outbox, clock)
        links.append(link)
        link.start()
        assert wait_until(lambda: link.connected)
        old = link.submit(read_payload(1), audit(1), expires_at=None)[0]
        assert wait_until(lambda: outbox.state(old) is MessageState.DELIVERED)
        clock.offset += 30.0  # 30 s later: the broker has long saved the first result
        new = link.submit(read_payload(2), audit(2), expires_at=None)[0]
        assert wait_until(lambda: outbox.state(new) is MessageState.DELIVERED)
        clock.offset += 60.0  # the loss is noticed a keepalive later: still counted from the last PUBACK
        broker.kill()
        broker.start()
        assert wait_until(lambda: link.stats()["resent"] == 1)
        time.sleep(0.3)
        assert link.stats()["resent"] == 1
        assert [r.attempts for r in outbox.audit("item-0001")] == [1]
        assert [r.attempts for r in outbox.audit("item-0002")] == [2]
    finally:
        broker.kill()


def test_after_a_reconnect_new_results_go_out_before_the_copies(tmp_path: Path, mosquitto_executable: str,
                                                                 outbox: Outbox, links: list[MqttLink]) -> None:
    """A new result still has its envelope's deadline to meet; the copies are for a broker that forgot."""
    broker = MosquittoBroker(tmp_path / "lossy", mosquitto_executable, persistence=True,
                             extra_config=["autosave_interval 3600"])
    broker.start()
    try:
        # One in flight at a time makes the order strict; a slow first reconnect lets the sorter be back first.
        settings = settings_for(broker.address, window=1, reconnect_min_delay_s=3, reconnect_max_delay_s=4)
        link = start_link(links, settings, outbox)
        old = [link.submit(read_payload(n), audit(n), expires_at=None)[0] for n in range(4)]
        assert wait_until(lambda: all(outbox.state(i) is MessageState.DELIVERED for i in old))
        broker.kill()
        assert wait_until(lambda: not link.connected)
        new = [link.submit(read_payload(n), audit(n), expires_at=None)[0] for n in (10, 11)]
        broker.start()
        sorter = subscribe(broker.address, [settings.results_topic])
        assert wait_until(lambda: len(sorter.received()) == 6)
        assert sorter.result_ids(settings.results_topic) == ["res-0010", "res-0011"] + [f"res-{n:04d}" for n in range(4)]
        assert all(outbox.state(i) is MessageState.DELIVERED for i in new)
        sorter.stop()
    finally:
        broker.kill()


def test_a_clean_stop_and_start_sends_nothing_again(mqtt_broker: MosquittoBroker, outbox: Outbox,
                                                    links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    link = start_link(links, settings, outbox)
    [mid] = link.submit(read_payload(1), audit(1), expires_at=None)
    assert wait_until(lambda: outbox.state(mid) is MessageState.DELIVERED)
    link.stop()
    links.clear()
    again = start_link(links, settings, outbox)
    time.sleep(0.5)
    assert again.stats()["resent"] == 0 and again.stats()["published"] == 0


def test_unacknowledged_message_is_published_again_after_ack_timeout(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address, ack_timeout_s=1.0)
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    link = start_link(links, settings, outbox)
    time.sleep(0.3)  # let the online status and trigger SUBSCRIBE be acknowledged before freezing
    mqtt_broker.pause()
    try:
        [mid] = link.submit(read_payload(9), audit(9), expires_at=None)
        assert wait_until(lambda: link.stats()["republished"] >= 1)
        assert outbox.state(mid) is MessageState.PENDING
    finally:
        mqtt_broker.resume()
    assert wait_until(lambda: outbox.state(mid) is MessageState.DELIVERED)
    assert wait_until(lambda: len(sub.received()) >= 2)  # both copies arrive ...
    assert set(sub.result_ids(settings.results_topic)) == {"res-0009"}  # ... and de-duplicate to one
    sub.stop()


_CRASHING_PUBLISHER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from edge_agent.mqtt import MqttLink, MqttSettings
from edge_agent.outbox import Outbox

class Clock:
    def time(self): return time.time()
    def monotonic(self): return time.monotonic()

db, port, topic_prefix, n = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
box = Outbox(db, clock=Clock())
link = MqttLink(MqttSettings(host="127.0.0.1", port=port, client_id="crasher", topic_prefix=topic_prefix,
                             reconnect_min_delay_s=1, reconnect_max_delay_s=2), box, Clock())
link.start()
for i in range(n):
    link.submit(('{"result_id":"res-%04d"}' % i).encode(), {"result_id": "res-%04d" % i, "item_id": str(i)},
                expires_at=None)
print("stored", flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_backlog_survives_kill_minus_9(mqtt_broker: MosquittoBroker, tmp_path: Path,
                                       links: list[MqttLink]) -> None:
    db = tmp_path / "outbox.db"
    prefix = "test/crash"
    script = tmp_path / "publisher.py"
    script.write_text(_CRASHING_PUBLISHER)
    n = 25
    mqtt_broker.stop()  # the site broker is down while the agent reads envelopes
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(db), str(mqtt_broker.port), prefix,
                             str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"stored"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mqtt_broker.start()
    settings = settings_for(mqtt_broker.address, topic_prefix=prefix)
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    outbox = Outbox(db, clock=SystemClock())
    try:
        assert outbox.stats()["pending"] == n
        start_link(links, settings, outbox)
        assert wait_until(lambda: len(set(sub.result_ids(settings.results_topic))) == n)
        assert wait_until(lambda: outbox.stats()["pending"] == 0)
        ids = sub.result_ids(settings.results_topic)
        deduplicated = list(dict.fromkeys(ids))
        assert deduplicated == [f"res-{i:04d}" for i in range(n)]
    finally:
        links[-1].stop(timeout_s=2) if links else None
        outbox.close()
    sub.stop()


def test_full_outbox_delivers_newest_and_counts_dropped(mqtt_broker: MosquittoBroker, tmp_path: Path,
                                                       links: list[MqttLink]) -> None:
    box = Outbox(tmp_path / "small.db", clock=SystemClock(), max_pending=5)
    settings = settings_for(mqtt_broker.address)
    for n in range(8):  # stored while no link runs, as during a long outage
        box.add(settings.results_topic, read_payload(n), 1, None, audit(n))
    assert box.stats()["dropped"] == 3
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    start_link(links, settings, box)
    assert wait_until(lambda: len(sub.received()) == 5)
    assert sub.result_ids(settings.results_topic) == [f"res-{n:04d}" for n in range(3, 8)]
    assert wait_until(lambda: box.stats() == {"pending": 0, "added": 8, "delivered": 5, "dropped": 3,
                                              "expired": 0})
    links[-1].stop(timeout_s=2)
    box.close()
    sub.stop()


def test_expired_results_are_not_published_and_live_ones_carry_expiry(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    now = time.time()
    stale = outbox.add(settings.results_topic, read_payload(1), 1, now - 1, audit(1))
    fresh = outbox.add(settings.results_topic, read_payload(2), 1, now + 60, audit(2))
    sub = subscribe(mqtt_broker.address, [settings.results_topic])
    link = start_link(links, settings, outbox)
    assert wait_until(lambda: outbox.state(fresh) is MessageState.DELIVERED)
    assert wait_until(lambda: len(sub.received()) == 1)
    assert outbox.state(stale) is MessageState.EXPIRED
    [msg] = sub.received()
    assert json.loads(msg.payload)["result_id"] == "res-0002"
    assert 1 <= msg.properties.MessageExpiryInterval <= 60
    assert outbox.stats()["expired"] == 1
    assert link.stats()["expired"] == 1
    sub.stop()


# ---------------------------------------------------------------------- status, triggers, events


_LIVE_PUBLISHER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from edge_agent.mqtt import MqttLink, MqttSettings
from edge_agent.outbox import Outbox

class Clock:
    def time(self): return time.time()
    def monotonic(self): return time.monotonic()

link = MqttLink(MqttSettings(host="127.0.0.1", port=int(sys.argv[3]), client_id="doomed",
                             topic_prefix=sys.argv[4]), Outbox(sys.argv[2], clock=Clock()), Clock())
link.start()
while not link.connected:
    time.sleep(0.01)
print("connected", flush=True)
sys.stdin.read()
"""


def test_retained_status_and_last_will_after_kill(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    prefix = "test/will"
    status_topic = f"{prefix}/status"
    script = tmp_path / "live.py"
    script.write_text(_LIVE_PUBLISHER)
    sub = subscribe(mqtt_broker.address, [status_topic])
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path / "o.db"),
                             str(mqtt_broker.port), prefix], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"connected"
        assert wait_until(lambda: any(json.loads(m.payload)["state"] == "online" for m in sub.received()))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: json.loads(sub.received()[-1].payload)["state"] == "offline")
    sub.stop()
    # A client arriving later still learns the reader is offline: the will is retained.
    late = subscribe(mqtt_broker.address, [status_topic])
    assert wait_until(lambda: len(late.received()) == 1)
    [msg] = late.received()
    assert msg.retain
    assert json.loads(msg.payload) == {"state": "offline", "client_id": "doomed", "reason": "connection lost"}
    late.stop()


def test_clean_stop_publishes_offline(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    settings = settings_for(mqtt_broker.address)
    link = MqttLink(settings, outbox, SystemClock())
    link.start()
    assert wait_until(lambda: link.connected)
    link.stop()
    late = subscribe(mqtt_broker.address, [settings.status_topic])
    assert wait_until(lambda: len(late.received()) == 1)
    body = json.loads(late.received()[0].payload)
    assert (body["state"], body["reason"]) == ("offline", "stopped")
    late.stop()


def test_clean_stops_log_no_error(mqtt_broker: MosquittoBroker, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """paho 2.2 logs "Client is not connected" as an ERROR after about half of all requested
    disconnects (its loop runs once more on the closed socket); a clean stop must not look like a fault."""
    caplog.set_level(logging.DEBUG)
    for n in range(12):
        box = Outbox(tmp_path / f"o{n}.db", clock=SystemClock())
        link = MqttLink(settings_for(mqtt_broker.address), box, SystemClock())
        link.start()
        assert wait_until(lambda: link.connected)
        for k in range(10):
            link.submit(read_payload(k), audit(k), expires_at=None)
        time.sleep(0.03 * (n % 4))
        link.stop()
        box.close()
    # Without the filter this failed with 7-9 records here (Xeon, 2 cores); the race may not show on every machine.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_suback_arriving_after_stop_does_not_publish_online(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    # CI once saw "online" retained after a clean stop: stop() ran between CONNACK and SUBACK,
    # and the late SUBACK published "online" behind the "offline". Replay that order by hand.
    from paho.mqtt.reasoncodes import ReasonCode
    settings = settings_for(mqtt_broker.address)
    link = MqttLink(settings, outbox, SystemClock())
    link.start()
    assert wait_until(lambda: link.connected)
    client = link._client
    assert client is not None
    link.stop()
    statuses: list[bytes] = []
    real_publish = client.publish

    def recording_publish(topic: str, payload: Any = None, *args: Any, **kwargs: Any) -> Any:
        if topic == settings.status_topic:
            statuses.append(payload)
        return real_publish(topic, payload, *args, **kwargs)

    client.publish = recording_publish  # type: ignore[method-assign]
    link._subscribed = False
    link._on_subscribe(client, None, link._subscribe_mid, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert statuses == []
    late = subscribe(mqtt_broker.address, [settings.status_topic])
    assert wait_until(lambda: len(late.received()) == 1)
    assert json.loads(late.received()[0].payload)["state"] == "offline"
    late.stop()


def test_trigger_reply_carries_response_topic_and_correlation_data(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    triggers: queue.Queue[tuple[bytes, str | None, bytes | None]] = queue.Queue()
    link: MqttLink | None = None

    def on_trigger(message: TriggerMessage) -> None:
        payload, response_topic, correlation = message.payload, message.response_topic, message.correlation_data
        triggers.put((payload, response_topic, correlation))
        assert link is not None
        link.ack(message.ack_token)
        item = json.loads(payload)["item_id"]
        link.submit(read_payload(int(item)), audit(int(item)), expires_at=time.time() + 30,
                    response_topic=response_topic, correlation_data=correlation)

    link = start_link(links, settings, outbox, on_trigger=on_trigger)
    reply_topic = "plc/line3/replies"
    plc = subscribe(mqtt_broker.address, [reply_topic, settings.results_topic])
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"\x00req-42\xff"
    plc.client.publish(settings.trigger_topic, b'{"item_id": "42"}', qos=1, properties=props)
    payload, response_topic, correlation = triggers.get(timeout=WAIT_S)
    assert (payload, response_topic, correlation) == (b'{"item_id": "42"}', reply_topic, b"\x00req-42\xff")
    assert wait_until(lambda: len(plc.received(reply_topic)) == 1 and len(plc.received(settings.results_topic)) == 1)
    [reply] = plc.received(reply_topic)
    assert reply.payload == read_payload(42)
    assert reply.properties.CorrelationData == b"\x00req-42\xff"
    assert plc.received(settings.results_topic)[0].payload == read_payload(42)
    assert len(outbox.audit("item-0042")) == 2
    plc.stop()


def test_trigger_subscription_is_restored_after_broker_restart(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    triggers: queue.Queue[bytes] = queue.Queue()
    def on_trigger(message: TriggerMessage) -> None:
        triggers.put(message.payload)
        link.ack(message.ack_token)

    link = start_link(links, settings, outbox, on_trigger=on_trigger)
    mqtt_broker.restart()  # persistence off: the broker forgets every subscription
    assert wait_until(lambda: link.stats()["connects"] == 2)
    plc = subscribe(mqtt_broker.address, ["unused/topic"])
    deadline = time.monotonic() + WAIT_S
    got = None
    while got is None and time.monotonic() < deadline:  # the SUBSCRIBE may still be on its way
        plc.client.publish(settings.trigger_topic, b"after-restart", qos=1)
        try:
            got = triggers.get(timeout=0.2)
        except queue.Empty:
            pass
    assert got == b"after-restart"
    plc.stop()


def test_publish_event(mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address)
    sub = subscribe(mqtt_broker.address, [f"{settings.events_topic}/#"])
    link = start_link(links, settings, outbox)
    assert link.publish_event("model_swapped", {"version": "m2"}) is True
    assert wait_until(lambda: len(sub.received()) == 1)
    [msg] = sub.received()
    assert msg.topic == f"{settings.events_topic}/model_swapped"
    assert json.loads(msg.payload) == {"version": "m2"}
    with pytest.raises(ValueError):
        link.publish_event("a/b", {})
    sub.stop()


def test_event_while_disconnected_is_dropped_and_counted(tmp_path: Path, outbox: Outbox,
                                                         links: list[MqttLink]) -> None:
    link = start_link(links, settings_for(("127.0.0.1", free_port())), outbox, wait_connected=False)
    assert link.publish_event("drift", {"psi": 0.3}) is False
    assert link.stats()["events_dropped"] == 1


# ---------------------------------------------------------------------- protocol and settings


def test_falls_back_to_mqtt_311_when_broker_refuses_v5(mqtt_broker: MosquittoBroker, outbox: Outbox,
                                                        links: list[MqttLink]) -> None:
    proxy = V311OnlyProxy(mqtt_broker.address)
    try:
        settings = settings_for((proxy.host, proxy.port))
        sub = subscribe(mqtt_broker.address, [settings.results_topic])
        link = start_link(links, settings, outbox)
        assert link.protocol == "3.1.1"
        assert proxy.refused >= 1 and proxy.relayed >= 1
        link.submit(read_payload(5), audit(5), expires_at=time.time() + 60)
        assert wait_until(lambda: len(sub.received()) == 1)
        assert sub.received()[0].payload == read_payload(5)
        sub.stop()
    finally:
        for link in links:
            link.stop(timeout_s=2)
        links.clear()
        proxy.close()


def test_v5_only_setting_does_not_fall_back(mqtt_broker: MosquittoBroker, outbox: Outbox,
                                            links: list[MqttLink]) -> None:
    proxy = V311OnlyProxy(mqtt_broker.address)
    try:
        link = start_link(links, settings_for((proxy.host, proxy.port), protocol="5"), outbox,
                          wait_connected=False)
        assert wait_until(lambda: proxy.refused >= 2)
        assert not link.connected and link.protocol == "5"
    finally:
        for link in links:
            link.stop(timeout_s=2)
        links.clear()
        proxy.close()


def test_password_is_never_logged(mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink],
                                  caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-Pa55word"
    caplog.set_level(logging.DEBUG)
    settings = settings_for(mqtt_broker.address, username="reader", password=secret)
    assert secret not in repr(settings)
    link = start_link(links, settings, outbox)
    link.submit(read_payload(1), audit(1), expires_at=None)
    assert wait_until(lambda: outbox.stats()["pending"] == 0)
    link.stop()
    links.clear()
    assert "MQTT connecting" in caplog.text
    assert secret not in caplog.text


@pytest.mark.parametrize("overrides, fragment", [
    ({"password": "x"}, "username"),
    ({"protocol": "4"}, "protocol"),
    ({"port": 0}, "port"),
    ({"window": 0}, "window"),
    ({"resend_window_s": -1}, "resend_window_s"),
    ({"status_topic": "a/+/status"}, "wildcards"),
])
def test_settings_are_validated(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MqttConfigError, match=fragment):
        MqttSettings(host="broker.local", **overrides)


def test_topics_default_from_prefix() -> None:
    s = MqttSettings(host="b", topic_prefix="sort/site1/reader2/")
    assert (s.status_topic, s.results_topic, s.trigger_topic, s.events_topic) == (
        "sort/site1/reader2/status", "sort/site1/reader2/result", "sort/site1/reader2/trigger",
        "sort/site1/reader2/event")


# ---------------------------------------------------------------------- TLS


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for DNS name ``localhost`` (not for 127.0.0.1)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed; needed to make test certificates")
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                       "server.crt"))
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=Test sorting office CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto_executable: str) -> Iterator[MosquittoBroker]:
    certs = make_certificates(tmp_path)
    broker = MosquittoBroker(tmp_path / "mosquitto-tls", mosquitto_executable, tls=certs)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def test_tls_delivery_with_verified_broker(tls_broker: MosquittoBroker, outbox: Outbox,
                                           links: list[MqttLink]) -> None:
    assert tls_broker.tls is not None and tls_broker.tls_port is not None
    settings = settings_for(("localhost", tls_broker.tls_port), tls=TlsSettings(ca_certs=str(tls_broker.tls[0])))
    sub = subscribe(tls_broker.address, [settings.results_topic])  # the plain listener
    link = start_link(links, settings, outbox)
    link.submit(read_payload(3), audit(3), expires_at=None)
    assert wait_until(lambda: len(sub.received()) == 1)
    assert sub.received()[0].payload == read_payload(3)
    sub.stop()


def test_tls_hostname_mismatch_needs_the_insecure_flag(tls_broker: MosquittoBroker, outbox: Outbox,
                                                       links: list[MqttLink],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert tls_broker.tls is not None and tls_broker.tls_port is not None
    ca = str(tls_broker.tls[0])
    # The certificate names "localhost"; an IP address does not match it.
    strict = start_link(links, settings_for(("127.0.0.1", tls_broker.tls_port), tls=TlsSettings(ca_certs=ca)),
                        outbox, wait_connected=False)
    assert not wait_until(lambda: strict.connected, timeout_s=3)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text and "mqtt.tls.ca_certs" in caplog.text
    strict.stop(timeout_s=2)
    links.remove(strict)
    relaxed = start_link(links, settings_for(("127.0.0.1", tls_broker.tls_port),
                                             tls=TlsSettings(ca_certs=ca, insecure=True)), outbox)
    assert relaxed.connected


# ---------------------------------------------------------------------- triggers: durable, replayed, refused logins

def _collecting(ack: bool = True) -> tuple[queue.Queue, list[MqttLink], Callable[[TriggerMessage], None]]:
    got: queue.Queue[TriggerMessage] = queue.Queue()
    holder: list[MqttLink] = []

    def on_trigger(message: TriggerMessage) -> None:
        got.put(message)
        if ack:
            holder[0].ack(message.ack_token)
    return got, holder, on_trigger


def _drain(q: queue.Queue, n: int, timeout_s: float = WAIT_S) -> list[TriggerMessage]:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def test_triggers_sent_while_the_agent_is_away_wait_in_its_session_and_come_back_marked_replayed(
        mqtt_broker: MosquittoBroker, tmp_path: Path, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address, client_id="line-7-agent")
    first_box = Outbox(tmp_path / "a.db", clock=SystemClock())
    got, holder, on_trigger = _collecting()
    link = start_link(links, settings, first_box, on_trigger=on_trigger)
    holder.append(link)
    link.stop()
    links.clear()
    plc = subscribe(mqtt_broker.address, ["unused"])
    for i in range(5):
        plc.client.publish(settings.trigger_topic, json.dumps({"item_id": f"away-{i}"}), qos=1).wait_for_publish(5)
    got2, holder2, on_trigger2 = _collecting()
    second = start_link(links, settings, first_box, on_trigger=on_trigger2)
    holder2.append(second)
    replayed = _drain(got2, 5)
    assert [json.loads(m.payload)["item_id"] for m in replayed] == [f"away-{i}" for i in range(5)]
    assert all(m.replayed and m.first_connection for m in replayed)
    assert wait_until(lambda: second.stats()["replayed_triggers"] == 5)
    time.sleep(0.3)  # the session marker came back behind the backlog: what follows is live
    plc.client.publish(settings.trigger_topic, b'{"item_id": "live"}', qos=1).wait_for_publish(5)
    [live] = _drain(got2, 1)
    assert json.loads(live.payload)["item_id"] == "live" and not live.replayed
    plc.stop()
    first_box.close()


def test_a_trigger_not_acknowledged_before_a_crash_is_delivered_again(
        mqtt_broker: MosquittoBroker, tmp_path: Path, links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address, client_id="line-8-agent")
    box = Outbox(tmp_path / "a.db", clock=SystemClock())
    got, holder, on_trigger = _collecting(ack=False)  # dies before journaling: never acknowledges
    link = start_link(links, settings, box, on_trigger=on_trigger)
    holder.append(link)
    plc = subscribe(mqtt_broker.address, ["unused"])
    plc.client.publish(settings.trigger_topic, b'{"item_id": "fragile"}', qos=1).wait_for_publish(5)
    assert len(_drain(got, 1)) == 1
    link.stop()
    links.clear()
    got2, holder2, on_trigger2 = _collecting()
    holder2.append(start_link(links, settings, box, on_trigger=on_trigger2))
    [again] = _drain(got2, 1)
    assert json.loads(again.payload)["item_id"] == "fragile" and again.replayed
    plc.stop()
    box.close()


def test_a_refused_password_never_downgrades_the_protocol(tmp_path: Path, mosquitto_executable: str,
                                                          outbox: Outbox, links: list[MqttLink]) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "reader", "right"], check=True,
                   capture_output=True)
    passwd.chmod(0o600)
    broker = MosquittoBroker(tmp_path / "auth-broker", mosquitto_executable,
                             extra_config=["allow_anonymous false", f"password_file {passwd}"])
    broker.start()
    try:
        link = start_link(links, settings_for(broker.address, username="reader", password="wrong"), outbox,
                          wait_connected=False)
        assert wait_until(lambda: link.stats()["login_refused"] >= 2, 15)
        assert link.protocol == "5" and not link.connected
        # The same broker with the right password: MQTT v5 (result expiry works), not 3.1.1.
        good = start_link(links, settings_for(broker.address, username="reader", password="right"), outbox)
        assert good.protocol == "5"
    finally:
        for link in links:
            link.stop(timeout_s=2)
        links.clear()
        broker.kill()


def test_the_retained_online_status_carries_its_time_and_expires(mqtt_broker: MosquittoBroker, outbox: Outbox,
                                                                  links: list[MqttLink]) -> None:
    settings = settings_for(mqtt_broker.address, status_ttl_s=2)
    start_link(links, settings, outbox)
    sub = subscribe(mqtt_broker.address, [settings.status_topic])
    assert wait_until(lambda: len(sub.received()) >= 1)
    first = sub.received()[0]
    body = json.loads(first.payload)
    assert body["state"] == "online" and abs(body["at"] - time.time()) < 10 and body["ttl_s"] == 2
    assert 0 < first.properties.MessageExpiryInterval <= 2
    sub.stop()
    # Nothing refreshes it here (the agent's health loop does, every 10 s): past its expiry the
    # broker stops handing it out, as it would for a dead agent whose broker was restored from disk.
    time.sleep(2.5)
    late = subscribe(mqtt_broker.address, [settings.status_topic])
    time.sleep(0.3)
    assert late.received() == []
    late.stop()


def test_close_intake_waits_for_a_trigger_being_handed_over(
        mqtt_broker: MosquittoBroker, outbox: Outbox, links: list[MqttLink]) -> None:
    """SIGTERM's order (close intake, then wait for what was taken in) must see a trigger that
    passed the intake check a moment before: otherwise it is acknowledged after the agent
    stopped waiting, and answered only at the next start."""
    settings = settings_for(mqtt_broker.address)
    entered, release = threading.Event(), threading.Event()
    handed: list[bytes] = []

    def slow_hand_over(message: TriggerMessage) -> None:
        entered.set()
        release.wait(10)
        handed.append(message.payload)

    link = start_link(links, settings, outbox, on_trigger=slow_hand_over)
    plc = subscribe(mqtt_broker.address, ["unused"])
    plc.client.publish(settings.trigger_topic, b'{"item_id": "at-the-door"}', qos=1).wait_for_publish(5)
    assert entered.wait(WAIT_S)
    closer = threading.Thread(target=link.close_intake)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close_intake returned while a trigger was still being handed over"
    release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive() and handed == [b'{"item_id": "at-the-door"}']
    # Closed: a later trigger is neither handed over nor acknowledged (the broker keeps it).
    plc.client.publish(settings.trigger_topic, b'{"item_id": "after"}', qos=1).wait_for_publish(5)
    time.sleep(0.3)
    assert handed == [b'{"item_id": "at-the-door"}']
    plc.stop()
