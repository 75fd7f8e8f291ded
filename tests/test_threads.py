"""Thread roles in the kernel and CPU seconds per role (real threads, real /proc)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.threads import OTHER, name_os_threads, thread_cpu_seconds, thread_role

LINUX_PROC = Path("/proc/self/task").is_dir()


def test_roles_are_the_stage_and_fit_the_kernel():
    assert thread_role("reader-0") == "reader-0"
    assert thread_role("grabber[rtsp://user@cam-3.site/stream?x=1]") == "grabber"
    assert thread_role("paho-mqtt-client-edge-leeds-line-2") == "mqtt-network"
    assert thread_role("MainThread") == "main"
    assert thread_role("a-very-long-stage-name-indeed") == "a-very-long-sta"
    assert len(thread_role("ü" * 20).encode()) <= 15  # cut on a character, never inside one


class _Parked:
    """A thread with a given name that burns ``cpu_s`` of its own CPU, then waits to be released."""

    def __init__(self, name: str, cpu_s: float = 0.0) -> None:
        self.release, self.ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(cpu_s,), name=name, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self, cpu_s: float) -> None:
        started = time.thread_time()
        while time.thread_time() - started < cpu_s:
            pass
        self.ready.set()
        self.release.wait(30)

    def stop(self) -> None:
        self.release.set()
        self.thread.join(30)


@pytest.mark.skipif(not LINUX_PROC, reason="thread names and CPU per thread come from Linux's /proc")
def test_threads_are_named_in_the_kernel_once():
    parked = _Parked("grabber[folder:/srv/frames]")
    try:
        comm = Path(f"/proc/self/task/{parked.thread.native_id}/comm")
        assert comm.read_text().strip() != "grabber"
        assert name_os_threads() >= 1
        assert comm.read_text().strip() == "grabber"
        comm.write_text("renamed")  # named once: a later call leaves the thread alone
        name_os_threads()
        assert comm.read_text().strip() == "renamed"
    finally:
        parked.stop()


@pytest.mark.skipif(not LINUX_PROC, reason="thread names and CPU per thread come from Linux's /proc")
def test_the_process_keeps_its_name():
    """The main thread's kernel name is what ps, pgrep and pkill match: naming leaves it alone."""
    script = ("import pathlib, threading\n"
              "from edge_agent.threads import name_os_threads\n"
              "before = pathlib.Path('/proc/self/comm').read_text().strip()\n"
              "threading.Thread(target=threading.Event().wait, args=(5,), name='store', daemon=True).start()\n"
              "assert name_os_threads() >= 1\n"
              "print(before, pathlib.Path('/proc/self/comm').read_text().strip())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    assert after == before != "main"


@pytest.mark.skipif(not LINUX_PROC, reason="thread names and CPU per thread come from Linux's /proc")
def test_cpu_seconds_are_counted_per_role():
    busy, idle = _Parked("reader-7", cpu_s=0.3), _Parked("review-crops-7")
    try:
        cpu = thread_cpu_seconds()
        if Path(f"/proc/self/task/{busy.thread.native_id}/schedstat").exists():
            # The scheduler's run time, not 10 ms ticks: 0.3 s of spinning is 0.3 s and a little.
            assert 0.3 <= cpu["reader-7"] < 1.0
        else:  # ticks of 10 ms: at least 0.2 s
            assert cpu["reader-7"] >= 0.2
        assert cpu["review-crops-7"] < cpu["reader-7"]
        assert "main" in cpu and all(seconds >= 0 for seconds in cpu.values())
        assert set(cpu) - {OTHER} <= {thread_role(t.name) for t in threading.enumerate()}
    finally:
        busy.stop()
        idle.stop()


def test_system_probe_reports_the_readers_share_of_a_core(tmp_path):
    from edge_agent.metrics import SystemProbe

    spent = {"reader-0": 10.0, "reader-1": 5.0, "store": 1.0}
    probe = SystemProbe(tmp_path, thread_cpu=lambda: dict(spent))
    time.sleep(0.2)
    spent["reader-0"] += 0.1  # the readers used 0.1 s of CPU in about 0.2 s: roughly half a core
    spent["store"] += 5.0  # not a reader
    figures = probe.read()
    assert 0 < figures["reader_cpu_pct"] <= 50  # at most 0.1 s in the 0.2 s or more slept
    assert figures["agent_cpu_pct"] is not None and figures["agent_cpu_pct"] >= 0
    spent.pop("reader-1")  # a reader that ended takes its seconds with it: never a negative share
    assert probe.read()["reader_cpu_pct"] == 0.0
