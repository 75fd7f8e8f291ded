"""Training data: locate it, load it, and split a stratified validation hold-out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_agent.mnist import DataError, DigitSet, load_split, locate_data_dir

log = logging.getLogger(__name__)

NO_DATA_HELP = (
    "no MNIST data: pass --data DIR (IDX files or mnist.npz), set $MNIST_DIR, "
    "or place the files in ../shared/datasets/mnist"
)


def load_training_data(data_dir: str | Path | None) -> tuple[DigitSet, DigitSet | None, str]:
    """Return (train, test-or-None, description of the source)."""
    directory = locate_data_dir(data_dir)
    if directory is not None:
        train = load_split(directory, "train")
        try:
            test = load_split(directory, "test")
        except DataError:
            test = None
        return train, test, str(directory)
    return (*_download_with_keras(), "keras.datasets.mnist")


def _download_with_keras() -> tuple[DigitSet, DigitSet]:
    import keras  # deferred: only this fallback needs it

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # offline: urllib raises a variety of errors
        raise DataError(f"{NO_DATA_HELP} (download failed: {exc})") from exc
    return DigitSet(x_train, y_train), DigitSet(x_test, y_test)


def stratified_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with ``per_class`` validation items of every class."""
    rng = np.random.default_rng(seed)
    validation = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        if len(members) <= per_class:
            raise DataError(f"class {digit} has {len(members)} images, need more than {per_class}")
        validation.append(rng.choice(members, size=per_class, replace=False))
    validation_idx = np.sort(np.concatenate(validation))
    train_idx = np.setdiff1d(np.arange(len(labels)), validation_idx)
    return rng.permutation(train_idx), validation_idx
