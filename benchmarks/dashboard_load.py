"""Does the site dashboard cost the sorting line anything? Trigger→result p99 with and without page loads.

One run, side by side: Mosquitto, one agent (`edge-agent run`, looped demo camera), `edge-web`
and a simulated PLC, all on this box. The PLC sends triggers one after another (each reads a new
frame) in alternating phases: quiet, then with a separate process loading the dashboard 5 times
a second (the page, its CSS, JS and Chart.js, and the API call the page makes), and so on.
Prints the p50/p99 of each condition, their ratio, and edge-web's peak resident memory.

    python benchmarks/dashboard_load.py [--phases 6] [--per-phase 150] [--loads-per-s 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.demo import render_demo_camera  # noqa: E402
from edge_agent.simulated_plc import PlcClient  # noqa: E402
from tests.broker import MosquittoBroker, find_mosquitto, free_port, wait_for_port  # noqa: E402

SITE, LINE = "bench-site", "line-1"
PAGE_PARTS = ("/", "/static/dashboard.css", "/static/dashboard.js", "/static/vendor/chart.umd.min.js",
              "/api/site")


def load_pages(base: str, per_s: float, stop: "multiprocessing.synchronize.Event", counts) -> None:
    """In its own process: fetch the page and what it loads, ``per_s`` times a second."""
    period = 1.0 / per_s
    next_at = time.monotonic()
    while not stop.is_set():
        for part in PAGE_PARTS:
            try:
                with urllib.request.urlopen(base + part, timeout=5) as response:
                    response.read()
            except OSError:
                counts[1] += 1
        counts[0] += 1
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=6, help="alternating quiet/loaded phases (even)")
    parser.add_argument("--per-phase", type=int, default=150, help="sequential triggers per phase")
    parser.add_argument("--loads-per-s", type=float, default=5.0)
    parser.add_argument("--spacing-ms", type=float, default=60.0, help="gap between triggers (a new frame each)")
    args = parser.parse_args()
    mosquitto = find_mosquitto()
    if mosquitto is None:
        print("mosquitto is required: apt-get install mosquitto", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-load-"))
    broker = MosquittoBroker(workdir / "broker", mosquitto)
    broker.start()
    camera = render_demo_camera(workdir / "camera", 12, seed=3)
    agent_port, web_port = free_port(), free_port()
    config = workdir / "agent.toml"
    config.write_text("\n".join([
        "[site]", f'site_id = "{SITE}"', f'line_id = "{LINE}"',
        "[camera]", f'source = "{camera}"', "loop = true", "fps = 20.0",
        "[mqtt]", f"port = {broker.port}",
        "[outbox]", f'path = "{workdir / "state" / "outbox.sqlite"}"',
        "[review]", f'crops_dir = "{workdir / "state" / "review"}"',
        "[http]", f"port = {agent_port}",
        "[logging]", 'level = "WARNING"',
    ]) + "\n")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], cwd=ROOT)
    web = subprocess.Popen([sys.executable, "-m", "web.cli", "--broker", f"127.0.0.1:{broker.port}", "--site", SITE,
                            "--port", str(web_port), "--log-level", "WARNING"], cwd=ROOT)
    base = f"http://127.0.0.1:{web_port}"
    topic = f"postcode/{SITE}/{LINE}"
    plc = PlcClient("127.0.0.1", broker.port, trigger_topic=f"{topic}/trigger", result_topic=f"{topic}/result",
                    status_topic=f"{topic}/status")
    peak_rss = 0
    watching = threading.Event()

    def watch_web_memory() -> None:
        nonlocal peak_rss
        proc = psutil.Process(web.pid)
        while not watching.is_set():
            try:
                peak_rss = max(peak_rss, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    latencies: dict[str, list[float]] = {"quiet": [], "loaded": []}
    pages = multiprocessing.Array("i", 2)
    try:
        plc.start()
        assert plc.wait_online(60), "agent did not come online"
        assert wait_for_port("127.0.0.1", web_port, 30), "edge-web did not start"
        threading.Thread(target=watch_web_memory, daemon=True).start()
        for i in range(20):  # warm-up
            plc.request(f"warm-{i}", timeout_s=10)
        for phase in range(args.phases):
            loaded = phase % 2 == 1
            stop = multiprocessing.Event()
            loader = None
            if loaded:
                loader = multiprocessing.Process(target=load_pages, args=(base, args.loads_per_s, stop, pages))
                loader.start()
                time.sleep(1.0)
            for i in range(args.per_phase):
                result = plc.request(f"p{phase}-{i:04d}", timeout_s=10)
                if result is not None:
                    latencies["loaded" if loaded else "quiet"].append(result[1])
                time.sleep(args.spacing_ms / 1000.0)
            if loader is not None:
                stop.set()
                loader.join(10)
    finally:
        watching.set()
        plc.stop()
        for proc in (agent, web):
            proc.terminate()
            proc.wait(30)
        broker.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {name: {"n": len(v), "p50_ms": round(float(np.percentile(v, 50)), 2),
                     "p99_ms": round(float(np.percentile(v, 99)), 2)} for name, v in latencies.items()}
    report["p99_ratio_loaded_to_quiet"] = round(report["loaded"]["p99_ms"] / report["quiet"]["p99_ms"], 3)
    report["page_loads"] = pages[0]
    report["page_load_errors"] = pages[1]
    report["edge_web_peak_rss_mb"] = round(peak_rss / 2**20, 1)
    report["cpu"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "unknown")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
