"""End to end at steady trigger rates and in a burst, a new envelope for every trigger, through Mosquitto.

    python benchmarks/e2e_rates.py [--quick] [--rates 10,50,100,300] [--burst 500] [--frame-hash encoded]

The agent is the real one (``build_agent`` + ``start_agent`` from the config a site would write,
real Mosquitto on loopback, real SQLite outbox), in its own process pinned to one core
(``taskset -c 0``); this script plays the PLC and the camera. The camera is a socket camera: this
script streams empty-paper frames at 200 fps and sends each envelope's JPEG with the moment it
was taken, as a camera that stamps its frames does, and the PLC stamps the envelope's trigger
(``triggered_at``) with the same moment.
With ``camera.max_frame_age_ms = 1`` an item can only be bound to the frame taken at its own
moment, so every answer's ``image_sha256`` is checked against the frame meant for it.
(A folder camera would not do at these rates: the grabber stamps a folder's frames when it reads
them, a few ms late and jittery under load, and rescanning a folder hundreds of times a second
costs the agent's core more than the reads.)

Phases: cold start (process start to the first answer), idle (camera at 30 fps, no trigger: the
agent's CPU), steady rates (frames and triggers at each rate: trigger-to-answer p50/p99/max, kept
up or not), then a burst of distinct envelopes dealt to five line agents (each its own camera,
as a site runs one ``edge-agent@`` per line) on both cores (time until the last is answered),
and the agents' resident memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.demo import free_port, start_broker  # noqa: E402
from edge_agent.pipeline import image_sha256  # noqa: E402
from edge_agent.render import load_demo_digits, render_postcode_dataset  # noqa: E402
from edge_agent.sources import EncodedImage  # noqa: E402

SITE = "bench-site"
_HEADER = struct.Struct("<dI")  # capture stamp (wall-clock seconds), JPEG length


# -- the camera, agent side ------------------------------------------------------------------

class SocketCamera:
    """A camera that delivers stamped JPEG frames over a Unix socket (the benchmark sends them)."""

    live = True

    def __init__(self, path: str) -> None:
        self.name = f"socket-camera:{path}"
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def open(self) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            self._sock = sock

    def read(self) -> EncodedImage | None:
        frame = self._take()
        if frame is not None:
            return frame
        if self._sock is None:
            raise OSError("socket camera is not open")
        # An empty read tells the grabber nothing was waiting when it began (its timeline is
        # complete up to then), so a frame already partly received is read to its end first.
        while True:
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                if self._buffer:
                    continue  # the rest of a frame is on its way
                return None
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise OSError("the benchmark closed the camera")
            self._buffer += chunk
            frame = self._take()
            if frame is not None:
                return frame

    def _take(self) -> EncodedImage | None:
        if len(self._buffer) < _HEADER.size:
            return None
        stamp, length = _HEADER.unpack_from(self._buffer)
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        data = bytes(self._buffer[_HEADER.size: end])
        del self._buffer[:end]
        return EncodedImage(data, "socket frame", captured_at=stamp)

    def close(self) -> None:
        pass  # the grabber reopens after a stall; the frames keep coming on the same connection


def run_child(config_path: str, camera_path: str, frame_hash: str | None) -> int:
    """The agent process: the site's wiring, with the socket camera in place of the configured one."""
    from edge_agent.agent import build_agent, start_agent
    from edge_agent.config import parse_config
    from edge_agent.signals import StopSignal
    import logging

    logging.basicConfig(level=logging.WARNING, format="agent %(levelname)s %(name)s: %(message)s")
    config = parse_config(json.loads(Path(config_path).read_text()))
    agent = build_agent(config)
    if frame_hash:
        agent.reader.frame_hash = frame_hash
    agent.grabber.source = SocketCamera(camera_path)
    stop = StopSignal((signal.SIGTERM,))  # never Event.set() in a handler: it can deadlock
    start_agent(agent)
    while not stop.wait(1.0):
        pass
    agent.stop(drain_s=10)
    return 0


# -- the benchmark ----------------------------------------------------------------------------

class Camera:
    """The benchmark's end of one socket camera: it streams empty-paper frames at ``fps`` (as a
    live camera does) and sends an envelope's frame when one passes, every frame stamped with
    the moment it is sent, in order.

    The agent binds an item to the newest frame taken at or before its trigger only once a
    later frame has arrived (a stamping camera's frames are in transit for a while), so the
    stream's rate bounds that wait: 200 fps here, up to 5 ms; a 30 fps camera, up to 33 ms.
    """

    def __init__(self, path: Path, blank: bytes, fps: float = 200.0) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.lock = threading.Lock()
        self.blank = blank
        self.fps = fps
        self._stop = threading.Event()
        self._streamer = threading.Thread(target=self._stream, daemon=True)

    def accept(self, timeout_s: float) -> None:
        self.server.settimeout(timeout_s)
        self.conn, _ = self.server.accept()
        self._streamer.start()

    def send(self, jpeg: bytes) -> float:
        """Send one frame stamped now; returns the stamp."""
        with self.lock:
            stamp = time.time()
            self.conn.sendall(_HEADER.pack(stamp, len(jpeg)) + jpeg)
            return stamp

    def _stream(self) -> None:
        while not self._stop.is_set():
            try:
                self.send(self.blank)
            except OSError:
                return
            self._stop.wait(1.0 / self.fps)

    def close(self) -> None:
        self._stop.set()
        for sock in (self.conn, self.server):
            if sock is not None:
                sock.close()


def envelope_frames(count: int, seed: int, pool: int = 120) -> list[tuple[bytes, set[str]]]:
    """``count`` distinct envelope JPEGs and the hashes an answer about each may carry.

    ``pool`` envelopes are rendered; every frame gets its own index written into two corner
    pixels, far from the postcode, so no two frames share bytes or pixels.
    """
    rendered = render_postcode_dataset(load_demo_digits(), min(pool, count), np.random.default_rng(seed))
    frames = []
    for i in range(count):
        image = rendered[i % len(rendered)][0].copy()
        image[0, 0] = (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF)
        image[0, 1] = (255 - (i & 0xFF), 0, 0)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        frames.append((jpeg, {image_sha256(pixels), hashlib.sha256(jpeg).hexdigest()}))
    return frames


def agent_table(workdir: Path, port: int, line: str, workers: int) -> dict:
    return {
        "site": {"site_id": SITE, "line_id": line},
        "camera": {"source": "0", "max_frame_age_ms": 1, "frame_wait_ms": 500},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "reader": {"workers": workers},
        "outbox": {"path": str(workdir / line / "outbox.sqlite")},
        "review": {"crops_dir": str(workdir / line / "review")},
        "http": {"port": free_port()},
        "logging": {"level": "WARNING", "json": False},
    }


def _cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


class AgentProcess:
    """One agent child with its camera and PLC."""

    def __init__(self, workdir: Path, port: int, line: str, workers: int, cores: str | None,
                 frame_hash: str | None, blank: bytes, fps: float = 200.0) -> None:
        from edge_agent.simulated_plc import PlcClient

        self.line = line
        config = workdir / f"{line}.json"
        config.write_text(json.dumps(agent_table(workdir, port, line, workers)))
        self.camera = Camera(workdir / f"{line}.sock", blank, fps)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(workdir / f"{line}.sock")]
        if frame_hash:
            cmd += ["--frame-hash", frame_hash]
        if cores and shutil.which("taskset"):
            cmd = ["taskset", "-c", cores] + cmd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        self.camera.accept(60)
        base = f"postcode/{SITE}/{line}"
        self.plc = PlcClient("127.0.0.1", port, trigger_topic=f"{base}/trigger", result_topic=f"{base}/result",
                             status_topic=f"{base}/status", client_id=f"plc-{line}")
        self.plc.start()
        if not self.plc.wait_online(60):
            raise RuntimeError(f"agent {line} did not come online")
        self.online_s = time.monotonic() - self.started
        self.ps = psutil.Process(self.proc.pid)  # taskset execs the agent: the same pid

    def envelope(self, item: str, jpeg: bytes) -> None:
        """One envelope under the camera: its frame, then the PLC's trigger stamped with the same moment."""
        stamp = self.camera.send(jpeg)
        self.plc.trigger(item, json.dumps({"item_id": item, "triggered_at": stamp}).encode())

    def cpu_s(self) -> float:
        return _cpu_s(self.ps)

    def thread_cpu_s(self) -> dict[str, float]:
        """CPU seconds per thread, by the role the agent gave each in the kernel (edge_agent.threads)."""
        totals: dict[str, float] = {}
        for t in self.ps.threads():
            try:
                role = Path(f"/proc/{self.ps.pid}/task/{t.id}/comm").read_text().strip()
            except OSError:  # the thread ended
                continue
            totals[role] = totals.get(role, 0.0) + t.user_time + t.system_time
        return totals

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> None:
        self.plc.stop()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.camera.close()


def check(agent: AgentProcess, items: dict[str, set[str]], timeout_s: float) -> dict:
    """Wait for every item's answer; latencies and whether each is about its own frame."""
    plc = agent.plc
    plc.wait_for(lambda c: all(i in c._results for i in items), timeout_s)  # noqa: SLF001 - the PLC's own book
    results = {i: plc.result(i, 0) for i in items}
    answered = {i: r for i, r in results.items() if r is not None}
    latencies = [r[1] for r in answered.values()]
    reasons: dict[str, int] = {}
    wrong_frame = 0
    for item, (payload, _latency) in answered.items():
        key = "accepted" if payload.get("accepted") else str(payload.get("reason"))
        reasons[key] = reasons.get(key, 0) + 1
        if payload.get("image_sha256") and payload["image_sha256"] not in items[item]:
            wrong_frame += 1
    read = sum(n for k, n in reasons.items() if k not in ("no_frame", "late", "surge", "agent_restart"))
    out = {"sent": len(items), "answered": len(answered), "about_own_frame": read - wrong_frame,
           "wrong_frame": wrong_frame, "reasons": reasons}
    if latencies:
        out |= {"p50_ms": round(float(np.percentile(latencies, 50)), 2),
                "p99_ms": round(float(np.percentile(latencies, 99)), 2),
                "max_ms": round(float(np.max(latencies)), 2)}
    return out


def cpu_ms_per_envelope_by_thread(agents: list[AgentProcess], before: list[dict[str, float]],
                                  envelopes: int) -> dict[str, float]:
    """CPU per envelope by thread role since ``before`` (each agent's ``thread_cpu_s``), summed over
    the agents, largest first; roles that used no CPU are left out."""
    spent: dict[str, float] = {}
    for agent, was in zip(agents, before):
        for role, seconds in agent.thread_cpu_s().items():
            spent[role] = spent.get(role, 0.0) + seconds - was.get(role, 0.0)
    return {role: round(1000 * seconds / max(1, envelopes), 2)
            for role, seconds in sorted(spent.items(), key=lambda kv: -kv[1]) if seconds > 0}


def steady(agent: AgentProcess, rate: float, frames: list[tuple[bytes, set[str]]], tag: str) -> dict:
    """A new envelope (frame + stamped trigger) every 1/rate s; did the agent keep up?"""
    cpu0, threads0, started = agent.cpu_s(), agent.thread_cpu_s(), time.time()
    items: dict[str, set[str]] = {}
    for i, (jpeg, hashes) in enumerate(frames):
        due = started + i / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        item = f"{tag}-{i:05d}"
        items[item] = hashes
        agent.envelope(item, jpeg)
    sent_s = time.time() - started
    out = check(agent, items, 30)
    cpu = agent.cpu_s() - cpu0
    out |= {"rate_per_s": rate, "achieved_rate_per_s": round(len(frames) / sent_s, 1),
            "agent_cpu_share_of_a_core": round(cpu / max(1e-9, time.time() - started), 3),
            "agent_cpu_ms_per_envelope": round(1000 * cpu / max(1, len(frames)), 2),
            # Where an envelope's CPU goes (the camera's thread reads every frame it streams,
            # envelopes and filler alike).
            "cpu_ms_per_envelope_by_thread": cpu_ms_per_envelope_by_thread([agent], [threads0], len(frames))}
    out["kept_up"] = (out["answered"] == out["sent"] and out["about_own_frame"] == out["sent"]
                      and out.get("p99_ms", 1e9) < 20.0)
    return out


def idle(agent: AgentProcess, seconds: float, fps: float = 30.0) -> dict:
    """Camera at ``fps``, no triggers: the agent's CPU (frames are kept encoded, not decoded)."""
    streaming = agent.camera.fps
    agent.camera.fps = fps
    time.sleep(0.5)
    cpu0, t0 = agent.cpu_s(), time.time()
    time.sleep(seconds)
    cpu = agent.cpu_s() - cpu0
    agent.camera.fps = streaming
    return {"seconds": round(time.time() - t0, 2), "camera_fps": fps,
            "agent_cpu_share_of_a_core": round(cpu / (time.time() - t0), 4)}


def burst(agents: list[AgentProcess], frames: list[tuple[bytes, set[str]]], gap_s: float,
          broker: psutil.Process | None = None) -> dict:
    """Distinct envelopes one right after another, dealt in turn to the lines' cameras (frame +
    stamped trigger each, as when several trucks unload onto every line at once); time from the
    first trigger to the last answer, over all lines, and whose CPU the box spent on it (this
    script plays the cameras and PLCs on the same two cores: on a site they are other devices)."""
    per_line: list[dict[str, set[str]]] = [{} for _ in agents]
    threads0 = [agent.thread_cpu_s() for agent in agents]
    harness = psutil.Process()
    cpu0 = {"agents": sum(agent.cpu_s() for agent in agents), "harness": _cpu_s(harness),
            "broker": _cpu_s(broker) if broker else 0.0}
    box0 = psutil.cpu_times()
    started = time.time()
    for i, (jpeg, hashes) in enumerate(frames):
        line = i % len(agents)
        item = f"burst-{i:05d}"
        per_line[line][item] = hashes
        agents[line].envelope(item, jpeg)  # each stamped the moment its frame is sent
        if gap_s:
            time.sleep(gap_s)
    sent_s = time.time() - started
    lines = [check(agent, items, 60) for agent, items in zip(agents, per_line)]
    box1 = psutil.cpu_times()
    spent = {"agents": sum(agent.cpu_s() for agent in agents) - cpu0["agents"],
             "harness": _cpu_s(harness) - cpu0["harness"],
             "broker": (_cpu_s(broker) - cpu0["broker"]) if broker else 0.0}
    busy = ((box1.user + box1.system + box1.nice + box1.irq + box1.softirq)
            - (box0.user + box0.system + box0.nice + box0.irq + box0.softirq))
    out: dict = {"lines": len(agents), "sent": len(frames)}
    # CPU the box spent from the first trigger until every answer was in, an envelope: the agents'
    # share alone bounds the burst on two cores (agents_s / 2) whatever the harness costs.
    out["cpu_ms_per_envelope"] = {role: round(1000 * seconds / max(1, len(frames)), 2)
                                  for role, seconds in spent.items()} | {
        "whole_box": round(1000 * busy / max(1, len(frames)), 2)}
    out["agents_cpu_s_over_two_cores"] = round(spent["agents"] / 2, 3)
    out["cpu_ms_per_envelope_by_thread"] = cpu_ms_per_envelope_by_thread(agents, threads0, len(frames))
    for key in ("answered", "about_own_frame", "wrong_frame"):
        out[key] = sum(line[key] for line in lines)
    reasons: dict[str, int] = {}
    for line in lines:
        for reason, n in line["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    out["reasons"] = reasons
    finished, latencies, first_sent = [], [], None
    for agent, items in zip(agents, per_line):
        plc = agent.plc
        sent = plc._sent  # noqa: SLF001 - the PLC's own book
        first = min(sent[i] for i in items)
        first_sent = first if first_sent is None else min(first_sent, first)
        for item in items:
            if item in plc._results:  # noqa: SLF001
                latencies.append(plc._results[item][1])  # noqa: SLF001
                finished.append(sent[item] + plc._results[item][1] / 1000)  # noqa: SLF001
    out |= {"sending_s": round(sent_s, 3),
            "first_trigger_to_last_answer_s": round(max(finished) - first_sent, 3) if finished else None,
            "max_latency_ms": round(max(latencies), 1) if latencies else None,
            "per_line_about_own_frame": [line["about_own_frame"] for line in lines]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a minute or so)")
    parser.add_argument("--rates", default="10,50,100,300")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each steady rate")
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--burst-gap-ms", type=float, default=0.4,
                        help="between the burst's envelopes (one camera sees one envelope at a time)")
    parser.add_argument("--burst-lines", type=int, default=5,
                        help="line agents sharing the burst, each with its own camera (the deployed shape: "
                             "one agent per line); 1 = one agent with --burst-workers reader threads")
    parser.add_argument("--burst-workers", type=int, default=2, help="reader threads of a lone burst agent")
    parser.add_argument("--burst-fps", type=float, default=60.0,
                        help="the burst lines' cameras between envelopes (a line camera's rate; the steady "
                             "agent's 200 fps only bounds its binding wait for the latency figures)")
    parser.add_argument("--core", default="0", help="core(s) for the steady-rate agent (taskset -c)")
    parser.add_argument("--frame-hash", choices=("pixels", "encoded"), help="override the reader's audit hash")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child[0], args.child[1], args.frame_hash)
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is required: apt-get install mosquitto", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",") if r]
    seconds = 1.5 if args.quick else args.seconds
    burst_n = min(args.burst, 100) if args.quick else args.burst
    counts = {r: max(10, int(r * seconds)) for r in rates}
    workdir = Path(tempfile.mkdtemp(prefix="e2e-rates-"))
    frames = envelope_frames(sum(counts.values()) + burst_n + 40 + 10 * max(1, args.burst_lines), seed=5)
    blank = cv2.imencode(".jpg", np.full((480, 640, 3), 235, np.uint8))[1].tobytes()
    port = free_port()
    broker, _name, _protocol = start_broker(workdir, port, "mosquitto")
    report: dict = {"setup": {"frame_hash": args.frame_hash or "the config default (encoded)", "steady_agent_cores": args.core,
                              "burst_agents": (f"{args.burst_lines} line agents, one reader each" if args.burst_lines > 1
                                               else f"one agent, reader.workers = {args.burst_workers}")
                              + f", both cores, cameras at {args.burst_fps:g} fps", "cpus": os.cpu_count()}}
    steady_agent = None
    burst_agents: list[AgentProcess] = []
    try:
        steady_agent = AgentProcess(workdir, port, "line-steady", 1, args.core, args.frame_hash, blank)
        jpeg, hashes = frames.pop()
        steady_agent.envelope("cold-start", jpeg)
        first = check(steady_agent, {"cold-start": hashes}, 30)
        report["cold_start"] = {"process_start_to_online_s": round(steady_agent.online_s, 2),
                                "process_start_to_first_answer_s": round(time.monotonic() - steady_agent.started, 2),
                                "first_answer_ms": first.get("p50_ms")}
        warm = [frames.pop() for _ in range(20)]
        steady(steady_agent, 20.0, warm, "warm")
        report["idle"] = idle(steady_agent, 3.0 if args.quick else 6.0)
        report["steady"] = []
        for rate in rates:
            batch = [frames.pop() for _ in range(counts[rate])]
            report["steady"].append(steady(steady_agent, rate, batch, f"r{int(rate)}"))
            time.sleep(0.5)
        report["steady_agent_rss_mb"] = round(steady_agent.rss_mb(), 1)
        steady_agent.stop()
        steady_agent = None

        if burst_n > 0:  # --burst 0: the steady rates only
            # Both cores, no pinning. The deployed shape is one agent per line (systemd's edge-agent@):
            # five lines' agents share the box; --burst-lines 1 is one agent with reader threads.
            lone = args.burst_lines <= 1
            for n in range(max(1, args.burst_lines)):
                burst_agents.append(AgentProcess(workdir, port, f"line-burst-{n + 1}", args.burst_workers if lone else 1,
                                                 None, args.frame_hash, blank, args.burst_fps))
            for agent in burst_agents:
                steady(agent, 20.0, [frames.pop() for _ in range(10)], f"warm-{agent.line}")
            report["burst"] = burst(burst_agents, [frames.pop() for _ in range(burst_n)], args.burst_gap_ms / 1000,
                                    psutil.Process(broker.pid))
            report["burst"]["under_1_s"] = bool(report["burst"]["first_trigger_to_last_answer_s"] is not None
                                                and report["burst"]["first_trigger_to_last_answer_s"] < 1.0
                                                and report["burst"]["about_own_frame"] == burst_n)
            report["burst_agent_rss_mb"] = [round(agent.rss_mb(), 1) for agent in burst_agents]
    finally:
        for agent in [steady_agent] + burst_agents:
            if agent is not None:
                agent.stop()
        broker.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
