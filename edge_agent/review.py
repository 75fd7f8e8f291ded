"""Keep the digit crops of reads that went to human review, for labelling; bounded on disk."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np

from edge_agent.types import LocatedDigits, PostcodeRead

log = logging.getLogger(__name__)


class ReviewStore:
    """One folder per reviewed item: digit crops as PNG and the read as JSON; oldest removed first."""

    def __init__(self, directory: Path, max_items: int):
        self.directory = Path(directory)
        self.max_items = max_items
        self.directory.mkdir(parents=True, exist_ok=True)
        self._items = sorted(p for p in self.directory.iterdir() if p.is_dir())

    def save(self, read: PostcodeRead, located: LocatedDigits | None) -> Path | None:
        """Store crops and the read; a full disk is logged, never raised into the read path."""
        folder = self.directory / f"{int(read.captured_at * 1000):015d}-{read.result_id}"
        try:
            folder.mkdir(parents=True)
            if located is not None:
                for i, digit in enumerate(np.asarray(located.digits)):
                    cv2.imwrite(str(folder / f"digit-{i}.png"), digit)
            (folder / "read.json").write_text(json.dumps(read.to_payload(), indent=1))
        except OSError as exc:
            log.error("could not keep review crops in %s: %s", folder, exc)
            return None
        self._items.append(folder)
        while len(self._items) > self.max_items:
            shutil.rmtree(self._items.pop(0), ignore_errors=True)
        return folder
