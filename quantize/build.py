"""Build a model bundle: convert, gate, choose the acceptance threshold, write manifest and card."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np

from edge_agent.bundle import CARD_FILE, MANIFEST_FILE, MODEL_FILE, parse_manifest, parse_version, sha256_file
from edge_agent.loader import Int8Classifier, non_integer_ops
from edge_agent.mnist import DataError, DigitSet
from quantize.card import render_model_card
from quantize.convert import convert_to_int8
from quantize.gate import check_gate, choose_threshold, histogram
from training.augment import augmented_dataset
from training.data import load_training_data
from training.train import TrainConfig, class_distribution, class_report, split_for

log = logging.getLogger(__name__)
LABELS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class QuantizeConfig:
    train_dir: Path
    out_dir: Path
    data_dir: Path | None = None
    version: str | None = None  # default: next minor after the bundle already in out_dir
    max_drop_pp: float = 0.5
    target_precision: float = 0.999
    calibration_images: int = 500
    augmented_validation_copies: int = 9
    eval_limit: int | None = None  # evaluate on the first N test images (smoke runs only)
    seed: int = 1234
    name: str = "mnist-cnn-int8"


def next_version(out_dir: Path) -> str:
    """Semantic versions only increase: bump the minor of the bundle being replaced."""
    manifest = out_dir / MANIFEST_FILE
    if not manifest.exists():
        return "1.0.0"
    try:
        major, minor, _ = parse_version(json.loads(manifest.read_text())["version"])
    except Exception:  # an unreadable old manifest must not block a rebuild
        return "1.0.0"
    return f"{major}.{minor + 1}.0"


def evaluate_int8(classifier: Int8Classifier, images: np.ndarray, chunk: int = 500):
    """Labels and top-class confidences of the int8 model, in batches."""
    labels, confidences = [], []
    for start in range(0, len(images), chunk):
        result = classifier.classify(images[start:start + chunk])
        labels.append(result.labels)
        confidences.append(result.confidences)
    return np.concatenate(labels), np.concatenate(confidences)


def augmented_copies(validation: DigitSet, copies: int, seed: int) -> DigitSet:
    """Validation digits under training-style distortions: more, harder evidence for the threshold."""
    images, labels = [validation.images], [validation.labels]
    for copy in range(copies):
        dataset = augmented_dataset(validation.images, validation.labels, len(validation), seed + copy)
        for batch_images, batch_labels in dataset.take(1):
            images.append(np.round(batch_images.numpy()[..., 0] * 255).astype(np.uint8))
            labels.append(batch_labels.numpy().astype(np.uint8))
    return DigitSet(np.concatenate(images), np.concatenate(labels))


def build_bundle(config: QuantizeConfig) -> dict:
    """Write a verified bundle to out_dir, or raise GateError and leave out_dir untouched."""
    train_metrics = json.loads((config.train_dir / "metrics.json").read_text())
    model = keras.models.load_model(config.train_dir / "model.keras")
    train_all, test, source = load_training_data(config.data_dir)
    if test is None:
        raise DataError(f"no t10k test files in {source}: the accuracy gate needs them")
    if config.eval_limit:
        test = test.subset(np.arange(min(config.eval_limit, len(test))))
    saved = train_metrics["config"]
    fit, validation = split_for(
        TrainConfig(out_dir=config.train_dir, seed=saved["seed"],
                    validation_per_class=saved["validation_per_class"], limit=saved.get("limit")),
        train_all,
    )
    rng = np.random.default_rng(config.seed)
    calibration = fit.images[rng.choice(len(fit), min(config.calibration_images, len(fit)), replace=False)]

    started = time.monotonic()
    config.out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.out_dir.parent, prefix=".staging-") as tmp:
        staging = Path(tmp)
        model_path = staging / MODEL_FILE
        model_path.write_bytes(convert_to_int8(model, calibration))
        classifier = Int8Classifier(model_path, num_threads=2, output_kind="logits")

        float_pred = model.predict(test.images[..., None].astype("float32") / 255.0, verbose=0,
                                   batch_size=500)
        float_report = class_report(test.labels, float_pred.argmax(axis=1))
        int8_labels, int8_conf = evaluate_int8(classifier, test.images)
        int8_report = class_report(test.labels, int8_labels)
        gate = check_gate(float_report["accuracy"], int8_report["accuracy"], non_integer_ops(model_path),
                          config.max_drop_pp)

        hard_validation = augmented_copies(validation, config.augmented_validation_copies, config.seed)
        val_labels, val_conf = evaluate_int8(classifier, hard_validation.images)
        threshold = choose_threshold(val_conf, val_labels == hard_validation.labels,
                                     config.target_precision)
        accepted = int8_conf >= threshold["threshold"]
        test_name = f"MNIST t10k ({len(test)} images)" if not config.eval_limit else \
            f"MNIST t10k, first {len(test)} images (smoke run)"
        manifest = {
            "name": config.name,
            "version": config.version or next_version(config.out_dir),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sha256": sha256_file(model_path),
            "runtime": "LiteRT (TFLite) full-integer int8",
            "input": classifier.input_spec.to_json(),
            "output": classifier.output_spec.to_json(),
            "output_kind": "logits",
            "labels": LABELS,
            "input_encoding": "28x28 greyscale, white ink on black, digit fitted to 20x20, centred by mass",
            "acceptance_threshold": threshold["threshold"],
            "threshold_selection": threshold,
            "metrics": {
                "dataset": test_name,
                "float_accuracy": round(gate.float_accuracy, 5),
                "int8_accuracy": round(gate.int8_accuracy, 5),
                "int8_drop_pp": round(gate.drop_pp, 3),
                "int8_per_class_accuracy": int8_report["per_class_accuracy"],
                "int8_confusion_matrix": int8_report["confusion_matrix"],
                "test_coverage_at_threshold": round(float(accepted.mean()), 5),
                "test_precision_at_threshold": round(float(
                    (int8_labels[accepted] == test.labels[accepted]).mean()) if accepted.any() else 1.0, 6),
                "validation_accuracy_float": train_metrics["validation"]["accuracy"],
            },
            "baselines": {
                "training_class_distribution": train_metrics["training_class_distribution"],
                "test_prediction_distribution": class_distribution(int8_labels),
                "test_confidence_histogram": histogram(int8_conf),
                "test_ink_fraction_histogram": histogram((test.images > 127).mean(axis=(1, 2)), upper=0.4),
            },
            "training": {
                "data_source": source,
                "train_images": train_metrics["train_images"],
                "validation_images": train_metrics["validation_images"],
                "epochs_run": train_metrics["epochs_run"],
                "seed": saved["seed"],
            },
            "build_seconds": round(time.monotonic() - started, 1),
        }
        parse_manifest(json.dumps(manifest))  # the runtime must accept what we ship
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_model_card(manifest))
        # Swap in the new bundle only once it is complete, so a failed build leaves the old one.
        if config.out_dir.exists():
            shutil.rmtree(config.out_dir)
        shutil.copytree(staging, config.out_dir)
        config.out_dir.chmod(0o755)  # the staging folder was private; the bundle is for everyone to read
    log.info("bundle %s %s: int8 %.4f (float %.4f), threshold %.4f", manifest["name"],
             manifest["version"], gate.int8_accuracy, gate.float_accuracy, threshold["threshold"])
    return manifest
