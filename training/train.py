"""Train the CNN with augmentation and early stopping on a held-out validation split."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edge_agent.mnist import DigitSet
from training.augment import augmented_dataset, elastic_copies
from training.data import load_training_data, stratified_split
from training.model import build_architecture
from training.reader_crops import reader_crops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    out_dir: Path
    data_dir: Path | None = None
    seed: int = 1234  # weights, augmentation and shuffling
    # The validation hold-out; None means ``seed``. Ensemble members share one split seed (and
    # differ in ``seed``) so that no member ever trains on another member's validation digits.
    split_seed: int | None = None
    architecture: str = "mnist_cnn"  # a key of training.model.ARCHITECTURES
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    # "plateau": halve on a validation-loss plateau (the reference recipe); "cosine": decay to 1%
    # over the epochs, which reaches a good model in a fixed, smaller number of epochs.
    lr_schedule: str = "plateau"
    validation_per_class: int = 100
    patience: int = 8
    elastic_copies: int = 4  # distorted copies of each training image added before training
    # Crops the reader cuts from rendered frames of each training image (training.reader_crops):
    # the classifier learns the digits as the agent sees them. Validation gains as many crops.
    reader_copies: int = 0
    limit: int | None = None  # train on a small slice (tests, smoke runs)


def set_determinism(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def class_report(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix (rows true, columns predicted)."""
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels.astype(int), predictions.astype(int)), 1)
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros(10), where=support > 0)
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "per_class_accuracy": {str(d): round(float(per_class[d]), 5) for d in range(10)},
        "confusion_matrix": confusion.tolist(),
    }


def class_distribution(labels: np.ndarray) -> dict[str, float]:
    counts = np.bincount(labels.astype(int), minlength=10)
    return {str(d): round(float(counts[d] / counts.sum()), 5) for d in range(10)}


def effective_split_seed(config: TrainConfig) -> int:
    return config.seed if config.split_seed is None else config.split_seed


def split_for(config: TrainConfig, train: DigitSet) -> tuple[DigitSet, DigitSet]:
    """The training/validation split a config implies (quantize/ recomputes it for thresholds)."""
    split_seed = effective_split_seed(config)
    if config.limit:
        # A random slice: IDX subsets may be sorted by class (the 5k set is).
        picked = np.random.default_rng(split_seed).permutation(len(train))[:config.limit]
        train = train.subset(np.sort(picked))
    fit_idx, val_idx = stratified_split(train.labels, config.validation_per_class, split_seed)
    return train.subset(fit_idx), train.subset(val_idx)


def learning_rate_schedule(config: TrainConfig, fit_images: int) -> tuple[object, list]:
    """The optimiser's learning rate (a number or a schedule) and the callbacks that steer it."""
    if config.lr_schedule == "plateau":
        return config.learning_rate, [
            keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=4, min_lr=1e-5)]
    if config.lr_schedule == "cosine":
        steps = config.epochs * -(-fit_images // config.batch_size)
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, alpha=0.01), []
    raise ValueError(f"lr_schedule {config.lr_schedule!r} must be plateau or cosine")


def train(config: TrainConfig) -> dict:
    """Train, save ``model.keras`` and ``metrics.json`` in out_dir, and return the metrics."""
    set_determinism(config.seed)
    all_train, _test, source = load_training_data(config.data_dir)
    fit, validation = split_for(config, all_train)
    log.info("training on %d images, validating on %d (source %s)", len(fit), len(validation), source)

    model = build_architecture(config.architecture)
    fit_images = np.concatenate([fit.images, elastic_copies(fit.images, config.elastic_copies, config.seed)])
    fit_labels = np.concatenate([fit.labels] * (config.elastic_copies + 1))
    if config.reader_copies:
        fit_crops = reader_crops(fit, config.reader_copies, config.seed)
        validation_crops = reader_crops(validation, config.reader_copies, config.seed + 1)
        log.info("adding %d reader crops to training and %d to validation", len(fit_crops), len(validation_crops))
        fit_images = np.concatenate([fit_images, fit_crops.images])
        fit_labels = np.concatenate([fit_labels, fit_crops.labels])
        monitored = DigitSet(np.concatenate([validation.images, validation_crops.images]),
                             np.concatenate([validation.labels, validation_crops.labels]))
    else:
        monitored = validation
    # Early stopping and the reported accuracy watch the validation digits and their crops;
    # "validation_images" stays the held-out digits, which quantize/ recomputes from the split.
    x_val = monitored.images[..., None].astype("float32") / 255.0
    learning_rate, schedule_callbacks = learning_rate_schedule(config, len(fit_labels))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.monotonic()
    history = model.fit(
        augmented_dataset(fit_images, fit_labels, config.batch_size, config.seed),
        validation_data=(x_val, monitored.labels),
        epochs=config.epochs,
        verbose=2,  # one line per epoch: readable in journald and CI logs
        callbacks=[
            *schedule_callbacks,
            keras.callbacks.EarlyStopping(
                "val_loss", patience=config.patience, restore_best_weights=True
            ),
        ],
    )
    elapsed = time.monotonic() - started
    predictions = model.predict(x_val, verbose=0).argmax(axis=1)
    report = class_report(monitored.labels, predictions)
    metrics = {
        "model": config.architecture,
        "data_source": source,
        "train_images": len(fit),
        "validation_images": len(validation),
        "validation": report,
        "training_class_distribution": class_distribution(fit.labels),
        "epochs_run": len(history.history["loss"]),
        "train_seconds": round(elapsed, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "history": {k: [round(float(x), 5) for x in v] for k, v in history.history.items()},
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    model.save(config.out_dir / "model.keras")
    (config.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("validation accuracy %.4f after %d epochs", report["accuracy"], metrics["epochs_run"])
    return metrics
