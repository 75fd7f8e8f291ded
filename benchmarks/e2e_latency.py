"""End-to-end latency through a real Mosquitto: PLC trigger -> agent -> result message.

The agent runs as its own process pinned to one core (taskset), as on a small site box;
the simulated PLC runs here. Prints JSON: sequential p50/p99/max, burst completion time,
agent resident memory, and whether TensorFlow was imported.

    python benchmarks/e2e_latency.py --sequential 1000 --burst 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.demo import SITE, LINE, free_port, render_demo_camera, start_broker, write_demo_config  # noqa: E402
from edge_agent.simulated_plc import PlcClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--core", default="0", help="CPU core(s) for the agent (taskset -c)")
    parser.add_argument("--fps", type=float, default=20.0, help="demo camera frame rate")
    parser.add_argument("--spacing-ms", type=float, default=60.0,
                        help="gap between sequential triggers: longer than a frame, so each reads a new frame")
    parser.add_argument("--sort-plan", type=int, default=0, metavar="CODES",
                        help="decide with a sort plan of this many valid codes (the camera's among them)")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is required: apt-get install mosquitto", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="e2e-"))
    camera = render_demo_camera(workdir / "camera", 12, seed=3)
    port = free_port()
    broker, _name, _protocol = start_broker(workdir, port, "mosquitto")
    config = write_demo_config(workdir, port, camera, fps=args.fps)
    if args.sort_plan:
        truth = json.loads((workdir / "truth.json").read_text())
        rng = np.random.default_rng(5)
        codes = set(truth.values()) | {f"{c:05d}" for c in rng.choice(100_000, args.sort_plan, replace=False)}
        codes = sorted(codes)
        (workdir / "plan.csv").write_text("postcode,chute\n" + "".join(f"{c},R{c[:2]}\n" for c in codes))
        config.write_text(config.read_text() + f'[sort_plan]\npath = "{workdir / "plan.csv"}"\n')
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", args.core] + cmd
    agent = subprocess.Popen(cmd, cwd=ROOT)
    base = f"postcode/{SITE}/{LINE}"
    plc = PlcClient("127.0.0.1", port, trigger_topic=f"{base}/trigger", result_topic=f"{base}/result",
                    status_topic=f"{base}/status")
    report: dict = {}
    try:
        plc.start()
        assert plc.wait_online(60), "agent did not come online"
        for i in range(20):  # warm-up: first reads allocate interpreter buffers
            plc.request(f"warm-{i}", timeout_s=10)
        latencies, frames = [], set()
        for i in range(args.sequential):
            result = plc.request(f"seq-{i:05d}", timeout_s=10)
            if result is not None:
                latencies.append(result[1])
                frames.add(result[0].get("frame_seq"))
            time.sleep(args.spacing_ms / 1000.0)
        started = time.monotonic()
        burst = plc.burst([f"burst-{i:05d}" for i in range(args.burst)], timeout_s=60)
        burst_s = time.monotonic() - started
        proc = psutil.Process(agent.pid)
        rss = max([p.memory_info().rss for p in [proc] + proc.children(recursive=True)])
        report = {
            "sequential": {"n": len(latencies), "distinct_frames_read": len(frames), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
                           "p99_ms": round(float(np.percentile(latencies, 99)), 2),
                           "max_ms": round(float(np.max(latencies)), 2)},
            "burst": {"sent": args.burst, "answered": len(burst), "seconds": round(burst_s, 3),
                      "p99_ms": round(float(np.percentile(burst, 99)), 1) if burst else None},
            "agent_rss_mb": round(rss / 2**20, 1),
            "agent_cores": args.core,
            "sort_plan_codes": args.sort_plan or None,
        }
    finally:
        plc.stop()
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        broker.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
