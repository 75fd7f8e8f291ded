"""Digits as the agent sees them: written into envelope frames and cut out again by the reader.

The classifier never sees a clean MNIST digit at a site. It sees what ``locate_digits`` cuts
out of a camera frame: re-binarised, re-centred, blurred, sometimes clipped or with a speck of
the neighbour's ink. On those crops the reference model is less accurate (98.3% against 99%
on validation digits) and over-confident (the temperature that fits them is about 2, against
1.3 on clean digits). Training and calibrating on crops of our own training and validation
digits closes that gap without ever looking at the test set. No TensorFlow here: the quantizer
uses the same crops to fit the temperature.
"""

from __future__ import annotations

import numpy as np

from edge_agent.mnist import DigitSet
from edge_agent.reader import ReaderConfig, locate_digits
from edge_agent.render import fit_digit_height, random_conditions, render_postcode_frame

POSTCODE_LENGTH = 5
FRAME_SIZE = (640, 480)


def reader_crops(digits: DigitSet, copies: int, seed: int, length: int = POSTCODE_LENGTH) -> DigitSet:
    """``copies`` reader crops of each digit: every pass shuffles the digits into postcodes of
    ``length``, renders each as a frame under random conditions and keeps the reader's crops
    of the frames it segments into exactly ``length`` digits (so each crop's label is known)."""
    rng = np.random.default_rng(seed)
    config = ReaderConfig(expected_lengths=(length,))
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for _ in range(copies):
        order = rng.permutation(len(digits))
        for start in range(0, len(order) - length + 1, length):
            picks = order[start:start + length]
            cond = fit_digit_height(random_conditions(rng), length, FRAME_SIZE)
            frame = render_postcode_frame(list(digits.images[picks]), rng, FRAME_SIZE, **cond.__dict__)
            located = locate_digits(frame, config)
            if len(located.digits) != length:
                continue  # which crop is which digit is unknown: a miscount teaches nothing
            images.append(np.asarray(located.digits, np.uint8))
            labels.append(digits.labels[picks])
    if not images:
        return DigitSet(np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8))
    return DigitSet(np.concatenate(images), np.concatenate(labels).astype(np.uint8))
