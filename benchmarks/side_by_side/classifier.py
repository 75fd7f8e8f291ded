"""Section 1: the same t10k digits through the int8 bundle, float32 TFLite and Keras, side by side.

The parent (``run``) finds or trains the Keras model and converts it to float32 TFLite in a
child, then starts one measuring child per thread count: TensorFlow fixes its thread pools
when it starts, so a Keras row at 1 thread and one at 2 threads need separate processes.
Within a child every variant is timed in interleaved rounds on the same digits.

    python -m benchmarks.side_by_side.classifier prepare --keras K --float F [--train-quick]
    python -m benchmarks.side_by_side.classifier measure --threads 1 --keras K --float F ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.side_by_side.context import JSON_MARK, ROOT, Context, emit
from benchmarks.side_by_side.report import Section, Table, ratio, times
from edge_agent.bundle import MODEL_FILE

KEY = "classifier"
TITLE = "1. Classifier side by side: int8 LiteRT, float32 TFLite, Keras"

BATCHES = (1, 5, 64)
# Variant name -> what the report calls it. "int8" is the appliance's own path (load_bundle,
# classify: quantise check, invoke, dequantise, softmax); the others are what it is compared with.
LABELS = {
    "int8": "int8 LiteRT bundle (classify)",
    "float32_tflite": "float32 TFLite (XNNPACK)",
    "keras_predict": "Keras model.predict(x)",
    "keras_direct": "Keras model(x)",
    "int8_invoke": "int8 invoke only (XNNPACK)",
    "int8_builtin": "int8 builtin kernels (no XNNPACK)",
    "float32_builtin": "float32 builtin kernels (no XNNPACK)",
}
MAIN_VARIANTS = ("int8", "float32_tflite", "keras_predict", "keras_direct")
KERNEL_VARIANTS = ("int8_invoke", "int8_builtin", "float32_builtin")

SHIPPED_TRAIN_DIR = ROOT / "build" / "train"  # where scripts/model.sh (edge-train) writes model.keras


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def choose_keras_model(ctx: Context) -> tuple[Path, str, dict | None]:
    """(path, where it comes from, training settings if it must be trained first)."""
    if ctx.keras_model is not None:
        return ctx.keras_model, f"given: {ctx.keras_model}", None
    shipped = SHIPPED_TRAIN_DIR / "model.keras"
    if shipped.exists():
        try:
            metrics = json.loads((SHIPPED_TRAIN_DIR / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        if metrics.get("model", "mnist_cnn") == "mnist_cnn":
            return shipped, f"scripts/model.sh's training output ({_shown(shipped)}, " \
                            f"{metrics.get('epochs_run', '?')} epochs)", None
    models = ctx.cache_dir / "models"
    full = {"dir": str(models / "keras-full"), "epochs": 6, "elastic_copies": 2, "limit": None,
            "validation_per_class": 100}
    quick = {"dir": str(models / "keras-quick"), "epochs": 1, "elastic_copies": 0, "limit": 1500,
             "validation_per_class": 20}
    for settings in (full, quick) if ctx.quick else (full,):
        path = Path(settings["dir"]) / "model.keras"
        if path.exists():
            return path, _trained_here(settings), None
    settings = quick if ctx.quick else full
    return Path(settings["dir"]) / "model.keras", _trained_here(settings), settings


def _trained_here(settings: dict) -> str:
    images = f"{settings['limit']} of the 5k training images" if settings["limit"] else "the 5k training set"
    return (f"trained by the benchmark with training/ (reference CNN, {settings['epochs']} epoch(s) on {images}, "
            f"{settings['elastic_copies']} elastic copies; cached in {_shown(Path(settings['dir']))}): "
            "the bundle's architecture, not its weights")


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    keras_path, provenance, training = choose_keras_model(ctx)
    float_path = None if training else ctx.cache_dir / "models" / f"float32-{_sha12(keras_path)}.tflite"
    if training or not float_path.exists():
        step = "training first" if training else "converting"
        ctx.log(f"classifier: preparing the Keras and float32 TFLite models ({step})")
        args = ["-m", "benchmarks.side_by_side.classifier", "prepare", "--keras", str(keras_path),
                "--models-dir", str(ctx.cache_dir / "models"), "--data", str(ctx.data_dir)]
        if training:
            args += ["--train", json.dumps(training)]
        prepared = ctx.run_child(args, "classifier-prepare", timeout_s=ctx.pick(240, 900))
        float_path = Path(prepared["float"])
        section.data["prepare"] = prepared
    # Quick mode checks the harness: one thread count (each costs a TensorFlow start-up).
    threads_list = ctx.pick((1,), (1, 2))
    budget = ctx.pick(0.25, 4.0)
    accuracy_digits = ctx.pick(256, 10_000)
    per_threads = {}
    for threads in threads_list:
        ctx.log(f"classifier: measuring at {threads} thread(s)")
        args = ["-m", "benchmarks.side_by_side.classifier", "measure", "--threads", str(threads),
                "--keras", str(keras_path), "--float", str(float_path), "--bundle", str(ctx.bundle),
                "--data", str(ctx.data_dir), "--budget", str(budget), "--rounds", str(ctx.pick(2, 5))]
        if threads == 1:  # accuracy and the kernel comparison do not depend on the thread count
            args += ["--accuracy-digits", str(accuracy_digits), "--kernels"]
        per_threads[threads] = ctx.run_child(args, f"classifier-{threads}t", timeout_s=ctx.pick(180, 900))
    section.data.update({"keras_model": str(keras_path), "keras_provenance": provenance,
                         "float_tflite": str(float_path), "budget_s_per_variant": budget,
                         "by_threads": {str(k): v for k, v in per_threads.items()}})
    _tables(section, per_threads, provenance)
    profiles = {"int8": hot_kernels(ctx, ctx.bundle / MODEL_FILE, "int8"),
                "float32": hot_kernels(ctx, float_path, "float32")}
    section.data["hot_kernels"] = profiles
    if all(isinstance(p, dict) for p in profiles.values()):
        section.tables.append(Table(
            "Where the CPU time goes (perf samples of a process invoking the model at batch 64 on one thread, "
            "taken after its warm-up; functions above 1%)", ["model", "share of samples", "library", "function"],
            [[model, f"{hit['percent']:.1f}%", hit["library"], f"`{hit['symbol']}`"]
             for model, profile in profiles.items() for hit in profile["hits"]]))
    else:
        why = next(p for p in profiles.values() if isinstance(p, str))
        section.notes.append(f"No kernel profile: {why}.")
    return section


_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+?)\s*(?:-\s+-\s*)?$")


def hot_kernels(ctx: Context, model_path: Path, kind: str) -> dict | str:
    """Where a process invoking the model spends its CPU (perf, attached after the warm-up), or why not known.

    Returns {"hits": [{percent, library, symbol}], "digits_per_cpu_s": the same process's rate}.
    """
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed"
    seconds = ctx.pick(1.5, 4.0)
    data = ctx.work_dir / f"perf-{kind}.data"
    spinner = subprocess.Popen([ctx.python, "-m", "benchmarks.side_by_side.classifier", "spin", "--model",
                                str(model_path), "--kind", kind, "--seconds", str(seconds + 1.0)],
                               cwd=ROOT, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if spinner.stdout.readline().strip() != SPIN_READY:
            return "the model-invoking process did not start"
        # Only the invoke loop is sampled: imports and interpreter set-up happen before READY.
        subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-p", str(spinner.pid), "-o", str(data), "--",
                        "sleep", str(seconds)], check=True, capture_output=True, timeout=120)
        report = subprocess.run([perf, "report", "-i", str(data), "--stdio", "-q", "--sort", "dso,symbol",
                                 "--percent-limit", "1"], check=True, capture_output=True, text=True, timeout=120)
        rest = spinner.communicate(timeout=60)[0]
    except (OSError, subprocess.SubprocessError) as exc:
        spinner.kill()
        spinner.wait()
        return f"perf failed ({exc}); kernel.perf_event_paranoid may forbid it"
    hits = []
    for line in report.stdout.splitlines():
        match = _PERF_LINE.match(line)
        if match:
            hits.append({"percent": float(match.group(1)), "library": match.group(2), "symbol": match.group(3)})
    found = [line[len(JSON_MARK):] for line in rest.splitlines() if line.startswith(JSON_MARK)]
    if not hits or not found:
        return "perf recorded no samples"
    return {"hits": hits, **json.loads(found[-1])}


SPIN_READY = "READY"


def spin(args: argparse.Namespace) -> dict:
    """Invoke a model on random 28x28 digits at batch 64 for a while: the process perf samples."""
    from benchmarks.side_by_side.tflite import FloatRunner, Int8Runner

    runner = (Int8Runner if args.kind == "int8" else FloatRunner)(Path(args.model), 1)
    digits = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    for _ in range(5):
        runner.labels(digits)
    print(SPIN_READY, flush=True)
    calls, cpu, deadline = 0, time.process_time(), time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        runner.labels(digits)
        calls += 1
    cpu = time.process_time() - cpu
    return {"calls": calls, "cpu_s": round(cpu, 3), "digits_per_cpu_s": round(64 * calls / cpu, 1)}


def _tables(section: Section, per_threads: dict[int, dict], provenance: str) -> None:
    speed = Table("Digits per second of wall time and per CPU-second of the process (all its threads; what "
                  "other jobs took is not in it); per-call wall latency; × int8 = this row's rate ÷ the int8 "
                  "bundle's at the same batch and thread count",
                  ["threads", "batch", "variant", "digits/s", "digits/CPU-s", "p50 ms/call", "p99 ms/call",
                   "× int8 (wall)", "× int8 (CPU)"], [])
    for threads, result in per_threads.items():
        for row in result["rows"]:
            reference = row["variants"]["int8"]
            for name, timed in row["variants"].items():
                speed.rows.append([threads, row["batch"], LABELS[name], timed["per_second"], timed["per_cpu_second"],
                                   timed["p50_ms"], timed["p99_ms"],
                                   times(ratio(timed["per_second"], reference["per_second"])),
                                   times(ratio(timed["per_cpu_second"], reference["per_cpu_second"]))])
    first = per_threads[min(per_threads)]
    accuracy = first.get("accuracy", {})
    sizes = first["sizes"]
    models = Table(f"Accuracy on {accuracy.get('digits', 0):,} t10k digits and file size",
                   ["variant", "accuracy", "file", "MB"], [])
    for name in MAIN_VARIANTS:
        file_key = {"int8": "int8", "float32_tflite": "float32_tflite"}.get(name, "keras")
        models.rows.append([LABELS[name], accuracy.get(name), sizes[file_key]["file"], sizes[file_key]["mb"]])
    plan = Table("Which kernels run (execution plan after LiteRT applies its default XNNPACK delegate)",
                 ["model", "ops", "on XNNPACK", "on builtin kernels"], [])
    for model, ops in first["execution_plan"].items():
        on = [o["op"] for o in ops if o["runs_on"] == "XNNPACK"]
        off = [o["op"] for o in ops if o["runs_on"] != "XNNPACK"]
        plan.rows.append([model, len(ops), ", ".join(on) or "none", ", ".join(off) or "none"])
    section.tables += [speed, models, plan]
    section.notes.append(f"Keras model: {provenance}. The float32 TFLite file is that model converted with "
                         "`tf.lite.TFLiteConverter` (no quantisation, the same logits graph as the int8 export). "
                         "`model.predict` uses Keras's default batch_size of 32, as the brief's server did.")


# ---- children ------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict:
    """Train the Keras model if asked, then convert it to float32 TFLite (cached by the model's hash)."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    keras_path = Path(args.keras)
    result: dict = {"keras": str(keras_path)}
    if args.train:
        from training.train import TrainConfig, train

        settings = json.loads(args.train)
        started = time.monotonic()
        metrics = train(TrainConfig(out_dir=Path(settings["dir"]), data_dir=Path(args.data),
                                    epochs=settings["epochs"], elastic_copies=settings["elastic_copies"],
                                    limit=settings["limit"], validation_per_class=settings["validation_per_class"]))
        result["trained"] = {"seconds": round(time.monotonic() - started, 1), "epochs": metrics["epochs_run"],
                             "train_images": metrics["train_images"],
                             "validation_accuracy": metrics["validation"]["accuracy"]}
    float_path = Path(args.models_dir) / f"float32-{_sha12(keras_path)}.tflite"
    started = time.monotonic()
    float_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = float_path.with_suffix(".tmp")
    tmp.write_bytes(convert_to_float32(keras_path))
    tmp.replace(float_path)
    result.update(float=str(float_path), convert_seconds=round(time.monotonic() - started, 1))
    return result


def convert_to_float32(keras_path: Path) -> bytes:
    """The Keras model as float32 TFLite: the int8 export's graph (logits, static reshape), no quantisation."""
    import tempfile

    import keras
    import tensorflow as tf

    from quantize.convert import forward_with_static_flatten

    model = keras.models.load_model(keras_path)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", forward_with_static_flatten(model),
                         input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="digit")])
    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive.write_out(saved_model_dir, verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(saved_model_dir).convert()


def measure(args: argparse.Namespace) -> dict:
    """Time every variant at each batch size with ``args.threads`` threads; accuracy and kernels if asked."""
    threads = args.threads
    import tensorflow as tf

    # Before TensorFlow's first op: its pools are fixed from then on.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras
    import psutil

    from benchmarks.side_by_side.tflite import FloatRunner, Int8Runner, execution_plan
    from benchmarks.side_by_side.timing import interleaved
    from edge_agent.loader import load_bundle
    from edge_agent.mnist import load_split

    test = load_split(Path(args.data), "test")
    bundle = load_bundle(Path(args.bundle), num_threads=threads)
    float_runner = FloatRunner(Path(args.float), threads)
    model = keras.models.load_model(args.keras)

    def as_float(digits: np.ndarray) -> np.ndarray:
        return (digits.astype(np.float32) / np.float32(255.0)).reshape(len(digits), 28, 28, 1)

    extra = {}
    if args.kernels:
        extra = {"int8_invoke": Int8Runner(Path(args.bundle) / MODEL_FILE, threads),
                 "int8_builtin": Int8Runner(Path(args.bundle) / MODEL_FILE, threads, xnnpack=False),
                 "float32_builtin": FloatRunner(Path(args.float), threads, xnnpack=False)}
    rows = []
    for batch in BATCHES:
        digits = np.ascontiguousarray(test.images[:batch])
        variants = {
            "int8": (lambda d=digits: bundle.classifier.classify(d), batch),
            "float32_tflite": (lambda d=digits: float_runner.labels(d), batch),
            "keras_predict": (lambda d=digits: model.predict(as_float(d), verbose=0).argmax(axis=1), batch),
            "keras_direct": (lambda d=digits: np.asarray(model(as_float(d), training=False)).argmax(axis=1), batch),
        }
        for name, runner in extra.items():
            variants[name] = (lambda d=digits, r=runner: r.labels(d), batch)
        timed = interleaved(variants, args.budget, rounds=args.rounds, min_calls=args.rounds,
                            warmup_s=min(0.3, args.budget / 4))
        rows.append({"batch": batch, "threads": threads,
                     "variants": {name: t.summary() for name, t in timed.items()}})
        print(f"batch {batch}: " + ", ".join(f"{n} {t.per_second():.0f}/s" for n, t in timed.items()),
              file=sys.stderr, flush=True)
    result: dict = {"threads": threads, "rows": rows}
    if args.accuracy_digits:
        result["accuracy"] = accuracy(test.images[:args.accuracy_digits], test.labels[:args.accuracy_digits],
                                      bundle, float_runner, model, as_float)
    keras_file = Path(args.keras)
    float_file = Path(args.float)
    int8_file = Path(args.bundle) / MODEL_FILE
    result["sizes"] = {key: {"file": _shown(path),
                             "mb": round(path.stat().st_size / 1e6, 3)}
                       for key, path in (("int8", int8_file), ("float32_tflite", float_file), ("keras", keras_file))}
    result["execution_plan"] = {
        "int8 (models/mnist-int8)": execution_plan(Int8Runner(int8_file, threads).interpreter),
        "float32 TFLite": execution_plan(float_runner.interpreter),
    }
    result["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    return result


def accuracy(images: np.ndarray, labels: np.ndarray, bundle, float_runner, model, as_float) -> dict:
    """Top-1 accuracy of each variant on the same digits (batches of 64)."""
    chunks = [slice(i, i + 64) for i in range(0, len(images), 64)]
    int8 = np.concatenate([bundle.classifier.classify(images[c]).labels for c in chunks])
    flt = np.concatenate([float_runner.labels(images[c]) for c in chunks])
    predicted = model.predict(as_float(images), batch_size=64, verbose=0).argmax(axis=1)
    direct = np.concatenate([np.asarray(model(as_float(images[c]), training=False)).argmax(axis=1) for c in chunks])
    out = {"digits": int(len(images))}
    for name, found in (("int8", int8), ("float32_tflite", flt), ("keras_predict", predicted),
                        ("keras_direct", direct)):
        out[name] = round(float(np.mean(found == labels)), 5)
    out["int8_vs_float_disagreements"] = int(np.sum(int8 != flt))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="classifier", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--keras", required=True)
    prep.add_argument("--models-dir", required=True)
    prep.add_argument("--data", required=True)
    prep.add_argument("--train", help="JSON training settings; train before converting")
    meas = sub.add_parser("measure")
    meas.add_argument("--threads", type=int, required=True)
    meas.add_argument("--keras", required=True)
    meas.add_argument("--float", required=True)
    meas.add_argument("--bundle", required=True)
    meas.add_argument("--data", required=True)
    meas.add_argument("--budget", type=float, default=4.0, help="seconds per variant and batch size")
    meas.add_argument("--rounds", type=int, default=5, help="interleaved rounds (and the least calls per variant)")
    meas.add_argument("--accuracy-digits", type=int, default=0)
    meas.add_argument("--kernels", action="store_true", help="also time builtin kernels and the bare invoke")
    loop = sub.add_parser("spin")
    loop.add_argument("--model", required=True)
    loop.add_argument("--kind", choices=("int8", "float32"), required=True)
    loop.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    emit({"prepare": prepare, "measure": measure, "spin": spin}[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
