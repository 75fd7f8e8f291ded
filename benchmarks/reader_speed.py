"""Per-stage time of one frame's read, before and after, side by side in one run.

    python benchmarks/reader_speed.py [--frames 200] [--rounds 3] [--baseline REF] [--json]

Frames are rendered 640x480 envelopes from the bundled training digits (never t10k), each
kept as PNG and as JPEG (quality 90) bytes, as a folder camera or an MJPEG stream delivers
them. Stages: decode (PNG, JPEG; colour and straight to grey), hash (the decoded pixels, the
encoded bytes), locate (``locate_digits``), classify (one LiteRT invoke), decide, and the
frame's input quality (drift). ``--baseline REF`` loads ``edge_agent/reader.py`` as it was at
that git commit and times its ``locate_digits`` on the same frames, interleaved with today's,
so a noisy shared machine slows both alike; ratios are what to compare, not absolute ms.
Times are this process's CPU time (``time.process_time``) with one OpenCV thread, as for an
agent pinned to one core: time spent waiting for a busy core is not counted.
Prints ms per frame and each stage as a multiple of the frame's JPEG decode.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.decision import decide  # noqa: E402
from edge_agent.loader import load_bundle  # noqa: E402
from edge_agent.observability import input_quality  # noqa: E402
from edge_agent.pipeline import image_sha256  # noqa: E402
from edge_agent.reader import ReaderConfig, locate_digits  # noqa: E402
from edge_agent.render import load_demo_digits, render_postcode_samples  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "mnist-int8"


def baseline_reader(ref: str) -> ModuleType:
    """``edge_agent/reader.py`` as it was at git ``ref``, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:edge_agent/reader.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="reader-baseline-")) / "reader_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reader_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reader_baseline"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def render_frames(n: int, seed: int) -> list[dict]:
    """Rendered envelopes with their PNG and JPEG bytes and the truth."""
    samples = render_postcode_samples(load_demo_digits(), n, np.random.default_rng(seed), length=5)
    frames = []
    for s in samples:
        png = cv2.imencode(".png", s.frame)[1].tobytes()
        jpeg = cv2.imencode(".jpg", s.frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        frames.append({"png": png, "jpeg": jpeg, "postcode": s.postcode})
    return frames


_clock = time.process_time


def _timed(totals: dict[str, float], stage: str, fn, *args):
    started = _clock()
    out = fn(*args)
    totals[stage] += _clock() - started
    return out


def one_round(frames: list[dict], model, config: ReaderConfig, baseline: ModuleType | None) -> dict[str, float]:
    """Seconds per stage summed over the frames (one pass)."""
    totals: dict[str, float] = defaultdict(float)
    threshold = model.manifest.acceptance_threshold
    decode = cv2.imdecode
    for f in frames:
        png, jpeg = np.frombuffer(f["png"], np.uint8), np.frombuffer(f["jpeg"], np.uint8)
        _timed(totals, "decode_png", decode, png, cv2.IMREAD_COLOR)
        _timed(totals, "decode_png_grey", decode, png, cv2.IMREAD_GRAYSCALE)
        colour = _timed(totals, "decode_jpeg", decode, jpeg, cv2.IMREAD_COLOR)
        grey = _timed(totals, "decode_jpeg_grey", decode, jpeg, cv2.IMREAD_GRAYSCALE)
        _timed(totals, "hash_pixels_bgr", image_sha256, colour)
        _timed(totals, "hash_jpeg_bytes", image_sha256, f["jpeg"])
        _timed(totals, "hash_png_bytes", image_sha256, f["png"])
        if baseline is not None:
            _timed(totals, "locate_before", baseline.locate_digits, colour, baseline.ReaderConfig())
        located = _timed(totals, "locate", locate_digits, colour, config)
        _timed(totals, "locate_grey", locate_digits, grey, config)
        cls = _timed(totals, "classify", model.classifier.classify, located.digits)
        _timed(totals, "decide", decide, cls.labels, cls.probabilities, config.expected_lengths, threshold)
        _timed(totals, "input_quality", input_quality, grey, located.inverted)
    return totals


def reads_agree(frames: list[dict], config: ReaderConfig, baseline: ModuleType, model) -> dict[str, int]:
    """How often before and after give the same digit count and the same postcode (and the right one)."""
    same_count = same_code = right_before = right_after = 0
    threshold = model.manifest.acceptance_threshold
    for f in frames:
        image = cv2.imdecode(np.frombuffer(f["jpeg"], np.uint8), cv2.IMREAD_COLOR)
        codes = []
        for located in (baseline.locate_digits(image, baseline.ReaderConfig()), locate_digits(image, config)):
            cls = model.classifier.classify(located.digits)
            codes.append((len(located.digits), decide(cls.labels, cls.probabilities, (5,), threshold).postcode))
        same_count += codes[0][0] == codes[1][0]
        same_code += codes[0][1] == codes[1][1]
        right_before += codes[0][1] == f["postcode"]
        right_after += codes[1][1] == f["postcode"]
    return {"frames": len(frames), "same_digit_count": same_count, "same_postcode": same_code,
            "exact_before": right_before, "exact_after": right_after}


def run(n: int, rounds: int, seed: int, baseline_ref: str | None, model_dir: Path, threads: int = 1) -> dict:
    cv2.setNumThreads(threads)
    model = load_bundle(model_dir)
    config = ReaderConfig()
    frames = render_frames(n, seed)
    baseline = baseline_reader(baseline_ref) if baseline_ref else None
    for length in (4, 5, 6):  # the interpreter plans memory per batch size: not part of a read
        model.classifier.classify(np.zeros((length, 28, 28), np.uint8))
    one_round(frames[:10], model, config, baseline)  # warm caches and OpenCV's first calls
    best: dict[str, float] = {}
    for _ in range(rounds):
        totals = one_round(frames, model, config, baseline)
        for stage, seconds in totals.items():
            best[stage] = min(best.get(stage, float("inf")), seconds)
    ms = {stage: 1000.0 * seconds / n for stage, seconds in best.items()}
    jpeg = ms["decode_jpeg"]
    read_after = ms["locate"] + ms["classify"] + ms["decide"]
    report = {
        "frames": n, "rounds": rounds, "seed": seed, "size": "640x480", "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(), "clock": "process CPU time", "ms_per_frame": {k: round(v, 3) for k, v in sorted(ms.items())},
        "x_jpeg_decode": {k: round(v / jpeg, 2) for k, v in sorted(ms.items())},
        "read_ms": {"after": round(read_after, 3)},
        "read_x_jpeg_decode": {"after": round(read_after / jpeg, 2)},
    }
    if baseline is not None:
        read_before = ms["locate_before"] + ms["classify"] + ms["decide"]
        report["baseline_ref"] = baseline_ref
        report["read_ms"]["before"] = round(read_before, 3)
        report["read_x_jpeg_decode"]["before"] = round(read_before / jpeg, 2)
        report["locate_speedup"] = round(ms["locate_before"] / ms["locate"], 2)
        report["agreement"] = reads_agree(frames, config, baseline, model)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the frames; the fastest counts")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--baseline", metavar="REF", help="git commit whose reader.py to time alongside")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads (1: an agent on one core)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    report = run(args.frames, args.rounds, args.seed, args.baseline, args.model, args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['frames']} frames 640x480, best of {report['rounds']} rounds, OpenCV {report['opencv']}")
    for stage, value in report["ms_per_frame"].items():
        print(f"  {stage:<18}{value:8.3f} ms  {report['x_jpeg_decode'][stage]:6.2f} x JPEG decode")
    print(f"  locate+classify+decide: {report['read_ms']}  = {report['read_x_jpeg_decode']} x JPEG decode")
    if "agreement" in report:
        print(f"  locate speed-up {report['locate_speedup']}x; agreement {report['agreement']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
