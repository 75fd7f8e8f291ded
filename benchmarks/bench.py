"""The benchmark harness: every comparison side by side in one run, with the machine described.

    python benchmarks/bench.py            # the full run (about 10-15 minutes on 2 cores)
    python benchmarks/bench.py --quick    # every section on small counts, about a minute
    python benchmarks/bench.py --sections classifier,roofline

Writes build/bench/bench-<date>.json (every value) and build/bench/bench-<date>.md (tables
with a ratio per row), plus figures under build/bench/. Timings are reported, never asserted:
on a shared machine only ratios from the same run mean much. Needs the MNIST files (t10k is
the evaluation set); TensorFlow only in the child processes that run Keras.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.side_by_side import (  # noqa: E402
    brief_test, classifier, e2e_rates, footprint, reader_stages, roofline, scaling)
from benchmarks.side_by_side.context import ROOT, Context  # noqa: E402
from benchmarks.side_by_side.machine import describe_machine, machine_line  # noqa: E402
from benchmarks.side_by_side.report import Section, write_reports  # noqa: E402
from edge_agent.mnist import DataError, locate_data_dir  # noqa: E402

# In report order; section 4 (end to end at fixed trigger rates) is benchmarks/e2e_rates.py's.
SECTIONS = {module.KEY: module for module in (classifier, roofline, reader_stages, e2e_rates, scaling, footprint,
                                              brief_test)}
NO_DATA = 3  # exit status when the MNIST files are missing (the quick test skips on it)


def code_version() -> dict:
    """The commit measured, and which files of the measured code differ from it (others' work in progress)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "edge_agent", "models", "benchmarks", "quantize", "training")
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted": sorted(line[3:] for line in changed.splitlines() if line.strip())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: checks the harness, about a minute")
    parser.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="comma-separated sections to list as not run")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="reports, figures and logs")
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "bench",
                        help="models trained or converted for the comparison, the compiled probe (reused)")
    parser.add_argument("--data", help="MNIST folder (default: $MNIST_DIR or ../shared/datasets/mnist)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "mnist-int8")
    parser.add_argument("--keras-model", type=Path,
                        help="a trained model.keras of the bundle's architecture (default: build/train's, "
                             "else one trained here and cached under --out)")
    parser.add_argument("--stem", help="report file name without extension (default: bench-<date>[-quick])")
    args = parser.parse_args(argv)
    chosen = list(SECTIONS) if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [s for s in chosen + sorted(skipped) if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    try:
        data_dir = locate_data_dir(args.data)
    except DataError as exc:
        data_dir, reason = None, str(exc)
    else:
        reason = "no MNIST files: pass --data DIR, set $MNIST_DIR or place them in ../shared/datasets/mnist"
    if data_dir is None or not any(data_dir.glob("t10k-images*")) and not (data_dir / "mnist.npz").exists():
        print(f"bench: {reason}", file=sys.stderr)
        return NO_DATA

    today = date.today().isoformat()
    stem = args.stem or f"bench-{today}" + ("-quick" if args.quick else "")
    out_dir = args.out.resolve()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    ctx = Context(out_dir=out_dir, cache_dir=args.cache.resolve(), work_dir=work_dir, data_dir=data_dir.resolve(),
                  bundle=args.bundle.resolve(), quick=args.quick, stem=stem, keras_model=args.keras_model)
    machine = describe_machine()
    ctx.machine = machine
    ctx.log(f"{machine_line(machine)}; {'quick' if args.quick else 'full'} run of {', '.join(chosen)}")
    sections: list[Section] = []
    try:
        for key in chosen:
            module = SECTIONS[key]
            if key in skipped:
                section = Section(key, module.TITLE, data={"skipped": "--skip"},
                                  notes=["Not run: skipped on the command line (`--skip`)."])
                sections.append(section)
                continue
            started = time.monotonic()
            ctx.log(f"section {key} ...")
            try:
                section = module.run(ctx)
            except Exception as exc:  # one broken section must not lose the others' figures
                traceback.print_exc()
                section = Section(key, module.TITLE, error=f"{type(exc).__name__}: {exc}")
            section.seconds = time.monotonic() - started
            ctx.results[key] = section
            sections.append(section)
            ctx.log(f"section {key} done in {section.seconds:.0f} s" + (f" ({section.error})" if section.error else ""))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = {"date": today, "quick": args.quick, "sections_run": chosen, "machine": machine,
              "machine_line": machine_line(machine), "seconds": round(time.monotonic() - ctx.started, 1),
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "data_dir": str(data_dir), "bundle": str(args.bundle), "code": code_version()}
    json_path, md_path = write_reports(out_dir, stem, report, sections)
    print(f"bench: wrote {json_path} and {md_path}")
    failed = [s.key for s in sections if s.error]
    if failed:
        print(f"bench: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
