"""Training digits as the agent sees them (training.reader_crops): each crop keeps its digit's label."""

from __future__ import annotations

import numpy as np

from edge_agent.render import load_demo_digits
from tests.paths import SHIPPED_BUNDLE


def test_reader_crops_are_the_readers_cut_outs_with_their_own_labels():
    from edge_agent.loader import load_bundle
    from training.reader_crops import reader_crops

    demo = load_demo_digits()
    digits = demo.subset(np.arange(0, 300, 3))  # 100 digits, 10 per class
    crops = reader_crops(digits, copies=2, seed=3)
    # Whole postcodes only: a frame the reader miscounts gives none of its crops.
    assert len(crops) % 5 == 0 and 0.9 * 200 <= len(crops) <= 200
    assert crops.images.dtype == np.uint8 and crops.images.shape[1:] == (28, 28)
    assert np.bincount(crops.labels, minlength=10).min() > 0
    # Labels line up with the crops: the shipped model reads them as it reads digits in frames.
    model = load_bundle(SHIPPED_BUNDLE)
    predicted = model.classifier.classify(crops.images).labels
    assert np.mean(np.asarray(predicted) == crops.labels) > 0.95
    # Reproducible from the seed (training and quantize must see the same crops).
    again = reader_crops(digits, copies=2, seed=3)
    assert np.array_equal(again.images, crops.images) and np.array_equal(again.labels, crops.labels)
