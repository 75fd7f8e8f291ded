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
        # Hash what a reader of the file will decode, so results can be matched to the truth.
        truth[image_sha256(cv2.imread(str(path), cv2.IMREAD_COLOR))] = postcode
    (out_dir.parent / "truth.json").write_text(json.dumps(truth, indent=1))
    return out_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        name, protocol = "Mosquitto", "5"
    else:
        conf = workdir / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        amqtt = Path(sys.executable).with_name("amqtt")
        proc = subprocess.Popen([str(amqtt), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        name, protocol = "amqtt (embedded; install mosquitto for MQTT v5)", "3.1.1"
    wait_for_port(port)
    return proc, name, protocol


def write_demo_config(workdir: Path, port: int, camera: Path, fps: float = 4.0) -> Path:
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
[logging]
level = "WARNING"
""")
    return config


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_demo(workdir: Path, items: int = 20, burst: int = 500, seed: int = 7, broker_kind: str = "auto") -> int:
    """Run the whole appliance for a minute and print what the sorting machine receives."""
    from edge_agent.simulated_plc import PlcClient  # the simulated PLC speaks MQTT like a real one

    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    print("1/5 rendering the demo camera: 24 envelopes from MNIST training digits ...", flush=True)
    camera = render_demo_camera(workdir / "camera", 24, seed)
    truth = json.loads((workdir / "truth.json").read_text())
    port = free_port()
    broker, broker_name, protocol = start_broker(workdir, port, broker_kind)
    print(f"2/5 broker: {broker_name} on 127.0.0.1:{port}", flush=True)
    config = write_demo_config(workdir, port, camera)
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                             env=os.environ | {"PYTHONUNBUFFERED": "1"})
    base = f"postcode/{SITE}/{LINE}"
    plc = PlcClient("127.0.0.1", port, trigger_topic=f"{base}/trigger", result_topic=f"{base}/result",
                    status_topic=f"{base}/status", protocol=protocol)
    try:
        plc.start()
        if not plc.wait_online(60):
            print("the agent did not come online within 60 s; see the log above", file=sys.stderr)
            return 1
        print(f"3/5 agent online ({plc.agent_status().get('protocol', '?')}); the PLC triggers "
              f"{items} envelopes as they pass the camera:", flush=True)
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
            decision = "SORT" if payload["accepted"] else f"REVIEW"
            mark = ("ok" if ok else "x") if payload["accepted"] else ""
            print(f"   {item:<10} {payload['postcode']:<7} {decision:<8} {payload['confidence']:>10.4f} "
                  f"{expected:<7} {mark:<2} {latency_ms:>7.1f}ms"
                  + (f"  ({payload['reason']})" if payload["reason"] else ""), flush=True)
        print(f"   {accepted}/{items} sorted automatically, {right} of them right; the rest went to review",
              flush=True)

        print(f"4/5 a burst of {burst} triggers at once (several trucks arriving):", flush=True)
        started = time.monotonic()
        latencies = plc.burst([f"burst-{i:05d}" for i in range(burst)], timeout_s=60)
        elapsed = time.monotonic() - started
        print(f"   {len(latencies)}/{burst} answered in {elapsed:.2f} s; trigger->result "
              f"p50 {_percentile(latencies, 50):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms", flush=True)
    finally:
        plc.stop()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.terminate()
        broker.wait(10)
    print(f"5/5 stopped cleanly; audit trail and review crops are in {workdir / 'state'}", flush=True)
    return 0 if len(latencies) == burst else 1
