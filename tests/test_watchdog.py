"""systemd readiness and watchdog: the real sd_notify datagrams, received on a socket made here.

The agent says READY=1 once the model is loaded and every stage runs, and WATCHDOG=1 only while
every part makes progress. A camera call that never returns, a stuck inference and a dead paho
network thread must each stop the pings (so systemd restarts the agent), and say why in STATUS=.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import build_agent, start_agent, watch_liveness
from edge_agent.config import parse_config
from edge_agent.demo import render_demo_camera
from edge_agent.liveness import Heartbeats, verdict
from edge_agent.sdnotify import Notifier
from edge_agent.types import Check
from tests.broker import free_port
from tests.paths import ROOT

BASE = "postcode/wd-site/line-1"
STALL_S = 1.0  # camera calls; loops turn about once a second, so they get a little longer
STAGE_STALL_S = 3.0


class NotifySocket:
    """What systemd listens on: a Unix datagram socket; collects every message sent to it."""

    def __init__(self, folder: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(folder / "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout_s: float, after: float = 0.0, also: str = "") -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(at >= after and text in message and also in message for at, message in self.messages):
                return True
            time.sleep(0.05)
        return False

    def pings_between(self, start: float, end: float) -> int:
        return sum(1 for at, message in self.messages if start <= at <= end and "WATCHDOG=1" in message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


# -- the protocol itself ------------------------------------------------------------------


def test_notifier_sends_datagrams_to_a_path_and_to_an_abstract_socket(tmp_path):
    for abstract in (False, True):
        sock = NotifySocket(tmp_path, abstract=abstract)
        try:
            notifier = Notifier({"NOTIFY_SOCKET": sock.address})
            assert notifier.enabled and not notifier.watchdog_enabled
            assert notifier.ready("reading line-1")
            assert notifier.watchdog()
            assert sock.wait_for("WATCHDOG=1", 2.0)
            assert sock.messages[0][1] == "READY=1\nSTATUS=reading line-1"
        finally:
            sock.close()


def test_notifier_outside_systemd_is_a_no_op_and_respects_watchdog_pid():
    assert not Notifier({}).enabled and not Notifier({}).ready()
    mine = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_period_s == pytest.approx(2.0)
    # The watchdog belongs to another process (we inherited its environment): never ping for it.
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_period_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}).watchdog_period_s is None
    # A socket nobody listens on: a warning, not an exception that would kill the agent.
    assert mine.send("WATCHDOG=1") is False


def test_heartbeats_name_the_stalled_and_the_dead_loop():
    now = [100.0]
    beats = Heartbeats(lambda: now[0])
    release = threading.Event()
    alive = threading.Thread(target=release.wait, daemon=True)
    dead = threading.Thread(target=lambda: None, daemon=True)
    alive.start()
    dead.start()
    dead.join()
    beats.watch("reader-0", alive)
    assert beats.vital(10.0).ok
    now[0] += 11.0
    check = beats.vital(10.0)
    assert not check.ok and "reader-0 silent 11 s" in check.detail
    beats.beat("reader-0")
    assert beats.vital(10.0).ok
    beats.watch("store", dead)
    check = beats.vital(10.0)
    assert not check.ok and "store" in check.detail and "ended" in check.detail
    release.set()
    ok, summary = verdict({"camera": Check(True, "fine"), "mqtt": Check(False, "thread ended")})
    assert not ok and summary == "mqtt: thread ended"


# -- the running agent --------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_dir(tmp_path_factory) -> Path:
    return render_demo_camera(tmp_path_factory.mktemp("wd") / "camera", 4, seed=5)


def _table(tmp_path: Path, broker_port: int, camera_dir: Path) -> dict:
    return {
        "site": {"site_id": "wd-site", "line_id": "line-1"},
        "camera": {"source": str(camera_dir), "loop": True, "fps": 20.0, "max_frame_age_ms": 2000},
        "mqtt": {"host": "127.0.0.1", "port": broker_port},
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")},
        "review": {"crops_dir": str(tmp_path / "state" / "review")},
        "http": {"port": free_port()},
        "watchdog": {"stage_stall_s": STAGE_STALL_S, "camera_stall_s": STALL_S, "mqtt_probe_s": 1.0,
                     "mqtt_echo_timeout_s": 3.0},
        "logging": {"json": False},
    }


class WatchedAgent:
    """An agent started the way run_agent starts it, with the watchdog loop on a thread."""

    def __init__(self, table: dict, notify: NotifySocket) -> None:
        self.notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
        self.agent = build_agent(parse_config(table))
        start_agent(self.agent)
        self.notifier.ready("test agent")
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=watch_liveness,
                                       args=(self.agent.liveness, self.notifier, self.stop_event), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5.0)
        self.agent.stop(drain_s=3)


@pytest.fixture
def watched(tmp_path, mqtt_broker, camera_dir, notify_socket):
    agent = WatchedAgent(_table(tmp_path, mqtt_broker.port, camera_dir), notify_socket)
    release = threading.Event()
    agent.release = release  # faults below block on this; set at teardown so threads end
    yield agent
    release.set()
    agent.stop()


def _assert_pings_then_silence(notify: NotifySocket, fault_at: float, part: str) -> None:
    # The agent pings every 0.5 s while healthy; after the fault plus the stall limit it must stop.
    assert notify.wait_for("STATUS=unhealthy: ", STAGE_STALL_S + 6.0, after=fault_at, also=f"{part}: "), \
        [m for _, m in notify.messages[-5:]]
    silent_from = time.monotonic()
    time.sleep(2.0)
    assert notify.pings_between(silent_from, time.monotonic()) == 0


def _assert_healthy_pings(notify: NotifySocket) -> None:
    assert notify.wait_for("READY=1", 5.0)
    start = time.monotonic()
    time.sleep(2.0)
    assert notify.pings_between(start, time.monotonic()) >= 2, notify.messages[-5:]


def test_pings_while_healthy_and_stop_when_the_camera_hangs(watched, notify_socket):
    _assert_healthy_pings(notify_socket)
    assert watched.agent.liveness()["camera"].ok
    # The camera's next read never returns (a USB camera wedged in the driver, an RTSP stream
    # that stops mid-frame): the grabber thread is alive but blocked.
    watched.agent.grabber.source.read = lambda: watched.release.wait() and None
    fault_at = time.monotonic()
    _assert_pings_then_silence(notify_socket, fault_at, "camera")
    detail = watched.agent.liveness()["camera"].detail
    assert "has not returned" in detail


def test_pings_stop_when_inference_is_stuck(watched, notify_socket, mqtt_broker):
    _assert_healthy_pings(notify_socket)
    reader = watched.agent.reader

    def stuck(frame):
        watched.release.wait()
        raise RuntimeError("released at teardown")

    reader.read_frame_cached = stuck
    fault_at = time.monotonic()  # the fault begins with the trigger that reaches it
    _send_trigger(mqtt_broker.port, "stuck-1")
    _assert_pings_then_silence(notify_socket, fault_at, "pipeline")
    assert "reader-0 silent" in watched.agent.liveness()["pipeline"].detail


# The exception that ends paho's thread is the point of the test, not a stray one to report.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_pings_stop_when_an_exception_kills_pahos_network_thread(watched, notify_socket, mqtt_broker):
    _assert_healthy_pings(notify_socket)
    link = watched.agent.link
    deadline = time.monotonic() + 5
    while not link.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert link.connected and link.vital().ok

    def explode(client, userdata, message):
        raise RuntimeError("a bug in a callback")

    link._client.on_message = explode  # the next message raises inside paho's network thread
    fault_at = time.monotonic()  # the fault begins with the trigger that reaches it
    _send_trigger(mqtt_broker.port, "boom-1")
    _assert_pings_then_silence(notify_socket, fault_at, "mqtt")
    # paho itself still believes it is connected; the link does not.
    assert link._client.is_connected()
    assert not link.connected
    assert "network thread has ended" in watched.agent.liveness()["mqtt"].detail


def _send_trigger(port: int, item_id: str) -> None:
    """One trigger from a short-lived PLC client, acknowledged by the broker before returning."""
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"wd-plc-{item_id}")
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        publisher.publish(f"{BASE}/trigger", json.dumps({"item_id": item_id}).encode(), qos=1).wait_for_publish(5)
    finally:
        publisher.loop_stop()
        publisher.disconnect()


def test_healthz_reports_liveness(watched):
    import urllib.error
    import urllib.request

    url = f"{watched.agent.endpoint.url}/healthz"
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["alive"] is True and set(body["checks"]) == {"pipeline", "camera", "mqtt"}
    watched.agent.grabber.source.read = lambda: watched.release.wait() and None
    deadline = time.monotonic() + STALL_S + 5
    status = 200
    while time.monotonic() < deadline and status == 200:
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError as exc:
            status = exc.code
            body = json.loads(exc.read())
        time.sleep(0.2)
    assert status == 503 and body["failing"] == ["camera"]


def test_the_real_command_says_ready_pings_and_stopping(tmp_path, mqtt_broker, camera_dir, notify_socket):
    """`edge-agent run` as systemd starts it: NOTIFY_SOCKET and WATCHDOG_USEC in its environment."""
    config = tmp_path / "line-1.toml"
    table = _table(tmp_path, mqtt_broker.port, camera_dir)
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false"))
    config.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="1000000", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _assert_ready_pings_and_stopping(proc, notify_socket, ready_timeout_s=60.0)


def _assert_ready_pings_and_stopping(proc: subprocess.Popen, notify: NotifySocket, ready_timeout_s: float) -> None:
    """READY=1, then watchdog pings (none before READY), then STOPPING=1 and exit 0 on SIGTERM."""
    try:
        assert notify.wait_for("READY=1", ready_timeout_s)
        ready_at = next(at for at, m in notify.messages if "READY=1" in m)
        assert notify.wait_for("WATCHDOG=1", 5.0, after=ready_at)
        # Nothing pings before it is ready: systemd would otherwise count a half-started service as up.
        assert not any("WATCHDOG=1" in m for at, m in notify.messages if at < ready_at)
        proc.terminate()
        assert proc.wait(30) == 0
        assert notify.wait_for("STOPPING=1", 2.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_dashboard_says_ready_and_pings(tmp_path, mqtt_broker, notify_socket):
    """edge-web under systemd: READY=1 once the page is served, then watchdog pings, STOPPING=1 at the end."""
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="1000000", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "web.cli", "--broker", f"127.0.0.1:{mqtt_broker.port}",
                             "--site", "wd-site", "--port", str(free_port())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _assert_ready_pings_and_stopping(proc, notify_socket, ready_timeout_s=30.0)
