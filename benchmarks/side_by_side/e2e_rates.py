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

KEY = "e2e_rates"
TITLE = "4. End to end through Mosquitto at 10/50/100/300 triggers/s"

SCRIPT = ROOT / "benchmarks" / "e2e_rates.py"


def run(ctx: Context) -> Section:
    section = Section(KEY, TITLE)
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
    section.tables += tables_of(result)
    return section


def _cell(value: object) -> object:
    """A nested value in one cell: a dict as "key value, ...", anything else as it is."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return value


def tables_of(result: object, title: str = "") -> list[Table]:
    """Tables for whatever JSON the script printed: a list of objects is a table, an object is a table of
    its plain values (at the top level each object value gets its own table), a small object is a cell."""
    if isinstance(result, list) and result and all(isinstance(v, dict) for v in result):
        columns = list(dict.fromkeys(k for row in result for k in row))
        return [Table(title, columns, [[_cell(row.get(c)) for c in columns] for row in result])]
    if not isinstance(result, dict):
        return [Table(title, ["", "value"], [[title or "result", _cell(result)]])]
    rows, tables = [], []
    for key, value in result.items():
        nested = isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values())
        if isinstance(value, list) or (isinstance(value, dict) and (not title or nested)):
            tables += tables_of(value, f"{title} {key}".strip())
        else:
            rows.append([key, _cell(value)])
    return ([Table(title, ["", "value"], rows)] if rows else []) + tables


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
