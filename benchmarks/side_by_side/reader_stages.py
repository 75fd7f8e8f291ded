"""Section 3: one 640x480 frame, stage by stage, on one core, each stage as a multiple of the JPEG decode.

Frames are rendered from t10k digits (``render_postcode_samples``: paper, ink, light, blur,
noise and rotation vary per frame) and stored as PNG and as JPEG. Each frame goes through
the stages the agent runs per frame, one after the other, so every stage sees the same
moments of machine load: decode (PNG and JPEG), hash, locate, classify (the bundle, one
thread), decide, and the input-quality measure the agent takes for drift monitoring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np

from benchmarks.side_by_side.context import Context
from benchmarks.side_by_side.report import Section, Table, times
from edge_agent.decision import decide
from edge_agent.loader import load_bundle
from edge_agent.mnist import load_split
from edge_agent.observability import input_quality
from edge_agent.pipeline import image_sha256
from edge_agent.reader import ReaderConfig, locate_digits
from edge_agent.render import render_postcode_samples

KEY = "reader"
TITLE = "3. The reader per frame, stage by stage (640x480, one core)"

JPEG_QUALITY = 90
STAGES = ("decode PNG", "decode JPEG", "hash", "locate", "classify", "decide", "input quality")
# What the agent does for a frame from a JPEG (MJPG/RTSP) camera, and from a PNG folder camera.
JPEG_FRAME = ("decode JPEG", "hash", "locate", "classify", "decide", "input quality")
PNG_FRAME = ("decode PNG", "hash", "locate", "classify", "decide", "input quality")


@contextmanager
def one_core() -> Iterator[int]:
    """Run the block on one core, with OpenCV single-threaded; restore both afterwards."""
    before = os.sched_getaffinity(0)
    threads = cv2.getNumThreads()
    core = max(before)
    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    try:
        yield core
    finally:
        cv2.setNumThreads(threads)
        os.sched_setaffinity(0, before)


def encoded_frames(ctx: Context, n: int, seed: int, length: int = 5) -> list[tuple[bytes, bytes, str]]:
    """(PNG bytes, JPEG bytes, postcode) of ``n`` frames rendered from t10k digits."""
    test = load_split(ctx.data_dir, "test")
    out = []
    for sample in render_postcode_samples(test, n, np.random.default_rng(seed), length=length):
        ok_png, png = cv2.imencode(".png", sample.frame)
        ok_jpg, jpg = cv2.imencode(".jpg", sample.frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok_png and ok_jpg
        out.append((png.tobytes(), jpg.tobytes(), sample.postcode))
    return out


def time_frame(png: bytes, jpg: bytes, model, config: ReaderConfig,
               threshold: float) -> tuple[dict, dict, str]:
    """Wall and CPU seconds per stage for one frame, and the postcode read (decided on the JPEG's pixels).

    CPU time is this thread's (OpenCV and LiteRT run single-threaded here): what the stage
    cost, without the moments another job held the core.
    """
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def stage(name: str, fn):
        c0, w0 = time.thread_time(), time.perf_counter()
        value = fn()
        wall[name], cpu[name] = time.perf_counter() - w0, time.thread_time() - c0
        return value

    stage("decode PNG", lambda: cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR))
    image = stage("decode JPEG", lambda: cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR))
    stage("hash", lambda: image_sha256(image))
    located = stage("locate", lambda: locate_digits(image, config))
    result = stage("classify", lambda: model.classifier.classify(located.digits))
    decision = stage("decide", lambda: decide(result.labels, result.probabilities, config.expected_lengths,
                                              threshold))
    stage("input quality", lambda: input_quality(image, located.inverted))
    return wall, cpu, decision.postcode


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    n = ctx.pick(8, 200)
    frames = encoded_frames(ctx, n, seed=11)
    model = load_bundle(ctx.bundle, num_threads=1)
    threshold = model.manifest.acceptance_threshold
    config = ReaderConfig()
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    cpu_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    exact = 0
    with one_core() as core:
        for png, jpg, _code in frames[:2]:  # warm-up: first-call allocations, interpreter resize
            time_frame(png, jpg, model, config, threshold)
        for png, jpg, code in frames:
            wall, cpu, read = time_frame(png, jpg, model, config, threshold)
            exact += read == code
            for stage in STAGES:
                per_stage[stage].append(wall[stage])
                cpu_stage[stage].append(cpu[stage])
    mean = {s: float(np.mean(v)) for s, v in per_stage.items()}
    cpu_mean = {s: float(np.mean(v)) for s, v in cpu_stage.items()}
    p50 = {s: float(np.median(v)) for s, v in per_stage.items()}
    jpeg, cpu_jpeg = mean["decode JPEG"], cpu_mean["decode JPEG"]
    jpeg_frame = sum(mean[s] for s in JPEG_FRAME)
    png_frame = sum(mean[s] for s in PNG_FRAME)
    cpu_jpeg_frame = sum(cpu_mean[s] for s in JPEG_FRAME)
    cpu_png_frame = sum(cpu_mean[s] for s in PNG_FRAME)
    section.data.update({
        "frames": n, "core": core, "jpeg_quality": JPEG_QUALITY,
        "png_kb_mean": round(float(np.mean([len(f[0]) for f in frames])) / 1024, 1),
        "jpeg_kb_mean": round(float(np.mean([len(f[1]) for f in frames])) / 1024, 1),
        "stage_ms_mean": {s: round(v * 1000, 4) for s, v in mean.items()},
        "stage_ms_p50": {s: round(v * 1000, 4) for s, v in p50.items()},
        "stage_ms_p99": {s: round(float(np.percentile(v, 99)) * 1000, 4) for s, v in per_stage.items()},
        "stage_cpu_ms_mean": {s: round(v * 1000, 4) for s, v in cpu_mean.items()},
        "multiple_of_jpeg_decode_wall": {s: round(v / jpeg, 3) for s, v in mean.items()},
        "multiple_of_jpeg_decode_cpu": {s: round(v / cpu_jpeg, 3) for s, v in cpu_mean.items()},
        "frame_ms_jpeg": round(jpeg_frame * 1000, 3), "frame_ms_png": round(png_frame * 1000, 3),
        "frame_cpu_ms_jpeg": round(cpu_jpeg_frame * 1000, 3), "frame_cpu_ms_png": round(cpu_png_frame * 1000, 3),
        "frames_per_s_one_core_jpeg": round(1 / jpeg_frame, 1), "frames_per_s_one_core_png": round(1 / png_frame, 1),
        "frames_per_cpu_s_jpeg": round(1 / cpu_jpeg_frame, 1), "frames_per_cpu_s_png": round(1 / cpu_png_frame, 1),
        "exact_reads": exact,
    })
    section.tables.append(Table(
        f"{n} frames from t10k digits, JPEG quality {JPEG_QUALITY} (mean {section.data['jpeg_kb_mean']} KB) and PNG "
        f"(mean {section.data['png_kb_mean']} KB); on core {core}, OpenCV and LiteRT on one thread. CPU = this "
        "thread's CPU time (without the moments other jobs held the core)",
        ["stage", "CPU ms (mean)", "wall ms (mean)", "wall p50 ms", "wall p99 ms", "× JPEG decode (CPU)",
         "× JPEG decode (wall)", "share of a JPEG frame (CPU)"],
        [[s, cpu_mean[s] * 1000, mean[s] * 1000, p50[s] * 1000, section.data["stage_ms_p99"][s],
          times(cpu_mean[s] / cpu_jpeg), times(mean[s] / jpeg),
          f"{100 * cpu_mean[s] / cpu_jpeg_frame:.1f}%" if s in JPEG_FRAME else "–"] for s in STAGES]))
    section.tables.append(Table(
        "Whole frame on one core",
        ["camera frames", "CPU ms per frame", "wall ms per frame", "frames per CPU-second", "frames/s (wall)",
         "× JPEG decode (CPU)"],
        [["JPEG (MJPG/RTSP camera)", cpu_jpeg_frame * 1000, jpeg_frame * 1000, 1 / cpu_jpeg_frame, 1 / jpeg_frame,
          times(cpu_jpeg_frame / cpu_jpeg)],
         ["PNG (folder camera)", cpu_png_frame * 1000, png_frame * 1000, 1 / cpu_png_frame, 1 / png_frame,
          times(cpu_png_frame / cpu_jpeg)]]))
    section.notes.append(f"Reads exactly right: {exact} of {n} frames (rendered with varied paper, ink, light, "
                         "blur, rotation and noise; the accuracy benchmark is benchmarks/reader_accuracy.py).")
    return section
