"""Section 4 (hook): end to end through Mosquitto at fixed trigger rates, by ``benchmarks/e2e_rates.py``.

That script belongs to the end-to-end work (10/50/100/300 triggers/s with a new frame each,
a burst of 500 distinct envelopes); this section only runs it when it exists, passes
``--quick`` through, and puts the JSON it prints on stdout into the report: lists of objects
become tables, everything else is kept as it came.
"""

from __future__ import annotations

import json
import subprocess

from benchmarks.side_by_side.context import ROOT, Context
from benchmarks.side_by_side.report import Section, Table

SCRIPT = ROOT / "benchmarks" / "e2e_rates.py"


def run(ctx: Context) -> Section:
    section = Section("e2e_rates", "4. End to end through Mosquitto at 10/50/100/300 triggers/s")
    if not SCRIPT.exists():
        section.data["skipped"] = "benchmarks/e2e_rates.py does not exist yet"
        section.notes.append("Not run: `benchmarks/e2e_rates.py` is not in this checkout yet (the end-to-end "
                             "work adds it; this section runs it when it is there).")
        return section
    cmd = [ctx.python, str(SCRIPT)] + (["--quick"] if ctx.quick else [])
    log_path = ctx.out_dir / "logs" / "e2e_rates.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=ctx.env(), stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=ctx.pick(300, 1800))
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} exited {done.returncode} (log: {log_path})")
    result = _last_json(done.stdout)
    section.data["result"] = result
    for key, value in (result.items() if isinstance(result, dict) else [("result", result)]):
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            section.tables.append(Table(str(key), columns, [[row.get(c) for c in columns] for row in value]))
    scalars = {k: v for k, v in result.items() if not isinstance(v, (list, dict))} if isinstance(result, dict) else {}
    if scalars:
        section.tables.append(Table("", ["", "value"], [[k, v] for k, v in scalars.items()]))
    return section


def _last_json(stdout: str) -> object:
    """The whole of stdout as JSON, or else its last line that parses."""
    try:
        return json.loads(stdout)
    except ValueError:
        pass
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise RuntimeError("e2e_rates.py printed no JSON on stdout")
