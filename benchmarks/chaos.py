"""Chaos at full size: the appliance's first promise under floods, kill -9, SIGTERM and a lost camera.

Every trigger the broker accepted must get exactly one answer, about its own image, in
time. Each scenario builds a fresh site on loopback (Mosquitto with persistence, the agent
as its own process, a looped 30 fps camera, a simulated PLC, a persistent-session sorting
machine; see tests/chaos.py), prints its report, and the JSON summary of all of them goes
to ``--out``. Exit status 1 if any scenario broke the promise or its own checks.

    python benchmarks/chaos.py                       # every scenario, about 2 minutes on 2 cores
    python benchmarks/chaos.py --workdir /tmp/chaos  # keep each site's agent and broker logs
    python benchmarks/chaos.py --scenario flood-10000 --out /tmp/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.broker import find_mosquitto  # noqa: E402
from tests.chaos import (ChaosSite, Report, render_camera, scenario_camera_gap, scenario_flood,  # noqa: E402
                         scenario_kill, scenario_repeat, scenario_response_topics, scenario_sigterm)

# Mosquitto saves after every change, so a kill -9 of the broker tests the agent, not the broker's autosave.
DURABLE_BROKER = {"broker_autosave_changes": 1}
# name -> (site options, scenario). The figures are the issue's.
SCENARIOS: dict[str, tuple[dict, Callable[[ChaosSite], Report]]] = {
    "flood-3000": ({}, lambda site: scenario_flood(site, 3000, answer_timeout_s=90.0)),
    "flood-10000": ({}, lambda site: scenario_flood(site, 10_000, answer_timeout_s=180.0)),
    "kill-agent": ({}, lambda site: scenario_kill(
        site, target="agent", rate=100.0, duration_s=10.0, events=[(4.0, "kill agent"), (7.0, "start agent")])),
    "kill-broker": (DURABLE_BROKER, lambda site: scenario_kill(
        site, target="broker", rate=100.0, duration_s=10.0, events=[(4.0, "kill broker"), (7.0, "start broker")])),
    # The broker as the Ansible role deploys it (autosave every 10 s), killed before its first save.
    "kill-site-broker": ({"broker_extra": ["autosave_interval 10"]}, lambda site: scenario_kill(
        site, target="broker", rate=100.0, duration_s=10.0, events=[(5.0, "kill broker"), (7.0, "start broker")])),
    # The sorting machine away while the broker (saving once a second) is killed: its queue's last second.
    "kill-broker-sorter-away": ({}, lambda site: scenario_kill(
        site, target="broker", rate=100.0, duration_s=10.0,
        events=[(3.0, "sorter away"), (5.0, "kill broker"), (6.0, "start broker"), (7.0, "sorter back")])),
    # The agent down, so the broker (autosave every 10 s, as deployed) holds its triggers in memory,
    # then killed -9: only a PLC that sends unanswered stamped triggers again gets them answered.
    "kill-agent-then-site-broker": ({"broker_extra": ["autosave_interval 10"], "plc_retry_unanswered_s": 5.0},
                                    lambda site: scenario_kill(
        site, target="agent-and-broker", rate=100.0, duration_s=8.0,
        events=[(2.0, "kill agent"), (3.0, "kill broker"), (3.5, "start broker"), (4.0, "start agent")],
        answer_timeout_s=30.0)),
    "kill-both": ({**DURABLE_BROKER, "plc_retry_unanswered_s": 15.0}, lambda site: scenario_kill(
        site, target="agent-and-broker", rate=100.0, duration_s=10.0,
        events=[(3.0, "kill agent"), (4.0, "kill broker"), (6.0, "start agent"), (7.0, "start broker")])),
    "sigterm": ({}, lambda site: scenario_sigterm(site, rate=100.0, term_at_s=4.0)),
    "camera-gone-20s": ({}, lambda site: scenario_camera_gap(site, gap_s=20.0, rate=20.0, before_s=3.0,
                                                             after_s=5.0)),
    "repeat-item": ({}, lambda site: scenario_repeat(site, repeats=3, spacing_s=0.2)),
    "response-topics": ({"response_topic_prefix": "plc/replies/"},
                        lambda site: scenario_response_topics(site, allowed_prefix="plc/replies/")),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable); default: all")
    parser.add_argument("--out", type=Path, default=Path("chaos-summary.json"), help="JSON summary file")
    parser.add_argument("--workdir", type=Path, help="keep each site's logs here (default: a temporary folder, "
                        "removed at the end)")
    parser.add_argument("--agent-root", type=Path, help="run the agent from another checkout "
                        "(e.g. `git archive <commit> edge_agent models | tar -x -C DIR`)")
    args = parser.parse_args()
    mosquitto = find_mosquitto()
    if mosquitto is None:
        print("mosquitto is required: apt-get install mosquitto", file=sys.stderr)
        return 2
    names = args.scenario or list(SCENARIOS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    camera = render_camera(workdir / "camera-template", 45, seed=5)
    summary: dict = {"machine": {"python": platform.python_version(), "cpus": _cpus(), "mosquitto": mosquitto},
                     "agent_root": str(args.agent_root or ROOT), "scenarios": {}}
    started = time.monotonic()
    try:
        for name in names:
            options, scenario = SCENARIOS[name]
            t0 = time.monotonic()
            with ChaosSite(workdir / name, mosquitto, camera_template=camera, agent_root=args.agent_root,
                           **options) as site:
                report = scenario(site)
            entry = report.as_dict() | {"seconds": round(time.monotonic() - t0, 1)}
            summary["scenarios"][name] = entry
            print(report.render(), flush=True)
            print(f"  ({entry['seconds']} s)\n", flush=True)
    finally:
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["ok"] = all(s["ok"] for s in summary["scenarios"].values()) and len(summary["scenarios"]) == len(names)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    verdicts = ", ".join(f"{n} {'ok' if s['ok'] else 'FAIL'}" for n, s in summary["scenarios"].items())
    print(f"{verdicts}\nsummary: {args.out} ({summary['seconds']} s)")
    return 0 if summary["ok"] else 1


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    sys.exit(main())
