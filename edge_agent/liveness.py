"""Is every part of the agent still making progress? What the systemd watchdog pings depend on.

Each long-running loop beats once per turn (every loop turns at least every second, even idle),
so a loop that stops beating is stuck (a wedged inference, a locked database) or dead (an
exception escaped it). Restarting loses nothing: the journal answers every trigger taken in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from edge_agent.types import Check

class Heartbeats:
    """The time of each loop's last turn, by loop name; threads beat, the watchdog reads."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._beats: dict[str, float] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def watch(self, name: str, thread: threading.Thread) -> None:
        """Expect beats from ``thread`` under ``name`` from now on."""
        with self._lock:
            self._threads[name] = thread
            self._beats[name] = self._monotonic()

    def beat(self, name: str) -> None:
        # A dict store is atomic under the GIL: loops beat without taking the lock.
        self._beats[name] = self._monotonic()

    def vital(self, stall_s: float) -> Check:
        """Not ok if a watched loop's thread has died or has not beaten for ``stall_s``."""
        now = self._monotonic()
        with self._lock:
            watched = list(self._threads.items())
        dead = [name for name, thread in watched if not thread.is_alive()]
        stalled = [(name, now - self._beats.get(name, now)) for name, thread in watched
                   if thread.is_alive() and now - self._beats.get(name, now) > stall_s]
        if dead:
            return Check(False, "pipeline thread(s) ended: " + ", ".join(sorted(dead)))
        if stalled:
            return Check(False, "pipeline stalled: " + ", ".join(f"{name} silent {age:.0f} s"
                                                                  for name, age in sorted(stalled)))
        return Check(True, f"{len(watched)} pipeline loops turning")


def verdict(vitals: Mapping[str, Check]) -> tuple[bool, str]:
    """All parts ok, and a one-line summary naming the failing ones first."""
    failing = [f"{name}: {v.detail}" for name, v in vitals.items() if not v.ok]
    if failing:
        return False, "; ".join(failing)
    return True, "healthy"
