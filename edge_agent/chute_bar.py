"""The spent chute bar's recent posteriors, kept across restarts in one JSON file beside the outbox.

Without it every restart (an upgrade, a crash, a power cut) holds each item to the strict bar
until a quarter of the window is read again: about 500 envelopes, several points of sorted mail
fewer. The posteriors only mean something for the model, calibration, plan and invalid-code prior
that produced them, so the file names all four and is ignored for any other combination.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = 1


def bar_key(model_sha256: str, temperature: float, plan_sha256: str, invalid_prior: float) -> dict[str, object]:
    """What the kept posteriors depend on."""
    return {"model_sha256": model_sha256, "temperature": float(temperature), "plan_sha256": plan_sha256,
            "invalid_prior": float(invalid_prior)}


def keep(path: Path, key: dict[str, object], posteriors: list[float]) -> None:
    """Write the posteriors under ``key``, whole or not at all (a new file renamed over the old)."""
    text = json.dumps({"format": FORMAT, "key": key, "posteriors": posteriors})
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(partial, path)


def kept(path: Path, key: dict[str, object]) -> list[float] | None:
    """The posteriors kept under ``key``; None when there are none or they were kept for another
    model, plan or prior. Raises ValueError for a file that is not one this module wrote."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("posteriors"), list):
        raise ValueError(f"not a chute bar file of format {FORMAT}")
    if data.get("key") != key:
        return None
    posteriors = data["posteriors"]
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in posteriors):
        raise ValueError("the posteriors must be numbers")
    return [float(p) for p in posteriors]
