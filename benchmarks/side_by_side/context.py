"""What every section gets: where things are, how big to make the run, and a way to run a measuring child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
JSON_MARK = "BENCH-JSON "  # a child's result line on stdout; everything else it prints is log


class ChildError(RuntimeError):
    """A measuring child process failed; the message names its log file."""


@dataclass
class Context:
    out_dir: Path  # reports, figures and the children's logs
    cache_dir: Path  # what later runs reuse: the trained Keras model, its float32 TFLite, the compiled probe
    work_dir: Path  # this run's scratch: rendered frames, agent state
    data_dir: Path  # MNIST IDX files (t10k for evaluation)
    bundle: Path  # the int8 model bundle
    quick: bool
    stem: str  # bench-<date>
    keras_model: Path | None = None  # a trained Keras model to compare; None: find or train one
    python: str = sys.executable
    machine: dict = field(default_factory=dict)  # describe_machine()'s answer
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)  # section key -> Section, for later sections

    def pick(self, quick: object, full: object):
        """The quick mode's count or the full run's."""
        return quick if self.quick else full

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def env(self) -> dict[str, str]:
        return os.environ | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}

    def run_child(self, args: list[str], log_name: str, timeout_s: float) -> dict:
        """Run ``python args`` from the repository root; return the JSON it printed after JSON_MARK."""
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{log_name}.log"
        with open(log_path, "w") as log:
            try:
                done = subprocess.run([self.python, *args], cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                      stderr=log, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise ChildError(f"{' '.join(args[:3])} ran over {timeout_s:.0f} s (log: {log_path})") from exc
        found = [line[len(JSON_MARK):] for line in done.stdout.splitlines() if line.startswith(JSON_MARK)]
        if done.returncode != 0 or not found:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ChildError(f"{' '.join(args[:3])} exited {done.returncode} (log: {log_path}): "
                             + " / ".join(tail))
        return json.loads(found[-1])


def emit(result: dict) -> None:
    """A child's answer to its parent (see Context.run_child)."""
    print(JSON_MARK + json.dumps(result, default=lambda v: v.item() if hasattr(v, "item") else str(v)), flush=True)
