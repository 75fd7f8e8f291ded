"""Compare model bundles on MNIST t10k: accuracy, confident errors, coverage, calibration, size and speed.

    python benchmarks/model_candidates.py [NAME=]BUNDLE ... [--repeats 2000] [--json out.json]

For each bundle: t10k accuracy; confident errors per 10,000 digits (wrong digits whose
probability, as the loader returns it, is at or above the bundle's own acceptance threshold,
which was chosen on validation only) and the coverage at that threshold; top-label ECE
(15 bins) of the plain softmax (T = 1) and of the bundle's calibrated probabilities; the
model file size; and digits/s through ``Int8Classifier.classify`` (LiteRT, XNNPACK, one
thread) at batch 1 and batch 5, from the median of ``--repeats`` timed calls, the candidates
taking turns. t10k is the held-out test set: this reports, it never chooses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from edge_agent.bundle import MODEL_FILE  # noqa: E402
from edge_agent.loader import load_bundle, softmax  # noqa: E402
from edge_agent.mnist import load_split, locate_data_dir  # noqa: E402
from quantize.calibration import expected_calibration_error  # noqa: E402 - pure NumPy, no TensorFlow


def cpu_description() -> str:
    """The CPU model and the vector extensions that matter to int8 kernels."""
    name, flags, details = platform.processor() or "unknown CPU", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            elif key.strip() in ("cpu family", "model") and key.strip() not in details:
                details[key.strip()] = value.strip()
    except OSError:
        pass
    has = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    missing = [f for f in ("avx512f", "avx512_vnni", "avx_vnni") if f not in flags]
    family = f" (family {details['cpu family']}, model {details['model']})" if len(details) == 2 else ""
    return (f"{name}{family}; {os.cpu_count()} cores visible; has {', '.join(has) or 'no AVX2'}"
            f"{'; lacks ' + ', '.join(missing) if missing else ''}")


def timed_calls(classifier, sample: np.ndarray, calls: int) -> list[float]:
    """Wall time of ``calls`` classify() calls on the same digits, in seconds."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        classifier.classify(sample)
        times.append(time.perf_counter() - started)
    return times


def measure_speed(classifiers: list, digits: np.ndarray, repeats: int, rounds: int = 20) -> list[list[dict]]:
    """Per classifier, batch 1 and batch 5: median and p99 ms per call and the digits/s of the median.

    The candidates take turns in ``rounds`` short blocks, so that load from other jobs on a shared
    machine falls on all of them alike instead of on whichever ran during a busy minute.
    """
    batches = (1, 5)
    times = [[[] for _ in batches] for _ in classifiers]
    for classifier in classifiers:
        for batch in batches:
            timed_calls(classifier, digits[:batch], 20)  # warm-up: resize and XNNPACK's first-run packing
    per_round = max(repeats // rounds, 1)
    for _ in range(rounds):
        for i, classifier in enumerate(classifiers):
            for j, batch in enumerate(batches):
                # The batch size alternates, so every block pays the resize as the agent's would not:
                # one call of each block is left out.
                times[i][j].extend(timed_calls(classifier, digits[:batch], per_round + 1)[1:])
    result = []
    for per_classifier in times:
        rows = []
        for batch, samples in zip(batches, per_classifier):
            samples = np.array(samples)
            median = float(np.median(samples))
            rows.append({"batch": batch, "median_ms": round(median * 1e3, 4),
                         "p10_ms": round(float(np.percentile(samples, 10)) * 1e3, 4),
                         "p99_ms": round(float(np.percentile(samples, 99)) * 1e3, 4),
                         "digits_per_s": round(batch / median)})
        result.append(rows)
    return result


def errors_in_most_confident(confidence: np.ndarray, correct: np.ndarray, share: float) -> int:
    """Wrong digits among the ``share`` most confident ones (stable order on ties)."""
    keep = np.argsort(-confidence, kind="stable")[:int(round(share * len(confidence)))]
    return int(np.sum(~correct[keep]))


def evaluate(name: str, model, test) -> dict:
    bundle = model.directory
    manifest, classifier = model.manifest, model.classifier
    logits = np.concatenate([classifier.outputs(test.images[i:i + 1000]) for i in range(0, len(test), 1000)])
    plain = softmax(logits)  # T = 1
    calibrated = np.concatenate([classifier.classify(test.images[i:i + 1000]).probabilities
                                 for i in range(0, len(test), 1000)])
    labels = calibrated.argmax(axis=1)
    correct = labels == test.labels
    confidence = calibrated.max(axis=1)
    accepted = confidence >= manifest.acceptance_threshold
    per_10k = 10_000 / len(test)
    return {
        "name": name,
        "bundle": str(bundle),
        "version": manifest.version,
        "model": manifest.raw.get("model", {"architecture": "mnist_cnn", "members": 1}),
        "accuracy": round(float(correct.mean()), 5),
        "temperature": manifest.temperature,
        "threshold": manifest.acceptance_threshold,
        "validation_coverage": manifest.raw.get("threshold_selection", {}).get("validation_coverage"),
        "confident_errors": int(np.sum(accepted & ~correct)),
        "confident_errors_per_10k": round(float(np.sum(accepted & ~correct)) * per_10k, 2),
        "coverage": round(float(accepted.mean()), 5),
        "ece_t1": round(expected_calibration_error(plain.max(axis=1), plain.argmax(axis=1) == test.labels), 5),
        "ece_calibrated": round(expected_calibration_error(confidence, correct), 5),
        "wrong_digits_at_or_above_0.99": int(np.sum((confidence >= 0.99) & ~correct)),
        # Coverage differs between thresholds; errors among the same share of most confident
        # digits compares the ranking itself (reporting only: nothing is chosen on it).
        "errors_in_most_confident_90pct": errors_in_most_confident(confidence, correct, 0.90),
        "errors_in_most_confident_95pct": errors_in_most_confident(confidence, correct, 0.95),
        "size_bytes": (bundle / MODEL_FILE).stat().st_size,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| candidate | version | t10k accuracy | confident errors / 10k | coverage at threshold "
             "| threshold | errors in most confident 90% / 95% | ECE T=1 | ECE calibrated (T) | size "
             "| digits/s batch 1 | digits/s batch 5 | ms per 5 digits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one, five = r["speed"]
        lines.append(
            f"| {r['name']} | {r['version']} | {r['accuracy']:.2%} | {r['confident_errors_per_10k']:g} "
            f"| {r['coverage']:.2%} | {r['threshold']:.4f} "
            f"| {r['errors_in_most_confident_90pct']} / {r['errors_in_most_confident_95pct']} | {r['ece_t1']:.4f} "
            f"| {r['ece_calibrated']:.4f} ({r['temperature']:.3f}) | {r['size_bytes'] / 1024:.0f} KiB "
            f"| {one['digits_per_s']:,} | {five['digits_per_s']:,} | {five['median_ms']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", help="bundle folders, optionally NAME=FOLDER")
    parser.add_argument("--data", type=Path, help="folder with the MNIST t10k files")
    parser.add_argument("--repeats", type=int, default=2000, help="timed calls per batch size")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    directory = locate_data_dir(args.data)
    if directory is None:
        print("no MNIST data: pass --data DIR or set $MNIST_DIR", file=sys.stderr)
        return 2
    test = load_split(directory, "test")
    rows, models = [], []
    for spec in args.bundles:
        name, _, path = spec.rpartition("=")
        models.append(load_bundle(Path(path), num_threads=1))
        rows.append(evaluate(name or Path(path).name, models[-1], test))
    for row, speeds in zip(rows, measure_speed([m.classifier for m in models], test.images, args.repeats)):
        row["speed"] = speeds
    cpu = cpu_description()
    load = os.getloadavg()
    print(f"CPU: {cpu}; load average during the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"t10k: {len(test)} digits; speed: LiteRT, XNNPACK, 1 thread, median of {args.repeats} calls "
          "per batch size, candidates taking turns")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "load_average": load, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
