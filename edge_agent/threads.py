"""Which of the agent's threads uses the CPU: their names in the kernel, and CPU seconds per thread.

Python names its threads for itself only; the kernel (``top -H``, ``ps -L``, ``/proc``) sees
every thread as ``python``. An engineer asking why a line agent takes a whole core, or a
benchmark asking where an envelope's CPU goes, needs the stage: the reader, the store, the
MQTT network thread. Linux only; elsewhere naming does nothing and the figures are empty.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

KERNEL_NAME_BYTES = 15  # the kernel keeps 15 bytes of a thread's name (TASK_COMM_LEN - 1)
OTHER = "native"  # threads Python did not start: OpenCV's or LiteRT's pools, SQLite, the C runtime

# Threads already given their name (by object: the kernel reuses the ids of ended threads).
_named: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_named_lock = threading.Lock()


def thread_role(name: str) -> str:
    """The stage a Python thread name stands for, short enough for the kernel.

    ``grabber[rtsp://cam-3/...]`` is the grabber whatever its camera; paho names its network
    thread after the client id, which is long and says nothing the site does not know.
    """
    if name.startswith("paho-mqtt-client"):
        role = "mqtt-network"
    elif name == "MainThread":
        role = "main"
    else:
        role = name.split("[", 1)[0]
    return role.encode()[:KERNEL_NAME_BYTES].decode(errors="ignore") or "thread"


def name_os_threads() -> int:
    """Give every live Python thread but the main one its role as its kernel name; returns how
    many were named now. Cheap to call again: each thread is named once."""
    named = 0
    with _named_lock:
        for thread in threading.enumerate():
            tid = thread.native_id
            # The main thread's kernel name is the process's (`edge-agent`): what ps, pgrep,
            # pkill and top without -H show and match. It keeps it.
            if tid is None or thread in _named or thread is threading.main_thread():
                continue
            try:
                Path(f"/proc/self/task/{tid}/comm").write_text(thread_role(thread.name))
            except OSError as exc:  # not Linux, /proc read-only, or the thread just ended
                log.debug("could not name thread %s (%s): %s", thread.name, tid, exc)
            else:
                named += 1
            _named.add(thread)
    return named


def _on_cpu_seconds(tid: int) -> float | None:
    """A thread's time on a CPU from the scheduler, to the nanosecond (``schedstat``'s first
    field); None where the kernel does not keep it or the thread has ended."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as handle:
            return int(handle.read().split(None, 1)[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) this process's threads have used, summed per role.

    From the scheduler's own run time per thread, in nanoseconds: the user and system times in
    ``/proc/.../stat`` are sampled at the 10 ms tick, so a reader that spent 20 ms on five
    frames could show none (where ``schedstat`` is missing they are used all the same). Threads
    that have ended no longer count, so a role's figure can fall; the process's own total
    (``process_cpu_seconds_total``) keeps them.
    """
    roles = {t.native_id: thread_role(t.name) for t in threading.enumerate() if t.native_id is not None}
    try:
        threads = psutil.Process().threads()
    except (psutil.Error, OSError) as exc:
        log.debug("no per-thread CPU figures: %s", exc)
        return {}
    totals: dict[str, float] = {}
    for t in threads:
        role = roles.get(t.id, OTHER)
        seconds = _on_cpu_seconds(t.id)
        totals[role] = totals.get(role, 0.0) + (t.user_time + t.system_time if seconds is None else seconds)
    return totals
