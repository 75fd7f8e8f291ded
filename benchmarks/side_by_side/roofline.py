"""Section 2: multiply-accumulates per digit, the MAC/s the classifier achieves, and the share of the core's peak.

The ceilings are measured on this core by a small C probe (probe.c, compiled with the system's
C compiler): its clock, and how many vpmaddubsw / vpmaddwd / vfmadd231ps (256-bit) it retires
per cycle; on a CPU with AVX-512 also the 512-bit vfmadd231ps, and with AVX-512 VNNI the 512-bit
vpdpbusd. Without a compiler the section falls back to /proc/cpuinfo's clock and two of each
256-bit instruction per cycle (Zen 3's figure), and says so.

Each row is set against the instruction its XNNPACK kernel is built on, as the CPU's flags select
it: int8 on vpdpbusd (zmm) with AVX-512 VNNI, else on vpmaddwd (the AVX2 kernels widen int8 to
int16); float32 on the 512-bit FMA with AVX-512, else the 256-bit one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from benchmarks.side_by_side.classifier import LABELS
from benchmarks.side_by_side.context import Context
from benchmarks.side_by_side.report import Section, Table
from benchmarks.side_by_side.tflite import count_macs
from edge_agent.bundle import MODEL_FILE

KEY = "roofline"
TITLE = "2. Roofline: MACs per digit against the core's peak"

PROBE_SOURCE = Path(__file__).with_name("probe.c")
# MACs one 256-bit instruction does: vpmaddubsw multiplies 32 u8 x s8 pairs (adding them pairwise
# into int16), vpmaddwd 16 int16 pairs (into int32), vfmadd231ps 8 float32 lanes.
MACS_PER_INSTRUCTION = {"vpmaddubsw": 32, "vpmaddwd": 16, "vfmadd231ps": 8}
# The 512-bit ones, probed only where the CPU has them: vpdpbusd multiplies 64 u8 x s8 pairs and
# accumulates them into int32 in one instruction (VNNI); vfmadd231ps on zmm does 16 float32 lanes.
MACS_PER_INSTRUCTION_512 = {"vpdpbusd_zmm": 64, "vfmadd231ps_zmm": 16}
MACS_EACH = {**MACS_PER_INSTRUCTION, **MACS_PER_INSTRUCTION_512}
ASSUMED_PER_CYCLE = 2.0  # Zen 3: two 256-bit multiply(-add) pipes for each of them


def _wide_instructions(ctx: Context) -> str:
    """The probe's third argument: which 512-bit instructions this CPU can run."""
    flags = ctx.machine.get("flags", {})
    return ",".join(name for name, flag in (("avx512", "avx512f"), ("vnni", "avx512_vnni")) if flags.get(flag))


def probe_core(ctx: Context) -> dict:
    """Clock (GHz) and instructions per ns of each multiply-add, measured; or stated assumptions."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = PROBE_SOURCE.read_bytes()
    binary = ctx.cache_dir / "probe" / f"probe-{hashlib.sha256(source).hexdigest()[:12]}"
    try:
        if not binary.exists():
            if compiler is None:
                raise OSError("no C compiler")
            binary.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([compiler, "-O2", "-o", str(binary), str(PROBE_SOURCE)], check=True,
                           capture_output=True, timeout=60)
        out = subprocess.run([str(binary), "2000000", str(ctx.pick(20, 60)), _wide_instructions(ctx)], check=True,
                             capture_output=True, text=True, timeout=120)
        measured = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        clock = float(ctx.machine.get("cpu_mhz") or 0) / 1000 or None
        return {"measured": False, "why_not": str(exc), "clock_ghz": clock,
                "per_cycle": {name: ASSUMED_PER_CYCLE for name in MACS_PER_INSTRUCTION}}
    clock = measured["clock_ghz"]
    names = [n for n in MACS_EACH if f"{n}_per_ns" in measured]
    return {"measured": True, "clock_ghz": clock,
            "per_cycle": {name: round(measured[f"{name}_per_ns"] / clock, 2) for name in names}}


def kernel_instructions(peaks: dict) -> tuple[str, str, str]:
    """(int8's practical instruction, int8's best case, float32's): what XNNPACK's kernels use here."""
    if "vpdpbusd_zmm" in peaks:
        int8 = best = "vpdpbusd_zmm"
    else:
        int8, best = "vpmaddwd", "vpmaddubsw"
    return int8, best, "vfmadd231ps_zmm" if "vfmadd231ps_zmm" in peaks else "vfmadd231ps"


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
    macs = count_macs(ctx.bundle / MODEL_FILE)
    core = probe_core(ctx)
    clock = core["clock_ghz"] or float("nan")
    peaks = {name: MACS_EACH[name] * per_cycle for name, per_cycle in core["per_cycle"].items()}
    int8_ceiling, int8_best, float_ceiling = kernel_instructions(peaks)
    section.data.update({"macs_per_digit": macs, "core": core,
                         "peak_macs_per_cycle_per_core": peaks})
    section.tables.append(Table(
        f"Multiply-accumulates per digit (models/mnist-int8): {macs['total'] / 1e6:.2f} M",
        ["op", "shape", "MACs", "share"],
        [[o["op"], o["shape"], o["macs"], f"{100 * o['macs'] / macs['total']:.1f}%"] for o in macs["per_op"]]))
    how = "measured by probe.c" if core["measured"] else f"assumed ({core['why_not']})"
    section.tables.append(Table(
        f"Ceilings of one core, {how}: clock {clock:.2f} GHz",
        ["instruction (256-bit unless _zmm)", "MACs each", "per cycle", "MACs/cycle", "G MAC/s per core"],
        [[name, MACS_EACH[name], core["per_cycle"][name], peaks[name], peaks[name] * clock] for name in peaks]))

    classifier = ctx.results.get("classifier")
    if classifier is None or classifier.error or not classifier.data.get("by_threads"):
        section.notes.append("The classifier section did not run, so there are no achieved rates to place.")
        return section
    rows = []
    # Per CPU-second of the process, a rate is per busy core whatever the thread count, so every
    # row is set against one core's ceiling (kernel_instructions: what XNNPACK's kernels use here).
    for threads, result in sorted(classifier.data["by_threads"].items()):
        for row in result["rows"]:
            for name, timed in row["variants"].items():
                if name in ("keras_predict", "keras_direct") and row["batch"] != 64:
                    continue
                achieved = timed["per_cpu_second"] * macs["total"] / 1e9
                ceilings = ((peaks[int8_ceiling], peaks[int8_best]) if name.startswith("int8")
                            else (peaks[float_ceiling],) * 2)
                rows.append([int(threads), row["batch"], LABELS[name], timed["per_cpu_second"], achieved,
                             f"{100 * achieved / (ceilings[0] * clock):.1f}%",
                             f"{100 * achieved / (ceilings[1] * clock):.1f}%"])
    section.tables.append(Table(
        "Achieved per busy core (digits per CPU-second × MACs per digit) and its share of one core's peak: int8 "
        f"rows against {int8_ceiling} (what XNNPACK's int8 kernels use on this CPU) and {int8_best} (the "
        f"instruction set's best case); float rows against {float_ceiling} in both columns",
        ["threads", "batch", "variant", "digits/CPU-s", "G MAC per CPU-s", f"share ({int8_ceiling} / {float_ceiling})",
         f"share ({int8_best} / {float_ceiling})" if int8_best != int8_ceiling else "share (the same: best case)"],
        rows))
    section.data["achieved"] = [dict(zip(["threads", "batch", "variant", "digits_per_cpu_s", "gmacs_per_cpu_s",
                                          "share_practical", "share_best"], r)) for r in rows]
    _per_kernel(section, classifier, macs, peaks, clock, (int8_ceiling, float_ceiling))
    return section


def _per_kernel(section: Section, classifier: Section, macs: dict, peaks: dict, clock: float,
                ceilings: tuple[str, str]) -> None:
    """The convolution and dense kernels on their own: perf's share of the time gives each its MAC/s."""
    profiles = classifier.data.get("hot_kernels", {})
    if not profiles or not all(isinstance(p, dict) for p in profiles.values()):
        return
    conv_macs = sum(o["macs"] for o in macs["per_op"] if o["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D"))
    dense_macs = sum(o["macs"] for o in macs["per_op"] if o["op"] == "FULLY_CONNECTED")
    rows = []
    for model, ceiling in zip(("int8", "float32"), ceilings):
        profile = profiles[model]
        per_digit_s = 1 / profile["digits_per_cpu_s"]  # the sampled process's own rate
        for kind, op_macs, test in (("convolutions (igemm)", conv_macs, lambda s: "igemm" in s),
                                    ("dense layers (gemm)", dense_macs, lambda s: "_gemm" in s and "igemm" not in s)):
            hits = [h for h in profile["hits"] if test(h["symbol"])]
            share = sum(h["percent"] for h in hits) / 100
            if not share:
                continue
            achieved = op_macs / (per_digit_s * share) / 1e9
            rows.append([model, kind, ", ".join(f"`{h['symbol']}`" for h in hits), f"{100 * share:.0f}%",
                         achieved, f"{100 * achieved / (peaks[ceiling] * clock):.0f}% of {ceiling}"])
    section.data["per_kernel"] = [dict(zip(["model", "ops", "kernels", "share_of_time", "gmacs_per_cpu_s",
                                            "share_of_peak"], r)) for r in rows]
    section.tables.append(Table(
        "The kernels on their own (batch 64, one thread): their share of the sampled process's CPU time (perf) "
        "and the MAC/s that implies", ["model", "ops", "XNNPACK kernels", "share of time", "G MAC per CPU-s",
                                       "of the core's peak"], rows))
