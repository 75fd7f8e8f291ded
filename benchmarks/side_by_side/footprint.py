"""Section 6: what an agent costs the box: cold start, idle CPU, memory; and a process holding the Keras model.

One agent (``edge-agent run``, demo config, 30 fps folder camera) on a fresh broker: the PLC is
listening before the launch, so launch -> online -> first result is timed from the outside.
Then the agent idles (camera on, no triggers) while its CPU time is sampled; then it reads
a series of envelopes and its memory is taken. For comparison, a child process loads the
Keras model and predicts 500 digits, then reports its own memory.
"""

from __future__ import annotations

import time

import psutil

from benchmarks.side_by_side.context import Context
from benchmarks.side_by_side.report import Section, Table
from benchmarks.side_by_side.site import Site

KEY = "footprint"
TITLE = "6. Footprint: cold start, idle CPU, memory"

KERAS_PROCESS = """
import sys, time, numpy as np, psutil
started = time.monotonic()
import keras
from edge_agent.mnist import load_split
from benchmarks.side_by_side.context import emit
model = keras.models.load_model(sys.argv[1])
loaded = time.monotonic()
x = load_split(sys.argv[2], "test").images[:500].astype(np.float32)[..., None] / 255.0
model.predict(x, verbose=0)
info = psutil.Process().memory_full_info()
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
emit({"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1),
      "peak_rss_mb": round(peak[0] / 1024, 1) if peak else None,
      "import_and_load_s": round(loaded - started, 2), "threads": psutil.Process().num_threads()})
"""


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    idle_s = ctx.pick(3.0, 10.0)
    triggers = ctx.pick(10, 100)
    site = Site(ctx, "footprint", fps=30.0)
    try:
        plc = site.plc("line-1")  # listening before the agent exists
        agent = site.start_agent("line-1")
        if not plc.wait_online(90):
            raise RuntimeError(f"the agent did not come online in 90 s (log: {agent.config.parent / 'agent.log'})")
        online = time.monotonic()
        # A trigger sent the moment "online" appears can be lost: the agent publishes its status
        # before its trigger subscription is in place (edge_agent/mqtt.py, _on_connect). Counted,
        # then the PLC tries again, so the rest of the section still measures.
        lost, first = 0, None
        while first is None and lost < 3:
            first = plc.request(f"cold-{lost}", timeout_s=5)
            lost += first is None
        if first is None:
            raise RuntimeError(f"no answer to 3 triggers after online (log: {agent.config.parent / 'agent.log'})")
        first_at = time.monotonic()
        read, attempts, read_at = first, 1, first_at
        while read is not None and read[0].get("reason") == "no_frame" and attempts < 10:  # no camera frame yet
            read = plc.request(f"cold-read-{attempts}", timeout_s=5)
            attempts += 1
            read_at = time.monotonic()
        cold = {"launch_to_online_s": online - agent.launched_at,
                "first_triggers_lost": lost,
                "launch_to_first_result_s": first_at - agent.launched_at,
                "launch_to_online_plus_first_answer_s": online - agent.launched_at + first[1] / 1000,
                "first_result_reason": first[0].get("reason"), "first_result_latency_ms": first[1],
                "launch_to_first_read_s": read_at - agent.launched_at, "triggers_until_read": attempts}

        time.sleep(ctx.pick(1.0, 3.0))  # let start-up work (first frames, status) settle
        proc = psutil.Process(agent.process.pid)
        before, machine_before = proc.cpu_times(), psutil.cpu_times()
        started = time.monotonic()
        time.sleep(idle_s)
        after, machine_after = proc.cpu_times(), psutil.cpu_times()
        wall = time.monotonic() - started
        agent_cpu = (after.user + after.system - before.user - before.system) / wall * 100
        machine_busy = sum(machine_after) - machine_after.idle - (sum(machine_before) - machine_before.idle)
        machine_cpu = machine_busy / (sum(machine_after) - sum(machine_before)) * 100
        idle = {"seconds": round(wall, 1), "agent_cpu_percent_of_one_core": agent_cpu,
                "machine_cpu_percent_all_cores": machine_cpu, "camera_fps": site.fps}

        for i in range(triggers):
            plc.request(f"warm-{i:04d}", timeout_s=10)
            time.sleep(0.04)
        memory = agent.stats()
    finally:
        site.close()

    keras = None
    keras_model = None if ctx.quick else _keras_model(ctx)  # quick: its start-up costs ~10 s; the full run has it
    if keras_model:
        keras = ctx.run_child(["-c", KERAS_PROCESS, keras_model, str(ctx.data_dir)], "footprint-keras",
                              timeout_s=ctx.pick(120, 300))
    section.data.update({"cold_start": cold, "idle": idle, "agent_memory": memory, "keras_process": keras,
                         "triggers_before_memory": triggers})
    section.tables.append(Table(
        "Cold start: `edge-agent run` launched with the PLC already listening on a fresh Mosquitto",
        ["", "seconds"],
        [["launch -> status online", cold["launch_to_online_s"]],
         [f"launch -> online + the first answered trigger's round trip (reason: "
          f"{cold['first_result_reason'] or 'read'})", cold["launch_to_online_plus_first_answer_s"]],
         [f"launch -> first result, as the PLC saw it ({lost} trigger(s) sent at 'online' lost, 5 s each)",
          cold["launch_to_first_result_s"]],
         [f"launch -> first read of a camera frame ({attempts} trigger(s))", cold["launch_to_first_read_s"]]]))
    if lost:
        section.notes.append(f"{lost} trigger(s) sent the moment the agent's status said online got no answer: the "
                             "agent publishes \"online\" before its trigger subscription is in place "
                             "(edge_agent/mqtt.py, `_on_connect`), so the broker drops a trigger that arrives "
                             "in between.")
    section.tables.append(Table(
        f"Idle: camera at {site.fps:g} fps, no triggers, over {idle['seconds']} s",
        ["", "CPU"],
        [["agent (one core = 100%)", f"{agent_cpu:.1f}%"],
         ["whole machine, all jobs (all cores = 100%)", f"{machine_cpu:.0f}%"]]))
    rows = [["agent after start-up and " + f"{triggers} reads", memory["rss_mb"], memory["uss_mb"],
             memory["peak_rss_mb"], memory["threads"]]]
    if keras:
        rows.append(["Python process holding the Keras model (TensorFlow), after predicting 500 digits",
                     keras["rss_mb"], keras["uss_mb"], keras["peak_rss_mb"], keras["threads"]])
    section.tables.append(Table("Memory", ["process", "RSS MB", "USS MB", "peak RSS MB", "threads"], rows))
    if ctx.quick:
        section.notes.append("Quick mode: the process holding the Keras model is measured in the full run only "
                             "(section 7 reports the brief server's memory).")
    if keras:
        section.notes.append(f"The Keras process took {keras['import_and_load_s']:.1f} s to import TensorFlow and "
                             "load the model; the brief's server (section 7) adds Flask and waitress to that.")
    return section


def _keras_model(ctx: Context) -> str | None:
    classifier = ctx.results.get("classifier")
    if classifier is not None and classifier.data.get("keras_model"):
        return classifier.data["keras_model"]
    from benchmarks.side_by_side.classifier import choose_keras_model

    path, _provenance, training = choose_keras_model(ctx)
    return None if training else str(path)
