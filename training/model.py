"""The data scientist's model: the classic Keras MNIST CNN, unchanged."""

from __future__ import annotations

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
