"""What the numbers were measured on: CPU, its vector extensions, memory, load and library versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The extensions that decide which int8/float kernels XNNPACK can pick.
FLAGS_OF_INTEREST = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                     "avx_vnni", "avx512_bf16", "amx_int8", "asimd", "asimddp", "i8mm")
# Distributions whose versions go with the figures (the first installed name of each group wins).
LIBRARIES = (("ai-edge-litert",), ("tensorflow", "tensorflow-cpu"), ("keras",),
             ("opencv-python-headless", "opencv-python"), ("numpy",), ("flask",), ("waitress",),
             ("paho-mqtt",), ("psutil",))
# AMD family 25 (0x19) is Zen 3 / Zen 4; models 0x00-0x0f are Milan (Zen 3) EPYC.
_AMD_FAMILIES = {23: "Zen / Zen 2", 25: "Zen 3 / Zen 4", 26: "Zen 5"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _microarchitecture(info: dict[str, str]) -> str:
    try:
        family, model = int(info.get("cpu family", "")), int(info.get("model", ""))
    except ValueError:
        return ""
    if info.get("vendor_id") == "AuthenticAMD":
        if family == 25:
            return "Zen 3" if model < 0x10 or 0x20 <= model < 0x60 else "Zen 4"
        return _AMD_FAMILIES.get(family, "")
    return ""


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _mosquitto_version() -> str | None:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].replace("mosquitto version", "").strip() if first else None


def describe_machine() -> dict:
    """CPU model and flags, cores, clock, memory, load average and the library versions."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = list(range(os.cpu_count() or 1))
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    try:
        mhz = float(info.get("cpu MHz", "0"))
    except ValueError:
        mhz = 0.0
    name = info.get("model name") or platform.processor() or "unknown CPU"
    uarch = _microarchitecture(info)
    return {
        "cpu": name,
        "microarchitecture": uarch,
        "cpu_family_model_stepping": [info.get("cpu family"), info.get("model"), info.get("stepping")],
        "cpu_mhz": mhz,  # as /proc/cpuinfo reports it (under a hypervisor: the nominal clock)
        "cores_visible": os.cpu_count(),
        "cores_usable": len(affinity),
        "hypervisor": "hypervisor" in flags,
        "flags": {flag: flag in flags for flag in FLAGS_OF_INTEREST},
        "memory_gb": round(mem_kb / 2**20, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "libraries": {names[0]: _version(names) for names in LIBRARIES},
        "mosquitto": _mosquitto_version(),
    }


def machine_line(machine: dict) -> str:
    """One sentence naming the CPU, its cores and its int8-relevant extensions."""
    flags = machine["flags"]
    cpu = machine["cpu"] + (f" ({machine['microarchitecture']})" if machine["microarchitecture"] else "")
    present = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimddp") if flags.get(f)]
    absent = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "asimddp") if not flags.get(f)]
    return (f"{cpu}, {machine['cores_usable']} cores at {machine['cpu_mhz']:.0f} MHz (as /proc/cpuinfo says), "
            f"{machine['memory_gb']} GB; has {', '.join(present) or 'none of avx2/fma'}; "
            f"no {', '.join(absent) or '-'}")
