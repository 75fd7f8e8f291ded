"""A site on loopback for the sections that need real agents: a broker, agent processes, simulated PLCs.

Like benchmarks/e2e_latency.py: the agents run as ``edge-agent run`` processes on demo configs
with a folder camera of rendered envelopes; the PLCs speak MQTT from this process.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.side_by_side.context import ROOT, Context
from edge_agent.demo import LINE, SITE, find_mosquitto, free_port, render_demo_camera, start_broker, write_demo_config
from edge_agent.simulated_plc import PlcClient


@dataclass
class Agent:
    line: str
    process: subprocess.Popen
    launched_at: float  # time.monotonic() just before the launch
    config: Path

    def stats(self) -> dict:
        """Resident memory now and at its peak (VmHWM), unique memory, of the agent process."""
        proc = psutil.Process(self.process.pid)
        info = proc.memory_full_info()
        peak_kb = 0
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = int(line.split()[1])
        except OSError:
            pass
        return {"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1),
                "peak_rss_mb": round(peak_kb / 1024, 1), "threads": proc.num_threads()}


class Site:
    """One broker, agents on their own lines, one PLC per line; ``close`` stops them all."""

    def __init__(self, ctx: Context, name: str, fps: float = 20.0, frames: int = 12):
        self.ctx = ctx
        self.dir = ctx.work_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.camera = render_demo_camera(self.dir / "camera", frames, seed=3)
        self.fps = fps
        self.port = free_port()
        kind = "mosquitto" if find_mosquitto() else "auto"
        self.broker, self.broker_name, self.protocol = start_broker(self.dir, self.port, kind)
        self.agents: list[Agent] = []
        self.plcs: list[PlcClient] = []

    def plc(self, line: str) -> PlcClient:
        base = f"postcode/{SITE}/{line}"
        plc = PlcClient("127.0.0.1", self.port, trigger_topic=f"{base}/trigger", result_topic=f"{base}/result",
                        status_topic=f"{base}/status", client_id=f"bench-plc-{line}", protocol=self.protocol)
        plc.start()
        self.plcs.append(plc)
        return plc

    def start_agent(self, line: str) -> Agent:
        """Launch ``edge-agent run`` for ``line`` (its own folder, state and HTTP port)."""
        home = self.dir / line
        home.mkdir(parents=True, exist_ok=True)
        config = write_demo_config(home, self.port, self.camera, fps=self.fps, http_port=free_port())
        config.write_text(config.read_text().replace(f'line_id = "{LINE}"', f'line_id = "{line}"'))
        log = open(home / "agent.log", "w")
        launched_at = time.monotonic()
        process = subprocess.Popen([self.ctx.python, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                   cwd=ROOT, env=self.ctx.env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        agent = Agent(line, process, launched_at, config)
        self.agents.append(agent)
        return agent

    def stop_agents(self) -> None:
        """Stop the PLCs and agents; each agent's log is kept under the report's logs/ folder."""
        for plc in self.plcs:
            plc.stop()
        self.plcs.clear()
        logs = self.ctx.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for agent in self.agents:
            _stop(agent.process, 20)
            shutil.copyfile(agent.config.parent / "agent.log", logs / f"{self.dir.name}-{agent.line}.log")
        self.agents.clear()

    def close(self) -> None:
        self.stop_agents()
        _stop(self.broker, 10)


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
