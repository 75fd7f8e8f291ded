"""Augmentation for a 5k-image training set: geometry and stroke thickness, as real handwriting varies."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers


def build_augmenter(seed: int) -> keras.Sequential:
    """Small rotations, shifts and scale changes (a postcode digit is never upside down)."""
    return keras.Sequential(
        [
            layers.RandomRotation(0.035, fill_mode="constant", seed=seed),  # about +/-12 degrees
            layers.RandomZoom((-0.15, 0.15), fill_mode="constant", seed=seed + 1),
            layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed + 2),
        ],
        name="augment",
    )


def vary_stroke_thickness(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Per image: thicken (grey dilation), thin (grey erosion) or keep the stroke, a third each."""
    thick = tf.nn.max_pool2d(images, ksize=2, strides=1, padding="SAME")
    thin = -tf.nn.max_pool2d(-images, ksize=2, strides=1, padding="SAME")
    choice = tf.random.stateless_uniform(
        [tf.shape(images)[0], 1, 1, 1], seed=tf.stack([seed, 0]), maxval=3, dtype=tf.int32
    )
    return tf.where(choice == 0, thick, tf.where(choice == 1, thin, images))


def augmented_dataset(images, labels, batch_size: int, seed: int) -> tf.data.Dataset:
    """Shuffled, augmented batches of float images in [0, 1] with shape (B, 28, 28, 1)."""
    augmenter = build_augmenter(seed)
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    def augment(batch_images, batch_labels):
        step = counter.assign_add(1)
        batch_images = augmenter(batch_images, training=True)
        batch_images = vary_stroke_thickness(batch_images, tf.cast(step, tf.int32) + seed)
        return tf.clip_by_value(batch_images, 0.0, 1.0), batch_labels

    x = tf.cast(images[..., None], tf.float32) / 255.0
    return (
        tf.data.Dataset.from_tensor_slices((x, labels))
        .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(augment, num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )


def elastic_copies(images: np.ndarray, copies: int, seed: int, alpha: float = 12.0,
                   sigma: float = 3.5) -> np.ndarray:
    """Elastic distortions (Simard et al. 2003): smooth random displacement fields, like hand tremor.

    Returns ``copies`` distorted versions of every image, (copies * N, 28, 28) uint8.
    """
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:28, 0:28].astype(np.float32)
    out = np.empty((copies * len(images), 28, 28), dtype=np.uint8)
    for i in range(copies * len(images)):
        dx = cv2.GaussianBlur(rng.uniform(-1, 1, (28, 28)).astype(np.float32), (0, 0), sigma) * alpha
        dy = cv2.GaussianBlur(rng.uniform(-1, 1, (28, 28)).astype(np.float32), (0, 0), sigma) * alpha
        out[i] = cv2.remap(images[i % len(images)], grid_x + dx, grid_y + dy, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out
