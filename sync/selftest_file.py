"""The self-test file's bytes, the same on every machine and every run (standard library only).

``np.savez_compressed`` stamps each member with the time it was written, so writing the same
digits twice gave a new file and a new sha256 each time. The shipped bundle's self-test could
then not be rebuilt to match its manifest, and was committed: a copy of MNIST digits kept
twice in the repository. Here members are stored (no compression: no dependence on the zlib
build) with a fixed date, so the file is a function of the digits alone; ``setup.py`` builds
the shipped one from the demo digits (``edge_agent/assets/demo_digits.npz``) at install.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

MEMBERS = ("images.npy", "labels.npy")  # what np.load(...)["images"] and ["labels"] read
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say


def selftest_npz_bytes(members: dict[str, bytes]) -> bytes:
    """An .npz holding the given .npy members (``MEMBERS``), byte for byte reproducible."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in MEMBERS:
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name])
    return out.getvalue()


def build_shipped_selftest(bundle: Path, demo_digits: Path) -> Path:
    """Write ``bundle``'s self-test from the demo digits' own .npy members; refuse (ValueError)
    if the result is not the file the bundle's manifest names by sha256."""
    bundle = Path(bundle)
    entry = json.loads((bundle / "manifest.json").read_text(encoding="utf-8")).get("selftest")
    if not isinstance(entry, dict):
        raise ValueError(f"{bundle}/manifest.json names no self-test")
    with zipfile.ZipFile(demo_digits) as archive:
        data = selftest_npz_bytes({name: archive.read(name) for name in MEMBERS})
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ValueError(f"the self-test built from {demo_digits} does not match {bundle}/manifest.json")
    target = bundle / entry["file"]
    if not target.is_file() or target.read_bytes() != data:
        target.write_bytes(data)
    return target
