"""The report's shape: sections of tables and notes, written as JSON (all values) and Markdown (tables)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Table:
    """One Markdown table: a title, column names and rows of values (numbers are formatted on output)."""

    title: str
    columns: list[str]
    rows: list[list]


@dataclass
class Section:
    """What one section measured: ``data`` (all numbers, for the JSON), tables and notes (for people)."""

    key: str
    title: str
    data: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def fmt(value: object) -> str:
    """Numbers to a readable precision: 3 significant figures, thousands separated."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        if magnitude == 0:
            return "0"
        return f"{value:.3g}"
    return str(value)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference or math.isnan(value) or math.isnan(reference):
        return None
    return value / reference


def times(value: float | None) -> str:
    """A ratio as "2.4×"."""
    return "–" if value is None else f"{fmt(value)}×"


def markdown(report: dict, sections: list[Section]) -> str:
    lines = [f"# Benchmarks side by side, {report['date']}", "",
             f"Machine: {report['machine_line']}.", "",
             f"Mode: {'quick (small counts: shapes, not figures)' if report['quick'] else 'full'}; "
             f"total {report['seconds']:.0f} s; load average {report['machine']['load_average_at_start']} at the "
             f"start, {report['load_average_at_end']} at the end (2 cores: above 2 means other jobs were "
             "waiting for a core). Compare within a table; ratios are from the same run.", "",
             f"Code: commit {report['code']['commit']}"
             + (f", with uncommitted changes in {', '.join(report['code']['uncommitted'])}"
                if report["code"]["uncommitted"] else "") + ".", "",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in report["machine"]["libraries"].items() if v)
             + f", Python {report['machine']['python']}, Mosquitto {report['machine']['mosquitto'] or '–'}.", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.error:
            lines += [f"**Not measured:** {section.error}", ""]
        for note in section.notes:
            lines += [note, ""]
        for table in section.tables:
            if table.title:
                lines += [f"**{table.title}**", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "|".join("---" for _ in table.columns) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
            lines.append("")
        lines += [f"_{section.seconds:.0f} s_", ""]
    return "\n".join(lines)


def write_reports(out_dir: Path, stem: str, report: dict, sections: list[Section]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(report)
    payload["sections"] = {s.key: {"title": s.title, "seconds": round(s.seconds, 1), "error": s.error,
                                   "notes": s.notes, "data": s.data,
                                   "tables": [asdict(t) for t in s.tables]} for s in sections}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    md_path.write_text(markdown(report, sections))
    return json_path, md_path


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
