"""The appliance demo: a rendered camera, a broker, the agent service and a simulated PLC.

``edge-agent demo-run`` is what the README's first command runs on a fresh machine:
it needs no MNIST download (the agent ships 300 training digits) and no Mosquitto
(an embedded amqtt broker stands in when Mosquitto is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.mnist import load_split
from edge_agent.pipeline import image_sha256
from edge_agent.render import load_demo_digits, render_postcode_dataset

SITE, LINE = "demo-site", "line-1"


def render_demo_camera(out_dir: Path, frames: int, seed: int, video: bool = False,
                       mnist_dir: Path | None = None) -> Path:
    """Write postcode frames (PNG files, or one MJPG video) and truth.json mapping image hash -> postcode."""
    digits = load_split(mnist_dir, "train") if mnist_dir else load_demo_digits()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    truth: dict[str, str] = {}
    rendered = render_postcode_dataset(digits, frames, rng, length=5)
    if video:
        path = out_dir / "camera.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (640, 480))
        for frame, _postcode in rendered:
            writer.write(frame)
        writer.release()
        (out_dir.parent / "truth.json").write_text(json.dumps(
            {"frames": [postcode for _f, postcode in rendered]}, indent=1))
        return path
    for i, (frame, postcode) in enumerate(rendered):
        path = out_dir / f"envelope-{i:04d}.png"
        cv2.imwrite(str(path), frame)
        # Keyed by both hashes a result may carry (reader.frame_hash): the file's bytes and
        # the pixels a reader of the file decodes.
        truth[image_sha256(path.read_bytes())] = postcode
        truth[image_sha256(cv2.imread(str(path), cv2.IMREAD_COLOR))] = postcode
    (out_dir.parent / "truth.json").write_text(json.dumps(truth, indent=1))
    return out_dir


_PORTS_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed out before.

    The kernel may give the same ephemeral port to two binds in a row once the first socket is
    closed, so two ports chosen before either is used (a broker's plain and TLS listeners, an
    agent's MQTT and HTTP ports) could collide; remembering every port handed out rules that out."""
    with _PORTS_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _PORTS_HANDED_OUT:
                _PORTS_HANDED_OUT.add(port)
                return port


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout_s}s")


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    return found or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def start_broker(workdir: Path, port: int, kind: str = "auto") -> tuple[subprocess.Popen, str, str]:
    """Mosquitto when installed (MQTT v5), else the embedded amqtt broker (MQTT 3.1.1).

    Returns the process, a name to show, and the MQTT version it speaks."""
    mosquitto = find_mosquitto() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and mosquitto is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    log = open(workdir / "broker.log", "w")
    if mosquitto:
        conf = workdir / "mosquitto.conf"
        # Without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to a result that follows a PUBACK.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "set_tcp_nodelay true\n")
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        name, protocol = "Mosquitto", "5"
    else:
        conf = workdir / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        amqtt = Path(sys.executable).with_name("amqtt")
        proc = subprocess.Popen([str(amqtt), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        name, protocol = "amqtt (embedded; install mosquitto for MQTT v5)", "3.1.1"
    wait_for_port(port)
    return proc, name, protocol


def write_demo_config(workdir: Path, port: int, camera: Path, fps: float = 4.0, http_port: int = 9400) -> Path:
    config = workdir / "agent.toml"
    config.write_text(f"""
[site]
site_id = "{SITE}"
line_id = "{LINE}"
[camera]
source = "{camera}"
loop = true
fps = {fps}
max_frame_age_ms = 1000
[trigger]
mode = "mqtt"
[mqtt]
host = "127.0.0.1"
port = {port}
[outbox]
path = "state/outbox.sqlite"
[review]
crops_dir = "state/review"
[http]
port = {http_port}
[logging]
level = "WARNING"
""")
    return config


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


DEFAULT_WEB_PORT = 8080
KEEP_RUNNING_TRIGGER_S = 0.5  # after the script, the PLC sends an envelope this often
STATUS_EVERY_S = 30.0


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_dashboard(workdir: Path, broker_port: int, web_port: int) -> subprocess.Popen | None:
    """edge-web against the demo broker, its JSON log in ``workdir``; None if it did not come up."""
    log = open(workdir / "edge-web.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "web.cli", "--broker", f"127.0.0.1:{broker_port}", "--site", SITE,
                             "--port", str(web_port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", web_port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    _stop(proc, 5)
    return None


def _stop(proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it does not end in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def keep_running(plc, deadline: float | None, dashboard_url: str) -> None:
    """The appliance runs on, the PLC sending an envelope every half second, until Ctrl-C or the deadline."""
    sent = 0
    next_status = time.monotonic() + STATUS_EVERY_S
    answered_before = len(plc.results())
    while deadline is None or time.monotonic() < deadline:
        plc.trigger(f"live-{sent:06d}")
        sent += 1
        time.sleep(KEEP_RUNNING_TRIGGER_S if deadline is None else
                   max(0.0, min(KEEP_RUNNING_TRIGGER_S, deadline - time.monotonic())))
        if time.monotonic() >= next_status:
            next_status += STATUS_EVERY_S
            results = plc.results()
            live = [r for item, r in results.items() if item.startswith("live-")]
            print(f"   running: {len(results) - answered_before} more envelopes answered, "
                  f"{sum(bool(r.get('accepted')) for r in live)} of {len(live)} live ones sorted automatically; "
                  f"dashboard {dashboard_url}", flush=True)


def run_demo(workdir: Path, items: int = 20, burst: int = 500, seed: int = 7, broker_kind: str = "auto",
             duration_s: float | None = None, web_port: int | None = None) -> int:
    """Run the whole appliance with its dashboard, print what the sorting machine receives, keep running.

    ``duration_s``: end by itself this long after the start (the scripted part always completes);
    None: run until Ctrl-C. ``web_port``: the dashboard's port (default 8080, or a free one if taken).
    """
    from edge_agent.simulated_plc import PlcClient  # the simulated PLC speaks MQTT like a real one

    started = time.monotonic()
    deadline = None if duration_s is None else started + duration_s
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if web_port is None:
        web_port = DEFAULT_WEB_PORT if port_is_free(DEFAULT_WEB_PORT) else free_port()
    elif not port_is_free(web_port):
        print(f"port {web_port} is taken on 127.0.0.1; choose another with --web-port", file=sys.stderr)
        return 2
    print("1/5 rendering the demo camera: 24 envelopes from MNIST training digits ...", flush=True)
    camera = render_demo_camera(workdir / "camera", 24, seed)
    truth = json.loads((workdir / "truth.json").read_text())
    port = free_port()
    broker = agent = web = plc = None
    latencies: list[float] = []
    finished_script = interrupted = False
    try:
        broker, broker_name, protocol = start_broker(workdir, port, broker_kind)
        web = start_dashboard(workdir, port, web_port)
        dashboard_url = f"http://127.0.0.1:{web_port}/"
        print(f"2/5 broker: {broker_name} on 127.0.0.1:{port}", flush=True)
        if web is None:
            print(f"the dashboard (edge-web) did not start; see {workdir / 'edge-web.log'}", file=sys.stderr)
            return 1
        print(f"   dashboard: {dashboard_url}  (edge-web; its log: {workdir / 'edge-web.log'})", flush=True)
        http_port = free_port()
        config = write_demo_config(workdir, port, camera, http_port=http_port)
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                 env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)
        base = f"postcode/{SITE}/{LINE}"
        plc = PlcClient("127.0.0.1", port, trigger_topic=f"{base}/trigger", result_topic=f"{base}/result",
                        status_topic=f"{base}/status", protocol=protocol)
        plc.start()
        if not plc.wait_online(60):
            print("the agent did not come online within 60 s; see the log above", file=sys.stderr)
            return 1
        print(f"3/5 agent {LINE} online ({plc.agent_status().get('protocol', '?')}); "
              f"its metrics: http://127.0.0.1:{http_port}/metrics", flush=True)
        print(f"   the PLC triggers {items} envelopes as they pass the camera:", flush=True)
        print(f"   {'item':<10} {'read':<7} {'decision':<8} {'confidence':>10} {'truth':<7} {'':1} "
              f"{'latency':>9}")
        right = accepted = 0
        for i in range(items):
            item = f"env-{i:04d}"
            result = plc.request(item, timeout_s=10)
            time.sleep(0.3)
            if result is None:
                print(f"   {item:<10} (no answer)")
                continue
            payload, latency_ms = result
            expected = truth.get(payload.get("image_sha256", ""), "?")
            ok = payload["postcode"] == expected
            accepted += payload["accepted"]
            right += payload["accepted"] and ok
            decision = "SORT" if payload["accepted"] else "REVIEW"
            mark = ("ok" if ok else "x") if payload["accepted"] else ""
            print(f"   {item:<10} {payload['postcode']:<7} {decision:<8} {payload['confidence']:>10.4f} "
                  f"{expected:<7} {mark:<2} {latency_ms:>7.1f}ms"
                  + (f"  ({payload['reason']})" if payload["reason"] else ""), flush=True)
        print(f"   {accepted}/{items} sorted automatically, {right} of them right; the rest went to review",
              flush=True)

        print(f"4/5 a burst of {burst} triggers at once (several trucks arriving):", flush=True)
        burst_started = time.monotonic()
        latencies = plc.burst([f"burst-{i:05d}" for i in range(burst)], timeout_s=60)
        elapsed = time.monotonic() - burst_started
        print(f"   {len(latencies)}/{burst} answered in {elapsed:.2f} s; trigger->result "
              f"p50 {_percentile(latencies, 50):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms", flush=True)
        burst_results = plc.results()
        reasons: dict[str, int] = {}
        for i in range(burst):
            payload = burst_results.get(f"burst-{i:05d}")
            if payload is not None:
                key = "sorted" if payload["accepted"] else str(payload["reason"])
                reasons[key] = reasons.get(key, 0) + 1
        print("   " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
              + "\n   (one camera sees one envelope at a time: triggers arriving faster than that cannot be"
                " matched to an image,\n    so past the first few they go to manual keying as 'surge', never"
                " to a bin read from another envelope)", flush=True)
        finished_script = True

        if deadline is None:
            print(f"5/5 the appliance keeps running, the PLC sending an envelope every {KEEP_RUNNING_TRIGGER_S:g} s.\n"
                  f"   dashboard: {dashboard_url}\n   metrics:   http://127.0.0.1:{http_port}/metrics\n"
                  "   press Ctrl-C to stop", flush=True)
        elif time.monotonic() < deadline:
            print(f"5/5 the appliance keeps running until --duration {duration_s:g} s is up "
                  f"({deadline - time.monotonic():.0f} s more); dashboard: {dashboard_url}", flush=True)
        else:
            print("5/5 --duration is up", flush=True)
        keep_running(plc, deadline, dashboard_url)
    except KeyboardInterrupt:
        interrupted = True
        print("\n   Ctrl-C: stopping the appliance ...", flush=True)
    finally:
        # Children run in their own sessions (a Ctrl-C reaches only this process), so they are
        # stopped here in order: the PLC, the agent (answers what it took in), the page, the broker.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        if plc is not None:
            plc.stop()
        _stop(agent, 20)
        _stop(web, 10)
        _stop(broker, 10)
        signal.signal(signal.SIGINT, previous)
    print(f"   stopped cleanly; audit trail and review crops are in {workdir / 'state'}", flush=True)
    if not finished_script:
        return 130 if interrupted else 1
    return 0 if len(latencies) == burst else 1
