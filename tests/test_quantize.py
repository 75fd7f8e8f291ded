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
                          "--eval-limit", "1000", "--max-drop-pp", "2.0", "--version", "0.1.0"])
    assert code == 0
    model = load_bundle(out)
    assert model.manifest.version == "0.1.0"
    assert non_integer_ops(out / "model.tflite") == []
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card: mnist-cnn-int8 0.1.0")
    metrics = model.manifest.raw["metrics"]
    assert metrics["int8_accuracy"] > 0.8
    assert 0.0 < model.manifest.acceptance_threshold <= 1.0


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
