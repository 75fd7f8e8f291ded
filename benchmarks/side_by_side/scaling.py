"""Section 5: per-frame latency against digits per frame (1-10), and against agents sharing the 2 cores.

Digits: frames of 1 to 10 digits from t10k, read in this process on one core (locate,
classify as one batch, decide), lengths interleaved frame by frame. Agents: 1, 2 and 4
``edge-agent run`` processes on one broker, each with its own PLC sending sequential
triggers (a new frame each) at the same time; trigger -> result latency, all agents pooled.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import cv2
import numpy as np
import psutil

from benchmarks.side_by_side.context import Context
from benchmarks.side_by_side.reader_stages import encoded_frames, one_core
from benchmarks.side_by_side.report import Section, Table, times
from benchmarks.side_by_side.site import Site
from edge_agent.decision import decide
from edge_agent.loader import load_bundle
from edge_agent.reader import ReaderConfig, locate_digits

KEY = "scaling"
TITLE = "5. Scaling: digits per frame, and agents per machine"

LENGTHS = tuple(range(1, 11))
SPACING_S = 0.06  # between one PLC's triggers: longer than a frame at 20 fps, so each reads a new frame


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    _digits(ctx, section)
    _agents(ctx, section)
    return section


def _digits(ctx: Context, section: Section) -> None:
    per_length = ctx.pick(3, 40)
    frames = {k: encoded_frames(ctx, per_length, seed=100 + k, length=k) for k in LENGTHS}
    model = load_bundle(ctx.bundle, num_threads=1)
    threshold = model.manifest.acceptance_threshold
    configs = {k: ReaderConfig(expected_lengths=(k,)) for k in LENGTHS}
    stats = {k: {"locate": [], "classify": [], "decide": [], "cpu": [], "found": [], "exact": 0} for k in LENGTHS}
    clock = time.perf_counter
    with one_core():
        for i in range(per_length):  # lengths interleaved: load bursts spread over all of them
            for k in LENGTHS:
                _png, jpg, code = frames[k][i]
                image = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
                cpu, started = time.thread_time(), clock()
                located = locate_digits(image, configs[k])
                located_at = clock()
                result = model.classifier.classify(located.digits)
                classified_at = clock()
                decision = decide(result.labels, result.probabilities, (k,), threshold)
                done = clock()
                s = stats[k]
                s["cpu"].append(time.thread_time() - cpu)
                s["locate"].append(located_at - started)
                s["classify"].append(classified_at - located_at)
                s["decide"].append(done - classified_at)
                s["found"].append(len(located.digits))
                s["exact"] += decision.postcode == code
    rows, data = [], {}
    reference = None
    for k in LENGTHS:
        s = stats[k]
        total = np.add(np.add(s["locate"], s["classify"]), s["decide"])
        mean_ms = float(np.mean(total)) * 1000
        cpu_ms = float(np.mean(s["cpu"])) * 1000
        reference = reference or cpu_ms
        data[k] = {"frames": per_length, "locate_ms_mean": float(np.mean(s["locate"])) * 1000,
                   "classify_ms_mean": float(np.mean(s["classify"])) * 1000,
                   "frame_ms_mean": mean_ms, "frame_cpu_ms_mean": cpu_ms,
                   "frame_ms_p50": float(np.median(total)) * 1000,
                   "frame_ms_p99": float(np.percentile(total, 99)) * 1000,
                   "digits_found_mean": float(np.mean(s["found"])), "exact_reads": s["exact"]}
        rows.append([k, data[k]["digits_found_mean"], data[k]["locate_ms_mean"], data[k]["classify_ms_mean"],
                     cpu_ms, mean_ms, data[k]["frame_ms_p99"], times(cpu_ms / reference), f"{s['exact']}/{per_length}"])
    section.data["digits_per_frame"] = data
    section.tables.append(Table(
        f"Read per frame (locate + classify + decide; JPEG decode excluded) by postcode length, {per_length} "
        "frames each from t10k, one core",
        ["digits", "digits found (mean)", "locate ms", "classify ms", "frame CPU ms", "frame wall ms (mean)",
         "frame wall ms p99", "× 1 digit (CPU)", "exact reads"], rows))


def _agents(ctx: Context, section: Section) -> None:
    counts = ctx.pick((1, 2), (1, 2, 4))
    triggers = ctx.pick(6, 150)
    rows, data = [], {}
    reference = None
    site = Site(ctx, "scaling", fps=20.0)
    try:
        for n in counts:
            agents = [site.start_agent(f"scale{n}-{i}") for i in range(n)]
            plcs = [site.plc(agent.line) for agent in agents]
            if not all(plc.wait_online(90) for plc in plcs):
                raise RuntimeError(f"not all {n} agents came online (logs under {site.dir})")
            for plc in plcs:  # warm-up: interpreter buffers, first reads
                for i in range(ctx.pick(2, 5)):
                    # short: a trigger sent at "online" may be lost (see the footprint section)
                    plc.request(f"warm-{i}", timeout_s=3)
            latencies: list[float] = []
            reasons: Counter = Counter()
            lock = threading.Lock()

            def drive(plc, line: str) -> None:
                for i in range(triggers):
                    answer = plc.request(f"{line}-{i:04d}", timeout_s=10)
                    with lock:
                        if answer is None:
                            reasons["unanswered"] += 1
                        else:
                            latencies.append(answer[1])
                            reasons["accepted" if answer[0].get("accepted") else str(answer[0].get("reason"))] += 1
                    time.sleep(SPACING_S)

            psutil.cpu_percent()
            started = time.monotonic()
            threads = [threading.Thread(target=drive, args=(plc, agent.line)) for plc, agent in zip(plcs, agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            machine_cpu = psutil.cpu_percent()
            p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
            reference = reference or p50
            rss = [a.stats()["rss_mb"] for a in agents]
            data[n] = {"triggers_per_agent": triggers, "answered": len(latencies), "p50_ms": p50, "p99_ms": p99,
                       "mean_ms": float(np.mean(latencies)), "reads_per_s_all_agents": len(latencies) / elapsed,
                       "machine_cpu_percent": machine_cpu, "reasons": dict(reasons), "agent_rss_mb": rss}
            rows.append([n, n * triggers, len(latencies), p50, p99, times(p50 / reference),
                         len(latencies) / elapsed, f"{machine_cpu:.0f}%", sum(rss),
                         ", ".join(f"{k} {v}" for k, v in reasons.most_common())])
            site.stop_agents()
    finally:
        site.close()
    section.data["agents"] = data
    section.tables.append(Table(
        f"Agents on this machine ({ctx.machine.get('cores_usable', '?')} cores, {site.broker_name}), each with a "
        f"20 fps folder camera and its own PLC sending {triggers} sequential triggers {SPACING_S * 1000:.0f} ms "
        "apart, all at once; trigger -> result",
        ["agents", "triggers", "answered", "p50 ms", "p99 ms", "p50 × 1 agent", "reads/s (all)",
         "machine CPU", "agents' RSS MB", "outcomes"], rows))
