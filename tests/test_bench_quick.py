"""benchmarks/bench.py --quick: every section runs and the report is well formed.

Timings are reported, never asserted (the machine is shared): the checks are that each
section is there, its figures are positive numbers, the machine is described, and the
Markdown carries the tables. The quick run takes about a minute on an idle 2-core box.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.side_by_side.e2e_rates import tables_of
from edge_agent.mnist import locate_data_dir

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("classifier", "roofline", "reader", "e2e_rates", "scaling", "footprint", "brief")
# Keys whose numbers are durations, rates or sizes: each must be a positive, finite number.
POSITIVE_SUFFIXES = ("_ms", "_s", "per_second", "per_cpu_second", "seconds", "_mb", "_ghz")

pytestmark = pytest.mark.slow


def _mnist_dir() -> Path | None:
    found = locate_data_dir()
    if found is None or not (any(found.glob("t10k-images*")) or (found / "mnist.npz").exists()):
        return None
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    if _mnist_dir() is None:
        reason = "no MNIST t10k files (../shared/datasets/mnist or $MNIST_DIR): bench.py evaluates on them"
        print(f"test_bench_quick: skipped: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    started = time.monotonic()
    # The trained comparison model stays cached in build/bench (the default --cache) between runs.
    # Section 4 is benchmarks/e2e_rates.py's (its own quick run takes half a minute more): listed, not run.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--skip", "e2e_rates",
                           "--out", str(out), "--stem", "bench-test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    print(f"bench.py --quick took {seconds:.0f} s")
    assert done.returncode == 0, f"bench.py --quick exited {done.returncode}:\n{done.stderr[-4000:]}"
    report = json.loads((out / "bench-test.json").read_text())
    markdown = (out / "bench-test.md").read_text()
    return report, markdown, seconds


def _positive_numbers(value: object, path: str = "") -> list[str]:
    """Paths of duration/rate/size values that are not positive finite numbers."""
    bad = []
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}"
            if str(key).endswith(POSITIVE_SUFFIXES) and not isinstance(item, (dict, str)):
                numbers = item if isinstance(item, list) else [item]
                if not numbers or not all(isinstance(n, (int, float)) and math.isfinite(n) and n > 0 for n in numbers):
                    bad.append(f"{here}={item!r}")
            else:
                bad += _positive_numbers(item, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad += _positive_numbers(item, f"{path}[{i}]")
    return bad


def test_every_section_ran_without_error(quick_run):
    report, _markdown, _seconds = quick_run
    assert report["quick"] is True
    assert list(report["sections"]) == list(SECTIONS)
    errors = {key: s["error"] for key, s in report["sections"].items() if s["error"]}
    assert errors == {}
    assert report["sections"]["e2e_rates"]["data"] == {"skipped": "--skip"}


def test_figures_are_positive_numbers(quick_run):
    report, _markdown, _seconds = quick_run
    sections = report["sections"]
    assert _positive_numbers({k: s["data"] for k, s in sections.items() if k != "e2e_rates"}) == []
    rows = sections["classifier"]["data"]["by_threads"]["1"]["rows"]
    assert [row["batch"] for row in rows] == [1, 5, 64]
    for row in rows:
        assert {"int8", "float32_tflite", "keras_predict", "keras_direct"} <= set(row["variants"])
        assert all(v["per_second"] > 0 and v["per_cpu_second"] > 0 for v in row["variants"].values())
    assert sections["roofline"]["data"]["macs_per_digit"]["total"] > 1_000_000
    assert set(sections["reader"]["data"]["multiple_of_jpeg_decode_cpu"]) >= {"locate", "classify", "decide", "hash"}
    assert len(sections["scaling"]["data"]["digits_per_frame"]) == 10
    assert sections["footprint"]["data"]["agent_memory"]["rss_mb"] > 0


def test_the_int8_bundle_reads_the_digits_it_is_given(quick_run):
    # Not a timing: a harness that fed the model the wrong pixels would show here.
    report, _markdown, _seconds = quick_run
    accuracy = report["sections"]["classifier"]["data"]["by_threads"]["1"]["accuracy"]
    assert accuracy["int8"] > 0.95
    brief = report["sections"]["brief"]["data"]["results"]
    assert brief["appliance int8, in process, one batch of 500"]["accuracy"] > 0.95
    assert sum(report["sections"]["brief"]["data"]["truth_distribution"]) == 500


def test_the_machine_is_described(quick_run):
    report, markdown, _seconds = quick_run
    machine = report["machine"]
    assert machine["cpu"] and machine["cores_usable"] >= 1
    assert set(machine["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp"}
    for library in ("ai-edge-litert", "tensorflow", "opencv-python-headless", "numpy"):
        assert machine["libraries"][library], library
    assert machine["python"].startswith("3.")
    assert report["machine_line"] in markdown


def test_the_markdown_has_a_table_per_section(quick_run):
    report, markdown, seconds = quick_run
    for number in range(1, 8):
        assert f"\n## {number}. " in markdown
    assert markdown.count("|---|") >= 10
    assert "× int8" in markdown and "× JPEG decode" in markdown
    print(f"quick run: {seconds:.0f} s, load average at the end {report['load_average_at_end']}")


def test_section_4_makes_tables_of_the_json_its_script_prints():
    printed = {"cold_start": {"online_s": 1.3}, "steady": [{"rate_per_s": 10, "reasons": {"accepted": 3}},
                                                          {"rate_per_s": 50, "p99_ms": 40.0}], "rss_mb": 108.1}
    tables = tables_of(printed)
    assert [t.title for t in tables] == ["", "cold_start", "steady"]
    assert tables[0].rows == [["rss_mb", 108.1]]
    assert tables[2].columns == ["rate_per_s", "reasons", "p99_ms"]
    assert tables[2].rows == [[10, "accepted 3", None], [50, None, 40.0]]
