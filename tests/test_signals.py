"""SIGTERM/SIGINT as a stop request: wakes the waiting main thread, never deadlocks it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.paths import ROOT


def run_child(code: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def test_sigterm_wakes_a_long_wait_at_once():
    done = run_child("""
        import os, signal, threading, time
        from edge_agent.signals import StopSignal
        stop = StopSignal()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        assert stop.wait(30.0) is True and stop.is_set()
        print(f"woke after {time.monotonic() - started:.2f} s")
    """)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[2]) < 5.0  # not the 30 s timeout


def test_a_timeout_without_a_signal_returns_false():
    done = run_child("""
        from edge_agent.signals import StopSignal
        stop = StopSignal()
        assert stop.wait(0.05) is False and not stop.is_set()
    """)
    assert done.returncode == 0, done.stderr


def test_signals_landing_anywhere_in_a_busy_wait_loop_never_hang_it():
    """The agent's main thread waits in short slices (the watchdog loop); threading.Event.set()
    in the handler hung it when a signal landed while wait() held the event's lock. Here a
    storm of SIGINTs (counted, not stopping) lands while the loop spins through waits, then
    SIGTERM must still end it."""
    done = run_child("""
        import os, signal, threading, time
        from edge_agent.signals import StopSignal
        stop = StopSignal((signal.SIGTERM,))
        def storm():
            for _ in range(2000):
                os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        threading.Thread(target=storm).start()
        while not stop.wait(0.0005):
            pass
        print("stopped")
    """, timeout_s=60.0)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped"


def test_set_from_another_thread_wakes_the_waiter():
    done = run_child("""
        import threading, time
        from edge_agent.signals import StopSignal
        stop = StopSignal()
        threading.Timer(0.1, stop.set).start()
        started = time.monotonic()
        assert stop.wait(30.0) is True
        assert time.monotonic() - started < 5.0
    """)
    assert done.returncode == 0, done.stderr
