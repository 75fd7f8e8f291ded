"""Section 7: the brief's own test ("500 predictions within 2 s") against its kind of server and the appliance.

The same 500 t10k digits go
  - to ``benchmarks/brief_server.py`` (Flask + Keras under waitress, a child process on
    loopback) in one POST, as the brief's ``api_test.py -n 500`` did: round trip timed,
    first request and warm ones;
  - through the appliance's int8 classifier in this process: one batch of 500, and 100
    batches of 5 (one per envelope, as the agent classifies);
  - onto 100 rendered 640x480 envelopes, 5 digits each in order, read by
    ``edge-agent predict`` in a child process (wall time, start-up included).
Time, accuracy and the prediction distribution of each; the distributions as a bar chart.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import psutil

from benchmarks.side_by_side.context import ROOT, Context
from benchmarks.side_by_side.plots import grouped_bars
from benchmarks.side_by_side.report import Section, Table, times
from benchmarks.side_by_side.site import _stop
from edge_agent.demo import free_port
from edge_agent.loader import load_bundle
from edge_agent.mnist import load_split
from edge_agent.render import fit_digit_height, random_conditions, render_postcode_frame

KEY = "brief"
TITLE = "7. The brief's test side by side: 500 digits"

DIGITS = 500
PER_ENVELOPE = 5


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    test = load_split(ctx.data_dir, "test")
    picks = np.sort(np.random.default_rng(7).choice(len(test), DIGITS, replace=False))
    images, labels = test.images[picks], test.labels[picks].astype(int)
    results: dict[str, dict] = {}

    server = _brief_server(ctx, images, labels)
    if server is not None:
        results["brief server (Flask + Keras), one POST of 500"] = server

    model = load_bundle(ctx.bundle, num_threads=1)
    model.classifier.classify(images[:PER_ENVELOPE])  # warm-up at both batch sizes
    model.classifier.classify(images)
    repeats = ctx.pick(3, 20)
    whole, per_envelope, whole_cpu, per_envelope_cpu = [], [], [], []
    for _ in range(repeats):
        cpu, started = time.process_time(), time.perf_counter()
        found = model.classifier.classify(images).labels
        whole.append(time.perf_counter() - started)
        whole_cpu.append(time.process_time() - cpu)
        cpu, started = time.process_time(), time.perf_counter()
        for i in range(0, DIGITS, PER_ENVELOPE):
            model.classifier.classify(images[i:i + PER_ENVELOPE])
        per_envelope.append(time.perf_counter() - started)
        per_envelope_cpu.append(time.process_time() - cpu)
    results["appliance int8, in process, one batch of 500"] = {
        "seconds": float(np.median(whole)), "cpu_seconds": float(np.median(whole_cpu)), "seconds_all": whole,
        "predictions": found.tolist()}
    results["appliance int8, in process, 100 batches of 5"] = {
        "seconds": float(np.median(per_envelope)), "cpu_seconds": float(np.median(per_envelope_cpu)),
        "seconds_all": per_envelope, "predictions": found.tolist()}

    envelopes = ctx.pick(10, DIGITS // PER_ENVELOPE)
    results[f"appliance `edge-agent predict`, {envelopes} envelopes"] = _predict_cli(ctx, images, labels, envelopes)

    rows = []
    reference = results.get("brief server (Flask + Keras), one POST of 500", {}).get("seconds")
    for name, r in results.items():
        predicted = np.asarray(r["predictions"])
        truth = labels[:len(predicted)]
        r["accuracy"] = float(np.mean(predicted == truth)) if len(predicted) else float("nan")
        r["distribution"] = np.bincount(predicted[predicted >= 0], minlength=10).tolist()
        rows.append([name, len(predicted), r["seconds"], r.get("cpu_seconds"), r["accuracy"],
                     times(reference / r["seconds"] if reference else None),
                     " ".join(str(c) for c in r["distribution"])])
    section.data.update({"digits": DIGITS, "truth_distribution": np.bincount(labels, minlength=10).tolist(),
                         "results": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                                     for k, v in results.items()}})
    rows.append(["truth (t10k labels)", DIGITS, None, None, None, "–",
                 " ".join(str(c) for c in section.data["truth_distribution"])])
    section.tables.append(Table(
        "Time for the digits (median of repeats; the server's is a warm request, its first request is below; "
        "CPU = the CPU time of the process doing the work: the server's, this process's, `edge-agent predict`'s), "
        "accuracy, and how many of each digit 0-9 were predicted",
        ["path", "digits", "wall s", "CPU s", "accuracy", "× faster than the brief server (wall)",
         "predicted 0 1 2 … 9"], rows))
    if server is not None:
        section.tables.append(Table(
            "The brief's server in detail", ["", "value"],
            [["launch -> ready (TensorFlow import, model load) s", server["startup_s"]],
             ["first request, 500 digits, s", server["first_s"]],
             ["warm requests, 500 digits, median s", server["seconds"]],
             ["request body MB", server["request_mb"]],
             ["server RSS after the requests, MB", server["rss_mb"]]]))
    cli = results[f"appliance `edge-agent predict`, {envelopes} envelopes"]
    section.tables.append(Table(
        f"`edge-agent predict` on {envelopes} envelopes ({envelopes * PER_ENVELOPE} digits)", ["", "value"],
        [["wall time, process start to exit, s", cli["seconds"]],
         ["postcodes read exactly", f"{cli['exact']}/{envelopes}"],
         ["accepted for automatic sorting", f"{cli['accepted']}/{envelopes}"],
         ["wrong among accepted", cli["accepted_wrong"]],
         ["digits read as 5 per envelope", f"{cli['five_digit_reads']}/{envelopes}"]]))
    chart = ctx.out_dir / f"{ctx.stem}-distribution.png"
    series = {"truth": section.data["truth_distribution"]}
    for name, r in results.items():
        if "one batch of 500" in name or "predict" in name or "brief" in name:
            series[name.split(",")[0] if "predict" not in name else "edge-agent predict"] = r["distribution"]
    grouped_bars(series, [str(d) for d in range(10)], chart,
                 f"Predictions per digit on the same {DIGITS} t10k digits ({ctx.stem})", "digits predicted")
    section.data["chart"] = str(chart)
    section.notes.append(f"Chart: `{chart.relative_to(ROOT) if chart.is_relative_to(ROOT) else chart}`. "
                         "The envelope reads count a digit as predicted in its position only when the reader "
                         "found five digits (otherwise it cannot be lined up with the truth).")
    return section


def _brief_server(ctx: Context, images: np.ndarray, labels: np.ndarray) -> dict | None:
    from benchmarks.side_by_side.footprint import _keras_model

    keras_model = _keras_model(ctx)
    if keras_model is None:
        return None
    port = free_port()
    log_path = ctx.out_dir / "logs" / "brief-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    launched = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen([ctx.python, str(ROOT / "benchmarks" / "brief_server.py"), "--model", keras_model,
                                   "--port", str(port)], cwd=ROOT, env=ctx.env(), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = launched + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"brief_server.py exited {server.returncode} (log: {log_path})")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"brief_server.py not ready in 180 s (log: {log_path})") from None
                time.sleep(0.1)
        startup = time.monotonic() - launched

        def post() -> tuple[float, dict, int]:
            started = time.perf_counter()
            body = json.dumps({"instances": images.tolist()}).encode()
            request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                payload = json.loads(answer.read())
            return time.perf_counter() - started, payload, len(body)

        first, payload, size = post()
        proc = psutil.Process(server.pid)
        before = proc.cpu_times()
        warm = [post()[0] for _ in range(ctx.pick(1, 10))]
        after = proc.cpu_times()
        server_cpu = (after.user + after.system - before.user - before.system) / len(warm)
        rss = proc.memory_info().rss / 2**20
    finally:
        _stop(server, 15)
    return {"seconds": float(np.median(warm)), "cpu_seconds": server_cpu, "seconds_all": warm, "first_s": first,
            "startup_s": startup,
            "request_mb": round(size / 1e6, 2), "rss_mb": round(rss, 1), "predictions": payload["predictions"]}


def _predict_cli(ctx: Context, images: np.ndarray, labels: np.ndarray, envelopes: int) -> dict:
    folder = ctx.work_dir / "brief-envelopes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(21)
    codes = []
    for e in range(envelopes):
        digits = images[e * PER_ENVELOPE:(e + 1) * PER_ENVELOPE]
        cond = fit_digit_height(random_conditions(rng), PER_ENVELOPE, (640, 480))
        frame = render_postcode_frame(list(digits), rng, (640, 480), **asdict(cond))
        cv2.imwrite(str(folder / f"envelope-{e:04d}.png"), frame)
        codes.append("".join(str(d) for d in labels[e * PER_ENVELOPE:(e + 1) * PER_ENVELOPE]))
    script = Path(ctx.python).with_name("edge-agent")
    cmd = [str(script)] if script.exists() else [ctx.python, "-m", "edge_agent.cli"]
    usage, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    done = subprocess.run(cmd + ["predict", str(folder), "--bundle", str(ctx.bundle)], cwd=ROOT, env=ctx.env(),
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    reads = {Path(r["source"]).name: r for r in map(json.loads, done.stdout.splitlines()) if r}
    predictions, exact, accepted, wrong, five = [], 0, 0, 0, 0
    for e, code in enumerate(codes):
        read = reads.get(f"envelope-{e:04d}.png", {})
        postcode = read.get("postcode", "")
        exact += postcode == code
        accepted += bool(read.get("accepted"))
        wrong += bool(read.get("accepted")) and postcode != code
        if len(postcode) == PER_ENVELOPE:
            five += 1
            predictions += [int(d) for d in postcode]
        else:
            predictions += [-1] * PER_ENVELOPE  # cannot be lined up with the truth: counted wrong
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "exit_status": done.returncode, "exact": exact,
            "accepted": accepted, "accepted_wrong": wrong, "five_digit_reads": five, "predictions": predictions}
