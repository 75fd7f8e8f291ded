"""Review crops: owner-only on disk whatever the process umask, bounded in number."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.review import ReviewStore
from edge_agent.types import DigitRead, LocatedDigits, PostcodeRead, Reason


def review_read(n: int) -> PostcodeRead:
    return PostcodeRead(result_id=f"r{n}", item_id=f"item-{n}", postcode="12?45", accepted=False,
                        confidence=0.4, digits=(DigitRead(1, 0.99), DigitRead(2, 0.4)),
                        reason=Reason.LOW_CONFIDENCE, model_version="1.0.0", captured_at=1_700_000_000.0 + n,
                        latency_ms=9.0)


def two_digits() -> LocatedDigits:
    digits = np.zeros((2, 28, 28), np.uint8)
    digits[:, 10:18, 12:16] = 255
    return LocatedDigits(digits=digits, boxes=((0, 0, 28, 28), (30, 0, 28, 28)))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# 0o000 would leave files 0666 and folders 0777 without explicit modes; 0o277 would leave the
# owner unable to write into a new folder.
@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_review_folders_are_0700_and_files_0600_whatever_the_umask(tmp_path, umask):
    store = ReviewStore(tmp_path / "review", max_items=10)
    folder = store.save(review_read(1), two_digits())
    assert folder is not None
    assert mode(store.directory) == 0o700
    assert mode(folder) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["digits.png", "read.json"]
    assert {p.name: mode(p) for p in folder.iterdir()} == {name: 0o600 for name in files}
    assert json.loads((folder / "read.json").read_text())["item_id"] == "item-1"


def test_an_existing_review_folder_is_made_owner_only(tmp_path):
    directory = tmp_path / "review"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    ReviewStore(directory, max_items=10)
    assert mode(directory) == 0o700


def test_saved_crops_decode_to_the_digits(tmp_path):
    import cv2

    folder = ReviewStore(tmp_path / "review", max_items=10).save(review_read(1), two_digits())
    strip = cv2.imread(str(folder / "digits.png"), cv2.IMREAD_GRAYSCALE)
    assert strip.shape == (28, 2 * 28)  # the crops side by side, left to right
    for i, digit in enumerate(two_digits().digits):
        np.testing.assert_array_equal(strip[:, 28 * i: 28 * (i + 1)], digit)


def test_oldest_review_items_are_removed_past_max_items(tmp_path):
    store = ReviewStore(tmp_path / "review", max_items=2)
    folders = [store.save(review_read(n), None) for n in range(3)]
    assert not folders[0].exists()
    assert folders[1].exists() and folders[2].exists()


def test_an_unwritable_review_folder_is_logged_not_raised(tmp_path, caplog):
    store = ReviewStore(tmp_path / "review", max_items=10)
    store.directory.rmdir()
    store.directory.parent.joinpath("review").write_text("now a file")  # mkdir under it fails
    assert store.save(review_read(1), two_digits()) is None
    assert "could not keep review crops" in caplog.text
