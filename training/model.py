"""The models edge-train can build: the data scientist's reference CNN, unchanged, and candidates.

Every architecture is a ``keras.Sequential`` on 28x28x1 inputs in [0, 1] that ends in a
``Dense(10, softmax)``: quantize/convert.py cuts the graph at that layer's logits, which
needs the last layer to be one dense layer and Flatten to be replaceable by a reshape.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers


def build_model() -> keras.Model:
    """Conv32-Conv64-MaxPool-Dropout-Dense128-Dropout-Dense10 on 28x28x1 inputs in [0, 1]."""
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="digit"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="mnist_cnn",
    )


def _conv_bn(filters: int, size: int) -> list[keras.layers.Layer]:
    # No bias: batch normalisation's offset replaces it, and the converter folds both into the conv.
    return [layers.Conv2D(filters, size, padding="same", use_bias=False), layers.BatchNormalization(),
            layers.ReLU()]


def build_bn_cnn() -> keras.Model:
    """Conv32(5x5)-Conv64-Conv128, each with batch norm and a 2x2 pool, Dense128-BN, Dropout, Dense10.

    About 8 M multiply-adds and 0.24 M parameters per digit (the reference: 12 M and 1.2 M):
    pooling early keeps the compute low enough that three of them fit in one frame's budget.
    """
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="digit"),
            *_conv_bn(32, 5),
            layers.MaxPooling2D(2),  # 14x14
            *_conv_bn(64, 3),
            layers.MaxPooling2D(2),  # 7x7
            *_conv_bn(128, 3),
            layers.MaxPooling2D(2),  # 3x3
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dropout(0.4),
            layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="bn_cnn",
    )


ARCHITECTURES: dict[str, Callable[[], keras.Model]] = {
    "mnist_cnn": build_model,
    "bn_cnn": build_bn_cnn,
}


def build_architecture(name: str) -> keras.Model:
    """A fresh, untrained model of the named architecture."""
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}") from None
