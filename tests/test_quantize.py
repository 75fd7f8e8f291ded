"""Training and quantisation: the gate's rules, and a real end-to-end run on a small slice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantize.gate import GateError, check_gate, choose_threshold, histogram
from tests.paths import mnist_dir


def test_gate_refuses_accuracy_loss():
    with pytest.raises(GateError, match="0.60 pp below float"):
        check_gate(0.990, 0.984, [], max_drop_pp=0.5)
    assert check_gate(0.990, 0.986, [], max_drop_pp=0.5).drop_pp == pytest.approx(0.4)


def test_gate_refuses_float_ops():
    with pytest.raises(GateError, match="not full-integer: FULLY_CONNECTED has a float32"):
        check_gate(0.99, 0.99, ["FULLY_CONNECTED has a float32 tensor"], max_drop_pp=0.5)


def test_threshold_reaches_target_precision():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.5, 1.0, 20_000)
    # Errors only below 0.9: the threshold must land at or just above the last error's score.
    correct = ~((confidences < 0.9) & (rng.uniform(size=confidences.size) < 0.3))
    choice = choose_threshold(confidences, correct, target_precision=0.999)
    accepted = confidences >= choice["threshold"]
    assert np.mean(correct[accepted]) >= 0.999
    assert choice["threshold"] < 0.9  # a few errors are tolerated at 99.9%
    assert choice["validation_precision"] >= 0.999


def test_threshold_with_no_safe_cut_takes_the_top_score():
    choice = choose_threshold(np.array([0.9, 0.8, 0.7]), np.array([False, True, True]), 0.999)
    assert choice["threshold"] == 0.9


def test_histogram_is_fixed_edge():
    h = histogram(np.array([0.0, 0.51, 0.99, 1.0]), bins=2)
    assert h["counts"] == [1, 3] and h["edges"] == [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def small_training_run(tmp_path_factory):
    """A real training run on 1,500 images for 2 epochs (seconds, not minutes)."""
    data = mnist_dir()
    from training.cli import main as train_main

    out = tmp_path_factory.mktemp("train")
    code = train_main(["--data", str(data), "--out", str(out), "--limit", "1500", "--epochs", "2",
                       "--elastic-copies", "1", "--validation-per-class", "20"])
    assert code == 0
    return data, out


@pytest.mark.slow
def test_training_writes_model_and_metrics(small_training_run):
    _, out = small_training_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model.keras").exists()
    assert metrics["train_images"] == 1300 and metrics["validation_images"] == 200
    assert len(metrics["validation"]["confusion_matrix"]) == 10
    assert sum(metrics["training_class_distribution"].values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["validation"]["accuracy"] > 0.8  # 2 epochs already learn digits


@pytest.mark.slow
def test_quantize_end_to_end_produces_loadable_int8_bundle(small_training_run, tmp_path):
    from edge_agent.loader import load_bundle, non_integer_ops
    from quantize.cli import main as quantize_main

    data, train_dir = small_training_run
    out = tmp_path / "bundle"
    # A 2-epoch model is less stable under quantisation than the shipped one; the gate's own
    # default is exercised by the broken-model test below.
    code = quantize_main(["--train-dir", str(train_dir), "--out", str(out), "--data", str(data),
                          "--eval-limit", "1000", "--max-drop-pp", "2.0", "--version", "0.1.0",
                          "--reader-crop-copies", "0"])
    assert code == 0
    model = load_bundle(out)
    assert model.manifest.version == "0.1.0"
    assert non_integer_ops(out / "model.tflite") == []
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card: mnist-cnn-int8 0.1.0")
    metrics = model.manifest.raw["metrics"]
    assert metrics["int8_accuracy"] > 0.8
    assert 0.0 < model.manifest.acceptance_threshold <= 1.0
    calibration = model.manifest.raw["calibration"]
    assert calibration["method"] == "temperature" and model.classifier.temperature == calibration["temperature"]
    assert calibration["validation"]["digits"] == 200 * 10  # 200 held out, 9 augmented copies
    assert calibration["validation"]["nll_after"] <= calibration["validation"]["nll_before"] + 1e-9
    assert "## Calibration" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_gate_rejects_a_model_broken_for_int8(small_training_run, tmp_path, capsys):
    """One conv channel with a huge bias stretches the int8 range so the others round to zero.

    The float model is unchanged (the next layer ignores that channel), so only the gate,
    not the float accuracy, can catch it.
    """
    import keras

    from quantize.cli import main as quantize_main

    data, train_dir = small_training_run
    model = keras.models.load_model(train_dir / "model.keras")
    conv1, conv2 = model.layers[0], model.layers[1]
    kernel, bias = conv1.get_weights()
    bias[0] = 1e4
    conv1.set_weights([kernel, bias])
    kernel2, bias2 = conv2.get_weights()
    kernel2[:, :, 0, :] = 0.0
    conv2.set_weights([kernel2, bias2])
    broken = tmp_path / "broken"
    broken.mkdir()
    model.save(broken / "model.keras")
    (broken / "metrics.json").write_text((train_dir / "metrics.json").read_text())

    out = tmp_path / "bundle"
    code = quantize_main(["--train-dir", str(broken), "--out", str(out), "--data", str(data),
                          "--eval-limit", "1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("edge-quantize: refused: int8 accuracy")
    assert not out.exists()  # nothing half-written is left for a site to pick up


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tmp_path):
    data = mnist_dir()
    from training.cli import main as train_main

    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert train_main(["--data", str(data), "--out", str(out), "--limit", "600", "--epochs", "1",
                           "--elastic-copies", "1", "--validation-per-class", "10", "--seed", "5"]) == 0
        import keras

        weights.append(keras.models.load_model(out / "model.keras").get_weights())
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)


# Ensembles: members side by side in one int8 graph, their logits averaged.

def _tiny_member(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def _member_logits(member, x: np.ndarray) -> np.ndarray:
    """Logits the independent way: the penultimate layer's output times the last layer's weights."""
    import keras

    hidden = keras.Model(member.inputs, member.layers[-2].output).predict(x, verbose=0)
    kernel, bias = member.layers[-1].get_weights()
    return hidden @ kernel + bias


def test_ensemble_output_is_the_mean_of_member_logits():
    from quantize.convert import AveragedLogits

    members = [_tiny_member(seed) for seed in (1, 2, 3)]
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    expected = np.mean([_member_logits(m, x) for m in members], axis=0)
    np.testing.assert_allclose(AveragedLogits(members)(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(AveragedLogits(members[:1])(x).numpy(), _member_logits(members[0], x),
                               rtol=1e-5, atol=1e-5)


def test_ensemble_converts_to_one_full_integer_graph(tmp_path):
    from edge_agent.loader import Int8Classifier, non_integer_ops
    from quantize.convert import convert_to_int8

    members = [_tiny_member(seed) for seed in (1, 2)]
    rng = np.random.default_rng(1)
    calibration = (rng.random((64, 28, 28)) * 255).astype(np.uint8)
    path = tmp_path / "ensemble.tflite"
    path.write_bytes(convert_to_int8(members, calibration))
    assert non_integer_ops(path) == []
    classifier = Int8Classifier(path)  # one uint8 input, one int8 output, or it refuses
    assert (classifier.input_spec.dtype, classifier.output_spec.dtype) == ("uint8", "int8")
    ops = [op for op, _ in Int8Classifier(path, use_xnnpack=False).tensor_types_by_op()]
    assert ops.count("CONV_2D") == 2 and ops.count("ADD") == 1  # both members, merged in the graph

    digits = (rng.random((16, 28, 28)) * 255).astype(np.uint8)
    expected = np.mean([_member_logits(m, digits[..., None].astype(np.float32) / 255) for m in members], axis=0)
    got = classifier.outputs(digits)
    # int8 activations: within a few quanta of the output scale, relative to the logits' range.
    spread = expected.max() - expected.min()
    assert np.max(np.abs(got - expected)) < max(6 * classifier.output_spec.scale, 0.08 * spread)
    assert np.mean(got.argmax(axis=1) == expected.argmax(axis=1)) >= 0.8


def test_members_trained_on_different_validation_splits_are_refused(tmp_path):
    from edge_agent.mnist import DataError
    from quantize.build import QuantizeConfig, source_from_training

    dirs = []
    for name, split_seed in (("a", 1234), ("b", 99)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"config": {
            "seed": 7, "split_seed": split_seed, "validation_per_class": 100, "limit": None}}))
        dirs.append(folder)
    config = QuantizeConfig(out_dir=tmp_path / "bundle", train_dirs=tuple(dirs))
    with pytest.raises(DataError, match="different validation splits"):
        source_from_training(config, None, None)


def test_quantize_config_takes_training_folders_or_a_bundle(tmp_path):
    from quantize.build import QuantizeConfig

    with pytest.raises(ValueError, match="not both"):
        QuantizeConfig(out_dir=tmp_path, train_dirs=(tmp_path,), from_bundle=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        QuantizeConfig(out_dir=tmp_path)


def test_cli_architecture_names_match_the_models():
    from training.cli import ARCHITECTURE_NAMES
    from training.model import ARCHITECTURES

    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)


@pytest.mark.slow
def test_recalibrating_a_bundle_keeps_its_model_and_adds_a_temperature(tmp_path):
    """--from-bundle: the shipped model.tflite, byte for byte, with a fitted temperature and new threshold."""
    from edge_agent.bundle import sha256_file
    from edge_agent.loader import load_bundle
    from quantize.cli import main as quantize_main
    from tests.paths import SHIPPED_BUNDLE

    data = mnist_dir()
    out = tmp_path / "bundle"
    code = quantize_main(["--from-bundle", str(SHIPPED_BUNDLE), "--out", str(out), "--data", str(data),
                          "--eval-limit", "500", "--version", "9.0.1", "--figures", str(tmp_path / "img"),
                          "--reader-crop-copies", "1"])
    assert code == 0
    model = load_bundle(out)
    assert sha256_file(out / "model.tflite") == sha256_file(SHIPPED_BUNDLE / "model.tflite")
    assert model.manifest.version == "9.0.1" and model.classifier.temperature > 0
    assert model.manifest.raw["model"]["recalibrated_from"] == json.loads(
        (SHIPPED_BUNDLE / "manifest.json").read_text())["version"]
    # Fitted on what the agent classifies: the reader's crops of the 1,000 validation digits
    # (a frame the reader miscounts gives none); the test digits' crops are reported beside.
    calibration = model.manifest.raw["calibration"]
    assert calibration["fitted_on"].startswith("reader crops")
    assert 900 <= calibration["validation"]["digits"] <= 1000
    assert calibration["validation"]["nll_after"] <= calibration["validation"]["nll_before"] + 1e-9
    assert 450 <= calibration["test_reader_crops"]["digits"] <= 500
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "reliability-mnist-cnn-int8-9.0.1-t10k.png", "reliability-mnist-cnn-int8-9.0.1-validation.png"]


def test_the_card_names_each_member_of_a_mixed_ensemble():
    """An ensemble of a reference CNN and a crop-trained batch-norm CNN: the card says which is which,
    with each member's seed and training data, not one architecture for all."""
    from quantize.card import _model_section, _seeds

    mixed = {"model": {"architecture": "bn_cnn+mnist_cnn", "members": 2, "parameters": 1_440_000,
                       "member_seeds": [1234, 102], "member_architectures": ["mnist_cnn", "bn_cnn"],
                       "member_reader_copies": [0, 3]}}
    text = _model_section(mixed)
    first, second = (line for line in text.splitlines() if line.startswith("- member"))
    assert first.startswith("- member 1 (seed 1234): The data scientist's Keras MNIST CNN") and "reader crops" not in first
    assert second.startswith("- member 2 (seed 102): A small batch-norm CNN") and "3 reader crops" in second
    assert "ONE int8 graph" in text and "1.44 M parameters" in text
    # Manifests written before members were described keep their one-line wording.
    older = {"model": {"architecture": "bn_cnn", "members": 3, "member_seeds": [101, 102, 103]}}
    assert "(seeds 101, 102, 103), each a small batch-norm CNN" in _model_section(older)
    assert _seeds([1234, 102]) == "seeds 1234 and 102" and _seeds(1234) == "seed 1234"
