"""Read MNIST-format digit data (IDX files, gzipped or raw, or a Keras ``mnist.npz``).

Pure NumPy so that training, quantisation, the demo renderer and the tests share
one reader without pulling TensorFlow into the site install.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
SHARED_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mnist"


class DataError(Exception):
    """MNIST data is missing or malformed."""


@dataclass(frozen=True)
class DigitSet:
    """Images (N, 28, 28) uint8, white ink on black, with labels (N,) uint8."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.shape[1:] != (28, 28):
            raise DataError(f"images must be (N, 28, 28), got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "DigitSet":
        return DigitSet(self.images[indices], self.labels[indices])


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (big-endian header, uint8 payload)."""
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic {magic}, expected {expected_magic}")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
    if payload.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {payload.size} bytes")
    return payload.reshape(dims)


def _find(directory: Path, prefix: str, kind: str) -> Path | None:
    """Pick e.g. train-images-idx3-ubyte(.gz), preferring the full set over a subset."""
    magic_suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    candidates = sorted(
        p for p in directory.glob(f"{prefix}*-{kind}-{magic_suffix}*")
        if p.name.endswith((magic_suffix, magic_suffix + ".gz"))
    )
    if not candidates:
        return None
    # "train-images" (60k) sorts before "train-5k-images"; prefer the shorter (full) name.
    return min(candidates, key=lambda p: len(p.name))


def load_split(directory: Path, split: str) -> DigitSet:
    """Load split 'train' or 'test' (t10k) from a folder of IDX files or an mnist.npz."""
    directory = Path(directory)
    npz = directory / "mnist.npz"
    if npz.exists():
        with np.load(npz) as data:
            key = "train" if split == "train" else "test"
            return DigitSet(data[f"x_{key}"].astype(np.uint8), data[f"y_{key}"].astype(np.uint8))
    prefix = "train" if split == "train" else "t10k"
    images_path = _find(directory, prefix, "images")
    labels_path = _find(directory, prefix, "labels")
    if images_path is None or labels_path is None:
        raise DataError(f"no {prefix}-*images/labels IDX files or mnist.npz in {directory}")
    # Labels must come from the same subset as the images (train-5k with train-5k).
    stem = images_path.name.split("-images")[0]
    paired = directory / labels_path.name.replace(labels_path.name.split("-labels")[0], stem, 1)
    if paired.exists():
        labels_path = paired
    return DigitSet(read_idx(images_path, IMAGE_MAGIC), read_idx(labels_path, LABEL_MAGIC))


def locate_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """--data, then $MNIST_DIR, then ../shared/datasets/mnist; None when none exists."""
    candidates: list[Path] = []
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"--data {path} is not a directory")
        return path
    if os.environ.get("MNIST_DIR"):
        candidates.append(Path(os.environ["MNIST_DIR"]))
    candidates += [Path.cwd().parent / "shared" / "datasets" / "mnist", SHARED_DATA_DIR]
    for path in candidates:
        if path.is_dir():
            return path
    return None
