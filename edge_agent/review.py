"""Keep the digit crops of reads that went to human review, for labelling; bounded on disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from edge_agent.types import LocatedDigits, PostcodeRead

log = logging.getLogger(__name__)

# Crops are pictures of people's handwriting and the reads name their items: owner-only,
# set explicitly so a permissive umask (a shell, a test runner) cannot widen them.
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def _make_private_folder(folder: Path) -> None:
    folder.mkdir(mode=FOLDER_MODE, parents=True)
    os.chmod(folder, FOLDER_MODE)  # mkdir's mode is narrowed by the umask; this makes it exact


def _write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) readable and writable by its owner only."""
    # O_EXCL: never write through a link or into a file someone else made.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with open(fd, "wb") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        handle.write(data)


CROPS_FILE = "digits.png"  # the item's digit crops side by side, 28 px each, left to right
READ_FILE = "read.json"


def crops_strip_png(digits: np.ndarray) -> bytes | None:
    """The digit crops side by side (28 x 28N, left to right) as PNG bytes; None when there are none."""
    digits = np.asarray(digits)
    if digits.ndim != 3 or len(digits) == 0:
        return None
    ok, png = cv2.imencode(".png", np.hstack(list(digits)))
    if not ok:
        raise OSError("the digit crops could not be encoded as PNG")
    return png.tobytes()


class ReviewStore:
    """One folder per reviewed item: the digit crops as one PNG strip and the read as JSON;
    oldest removed first. Two files, not one per digit: at 50 items/s a third of them reviewed,
    the per-file work (create, mode, write; remove the oldest) was the agent's largest cost
    after the reads."""

    def __init__(self, directory: Path, max_items: int):
        self.directory = Path(directory)
        self.max_items = max_items
        self.directory.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        try:
            os.chmod(self.directory, FOLDER_MODE)
        except PermissionError:
            # A folder prepared by someone else (e.g. root with group write for us): usable, but its
            # mode is theirs to set.
            log.warning("review folder %s is not ours to make owner-only; check its permissions",
                        self.directory)
        self._items = sorted(p for p in self.directory.iterdir() if p.is_dir())

    def save(self, read: PostcodeRead, located: LocatedDigits | None) -> Path | None:
        """Store crops and the read; a full disk is logged, never raised into the read path."""
        folder = self.directory / f"{int(read.captured_at * 1000):015d}-{read.result_id}"
        try:
            _make_private_folder(folder)
            strip = crops_strip_png(located.digits) if located is not None else None
            if strip is not None:
                _write_private_file(folder / CROPS_FILE, strip)
            # No indent: json's C encoder is used only without one (with it, this dump took
            # two thirds of the review thread's interpreter time under a burst).
            _write_private_file(folder / READ_FILE, json.dumps(read.to_payload()).encode())
        except OSError as exc:
            log.error("could not keep review crops in %s: %s", folder, exc)
            return None
        self._items.append(folder)
        while len(self._items) > self.max_items:
            shutil.rmtree(self._items.pop(0), ignore_errors=True)
        return folder
