"""Switching models under a steady 100 triggers/s: nothing lost or doubled, and the latency around the switch.

A ChaosSite (tests/chaos.py: Mosquitto with persistence, the agent as its own process, a looped
30 fps camera, the PLC, a persistent-session sorter) whose agent loads ``models/active``; halfway
through the traffic the pointer is switched to another bundle, as ``edge-sync pull`` does. Prints the
promise check, the model versions answered before and after, and trigger→answer p50/p99 overall and
for the triggers sent within one second either side of the switch.

    python benchmarks/model_swap.py [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import ChaosSite  # noqa: E402
from tests.test_model_swap import bundle_copy, point  # noqa: E402 - the same bundles and switch as the test

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1, help="reader.workers of the agent")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="model-swap-"))
    models = workdir / "models"
    v1 = bundle_copy(models / "versions" / "1.0.0", "1.0.0")
    v2 = bundle_copy(models / "versions" / "1.1.0", "1.1.0")
    active = models / "active"
    point(active, v1)
    switched_at: list[float] = []

    def on_tick(elapsed: float) -> None:
        if not switched_at and elapsed >= args.seconds / 2:
            point(active, v2)
            switched_at.append(time.time())

    try:
        with ChaosSite(workdir / "site", agent_overrides={"model": {"bundle": str(active)}, "reader": {"workers": args.workers}}) as site:
            site.start_agent()
            site.wait_online()
            items = site.plc.steady(args.rate, args.seconds, on_tick=on_tick)
            site.settle(items, ack_timeout_s=30, answer_timeout_s=30)
            report = site.report("model-swap")
            sent, _acked = site.plc.snapshot()
            health = site.sorter.on_topic(site.topic("events") + "/health")
            last_health = json.loads(health[-1][1]) if health else {}
            first: dict[str, tuple[float, dict]] = {}
            for answer in site.sorter.answers():
                item = str(answer.payload.get("item_id"))
                first.setdefault(item, (answer.arrived_at, answer.payload))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    switch = switched_at[0]
    latency = {i: (first[i][0] - sent[i]) * 1000.0 for i in first if i in sent}
    near = [ms for i, ms in latency.items() if abs(sent[i] - switch) <= 1.0]
    versions = [first[i][1].get("model_version") for i in sorted(first, key=lambda i: sent.get(i, 0.0))]
    summary = {
        "promise_kept": report.promise_kept,
        "sent": report.sent, "answered": report.answered, "missing": len(report.missing),
        "two_answers": len(report.conflicting),
        "answers_v1": versions.count("1.0.0"), "answers_v2": versions.count("1.1.0"),
        "v1_after_first_v2": versions[versions.index("1.1.0"):].count("1.0.0") if "1.1.0" in versions else None,
        "latency_ms_all": {"p50": round(float(np.percentile(list(latency.values()), 50)), 1),
                           "p99": round(float(np.percentile(list(latency.values()), 99)), 1)},
        "latency_ms_within_1s_of_switch": {"n": len(near), "p50": round(float(np.percentile(near, 50)), 1),
                                           "p99": round(float(np.percentile(near, 99)), 1)},
    }
    print(report.render())
    print("agent stages (ms):", json.dumps(last_health.get("stages_ms")), "queue:", last_health.get("queue"))
    print(json.dumps(summary, indent=2))
    return 0 if report.promise_kept else 1


if __name__ == "__main__":
    sys.exit(main())
