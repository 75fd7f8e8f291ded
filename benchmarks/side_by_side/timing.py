"""Side-by-side timing: variants measured in interleaved rounds, so the machine's noise hits them alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timed:
    """Per-call wall and CPU times of one variant (seconds) and the items each call handled.

    CPU time is the whole process's (all its threads), so it counts a thread pool's work too
    and leaves out the time other jobs held the cores: on a shared machine it is the steadier
    measure of what a variant costs; wall time is what a caller waits.
    """

    seconds: np.ndarray
    items_per_call: int
    cpu_seconds: np.ndarray | None = None

    @property
    def calls(self) -> int:
        return len(self.seconds)

    def per_second(self) -> float:
        """Items per second over all timed calls (total items / total time)."""
        total = float(self.seconds.sum())
        return self.items_per_call * self.calls / total if total > 0 else float("nan")

    def ms(self, q: float) -> float:
        return float(np.percentile(self.seconds, q) * 1000.0)

    def per_cpu_second(self) -> float:
        """Items per CPU-second of the process (all threads)."""
        total = float(self.cpu_seconds.sum()) if self.cpu_seconds is not None else 0.0
        return self.items_per_call * self.calls / total if total > 0 else float("nan")

    def summary(self) -> dict:
        out = {"calls": self.calls, "items_per_call": self.items_per_call,
               "per_second": round(self.per_second(), 2), "p50_ms": round(self.ms(50), 4),
               "p99_ms": round(self.ms(99), 4), "mean_ms": round(float(self.seconds.mean()) * 1000, 4)}
        if self.cpu_seconds is not None:
            out.update(per_cpu_second=round(self.per_cpu_second(), 2),
                       cpu_p50_ms=round(float(np.percentile(self.cpu_seconds, 50)) * 1000, 4),
                       cpu_mean_ms=round(float(self.cpu_seconds.mean()) * 1000, 4))
        return out


def time_calls(fn: Callable[[], object], calls: int) -> np.ndarray:
    """Wall time of each of ``calls`` calls."""
    out = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - started
    return out


def interleaved(variants: dict[str, tuple[Callable[[], object], int]], budget_s: float, rounds: int = 5,
                min_calls: int = 3, warmup_s: float = 0.2) -> dict[str, Timed]:
    """Time each variant (function, items per call) for about ``budget_s`` in ``rounds`` slices.

    Each round gives every variant its slice in turn, and the order rotates between rounds, so
    a burst of load from another job lands on all of them rather than on one. A variant gets
    at least ``min_calls`` calls in all (one per round at least), however slow it is.
    """
    names = list(variants)
    for name in names:  # warm-up: first-call tracing, memory planning, XNNPACK weight packing
        fn = variants[name][0]
        fn()
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            fn()
    slice_s = budget_s / rounds
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = variants[name][0]
            deadline = time.perf_counter() + slice_s
            owed = max(1, -(-min_calls // rounds))
            done = 0
            while done < owed or time.perf_counter() < deadline:
                cpu_started, started = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
                done += 1
    return {name: Timed(np.asarray(wall[name]), variants[name][1], np.asarray(cpu[name])) for name in names}


def percentile_ms(values_s: list[float] | np.ndarray, q: float) -> float:
    return round(float(np.percentile(np.asarray(values_s), q)) * 1000.0, 3) if len(values_s) else float("nan")
