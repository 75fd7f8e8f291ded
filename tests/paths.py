"""Where tests find the shipped bundle and the (optional) MNIST data."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.mnist import load_split, locate_data_dir

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = ROOT / "models" / "mnist-int8"
DEMO_DIGITS = ROOT / "edge_agent" / "assets" / "demo_digits.npz"  # 300 MNIST training digits, committed once


def mnist_dir() -> Path:
    """The MNIST folder, or skip the test saying why."""
    directory = locate_data_dir(None)
    if directory is None:
        pytest.skip("MNIST data not available (set $MNIST_DIR or provide ../shared/datasets/mnist)")
    return directory


def mnist_split(split: str):
    return load_split(mnist_dir(), split)
