"""The site's sort plan: which postcodes exist and the chute (bin) each one goes to.

A CSV with the header ``postcode,chute``. A row is either one postcode (digits, leading zeros
kept: ``01234,7``) or a region prefix ending in ``*`` (``75*,12``: every postcode of an allowed
length starting with 75, for offices that sort by region). Where rows overlap, the most
specific wins: an exact postcode over a prefix, a longer prefix over a shorter one.

Parsing is pure; ``load_sort_plan`` is the only file access. Every mistake is one line naming
its line number, so a planner can fix the file from the error event alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

HEADER = ("postcode", "chute")
MAX_ERRORS = 20  # one bad export can have thousands of bad rows: the first ones say enough


class SortPlanError(ValueError):
    """The plan cannot be used; ``errors`` holds one line per mistake (line numbers included)."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class LengthIndex:
    """The plan for postcodes of one length, as arrays the decoder can score in one pass."""

    length: int
    codes: np.ndarray  # (n, length) digits of the exact postcodes
    code_chutes: np.ndarray  # (n,) chute index of each
    code_cover: np.ndarray  # (n,) index of the longest prefix covering the code, -1 if none
    prefixes: tuple[str, ...]  # region prefixes shorter than ``length``
    prefix_chutes: np.ndarray  # (m,) chute index of each prefix
    prefix_parent: np.ndarray  # (m,) index of the longest shorter prefix covering it, -1 if none
    valid_count: int  # how many postcodes of this length are valid (exact or covered by a prefix)

    @cached_property
    def flat_positions(self) -> np.ndarray:
        """(length, n): where each code's digit sits in a flattened (length, 10) probability array,
        one contiguous row per position, so the decoder gathers a column at a time."""
        return np.ascontiguousarray(self.codes.T + 10 * np.arange(self.length)[:, None])


@dataclass(frozen=True)
class SortPlan:
    """Valid postcodes and their chutes, ready for the decoder."""

    exact: dict[str, str]  # postcode -> chute
    prefixes: dict[str, str]  # region prefix (digits, no '*') -> chute
    lengths: tuple[int, ...]  # postcode lengths the site accepts
    sha256: str  # of the file's bytes: which plan decided a result
    source: str = ""
    chutes: tuple[str, ...] = ()  # chute names; the index's chute numbers point here
    by_length: dict[int, LengthIndex] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Rows in the plan (exact postcodes plus prefixes)."""
        return len(self.exact) + len(self.prefixes)

    @property
    def valid_share(self) -> float:
        """The largest share, over the plan's postcode lengths, of the codes of that length that are
        valid here: how likely a digit misread lands on another valid code rather than a dead one."""
        return max((index.valid_count / 10 ** index.length for index in self.by_length.values()), default=0.0)

    def summary(self) -> dict[str, object]:
        """What every result and the health event carry about the plan that decided."""
        return {"rows": self.size, "sha256": self.sha256[:16]}

    def chute_for(self, postcode: str) -> str | None:
        """The chute a postcode goes to, or None if it is not a valid postcode here."""
        if len(postcode) not in self.lengths:
            return None
        if postcode in self.exact:
            return self.exact[postcode]
        prefix = self.covering_prefix(postcode)
        return self.prefixes[prefix] if prefix is not None else None

    def covering_prefix(self, postcode: str) -> str | None:
        """The longest prefix row that covers ``postcode``, if any."""
        for n in range(len(postcode) - 1, 0, -1):
            if postcode[:n] in self.prefixes:
                return postcode[:n]
        return None


def parse_sort_plan(data: bytes, source: str = "sort plan", lengths: tuple[int, ...] = (5,)) -> SortPlan:
    """Parse the CSV; SortPlanError lists every bad row (up to MAX_ERRORS) with its line number."""
    errors: list[str] = []
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's export often starts with a BOM
    except UnicodeDecodeError as exc:
        raise SortPlanError([f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        raise SortPlanError([f"{source}: empty file; expected the header row postcode,chute"])
    header = [h.strip().lower() for h in header]
    if tuple(header) != HEADER:
        unknown = [h for h in header if h not in HEADER]
        detail = f" (unknown column(s): {', '.join(unknown)})" if unknown else ""
        raise SortPlanError([f"{source}:1: header must be exactly postcode,chute, got {','.join(header)}{detail}"])
    exact: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    seen_at: dict[str, int] = {}
    longest = max(lengths)
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines are harmless
        where = f"{source}:{line_no}"
        if len(row) != 2:
            errors.append(f"{where}: expected 2 columns (postcode,chute), got {len(row)}")
        else:
            code, chute = row[0].strip(), row[1].strip()
            problem = _row_problem(code, chute, lengths, longest)
            if problem:
                errors.append(f"{where}: {problem}")
            elif code in seen_at:
                errors.append(f"{where}: {code} is listed twice (first on line {seen_at[code]})")
            else:
                seen_at[code] = line_no
                if code.endswith("*"):
                    prefixes[code[:-1]] = chute
                else:
                    exact[code] = chute
        if len(errors) >= MAX_ERRORS:
            errors.append(f"{source}: stopped after {MAX_ERRORS} errors")
            break
    if not errors and not exact and not prefixes:
        errors.append(f"{source}: the plan lists no postcodes: refusing an empty plan "
                      "(every envelope would go to review)")
    if errors:
        raise SortPlanError(errors)
    return _build(exact, prefixes, tuple(sorted(set(lengths))), hashlib.sha256(data).hexdigest(), source)


def _row_problem(code: str, chute: str, lengths: tuple[int, ...], longest: int) -> str:
    if not chute:
        return f"{code or 'row'} has no chute"
    if len(chute) > 64 or any(c in chute for c in "\n\r\"'"):
        return f"chute {chute!r} is not a plain name of at most 64 characters"
    if "*" in code:
        digits = code[:-1]
        if not code.endswith("*") or not digits.isdigit() or not digits.isascii():
            return f"prefix {code!r} must be digits followed by one '*' (e.g. 75*)"
        if len(digits) >= longest:
            return f"prefix {code!r} is as long as a whole postcode; list the postcode itself"
        return ""
    if not code.isdigit() or not code.isascii():
        return f"postcode {code!r} must be digits only (leading zeros kept; a spreadsheet may have dropped them)"
    if len(code) not in lengths:
        hint = " (a spreadsheet may have dropped a leading zero)" if len(code) < min(lengths) else ""
        return f"postcode {code!r} has {len(code)} digits; this site reads {'/'.join(map(str, lengths))}{hint}"
    return ""


def _build(exact: dict[str, str], prefixes: dict[str, str], lengths: tuple[int, ...], sha: str,
           source: str) -> SortPlan:
    chutes = tuple(sorted(set(exact.values()) | set(prefixes.values())))
    chute_id = {name: i for i, name in enumerate(chutes)}
    plan = SortPlan(exact=exact, prefixes=prefixes, lengths=lengths, sha256=sha, source=source, chutes=chutes)
    for length in lengths:
        shorter = tuple(sorted((p for p in prefixes if len(p) < length), key=lambda p: (len(p), p)))
        position = {p: i for i, p in enumerate(shorter)}

        def cover(code: str, below: int) -> int:
            for n in range(min(len(code), below) - 1, 0, -1):
                if code[:n] in position:
                    return position[code[:n]]
            return -1

        codes = [c for c in exact if len(c) == length]
        digits = (np.frombuffer("".join(codes).encode("ascii"), np.uint8).reshape(len(codes), length)
                  .astype(np.int64) - ord("0")) if codes else np.zeros((0, length), np.int64)
        code_cover = np.array([cover(c, length) for c in codes], np.int64)
        prefix_parent = np.array([cover(p, len(p)) for p in shorter], np.int64)
        roots = [p for p, parent in zip(shorter, prefix_parent) if parent < 0]
        covered = sum(10 ** (length - len(p)) for p in roots)
        uncovered_exact = int(np.sum(code_cover < 0))
        plan.by_length[length] = LengthIndex(
            length=length, codes=digits,
            code_chutes=np.array([chute_id[exact[c]] for c in codes], np.int64), code_cover=code_cover,
            prefixes=shorter, prefix_chutes=np.array([chute_id[prefixes[p]] for p in shorter], np.int64),
            prefix_parent=prefix_parent, valid_count=covered + uncovered_exact)
    return plan


def load_sort_plan(path: Path, lengths: tuple[int, ...] = (5,)) -> SortPlan:
    """Read and parse the plan file; SortPlanError (never OSError) if it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SortPlanError([f"{path}: cannot read the sort plan: {exc.strerror or exc}"]) from None
    return parse_sort_plan(data, str(path), lengths)
