"""The runtime loader: bundle checks, batched int8 classification, no TensorFlow on site."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge_agent import loader
from edge_agent.bundle import BundleError, sha256_file
from edge_agent.loader import Int8Classifier, load_bundle, non_integer_ops
from tests.paths import ROOT, SHIPPED_BUNDLE, mnist_split


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(SHIPPED_BUNDLE)


@pytest.fixture
def bundle_copy(tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, target)
    return target


def rewrite_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_model_file(bundle_copy):
    (bundle_copy / "model.tflite").unlink()
    with pytest.raises(BundleError, match="no model.tflite"):
        load_bundle(bundle_copy)


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_tampered_model_fails_sha256(bundle_copy):
    model = bundle_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_manifest_missing_keys(bundle_copy):
    (bundle_copy / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(BundleError, match="lacks version"):
        load_bundle(bundle_copy)


def test_manifest_wrong_input_shape(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["input"]["shape"] = [1, 32, 32, 1]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"input shape \[1, 32, 32, 1\]"):
        load_bundle(bundle_copy)


def test_manifest_disagreeing_with_model(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["input"]["zero_point"] = 7
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match the model"):
        load_bundle(bundle_copy)


def test_not_a_tflite_file(bundle_copy):
    model = bundle_copy / "model.tflite"
    model.write_bytes(b"this is not a flatbuffer" * 10)
    rewrite_manifest(bundle_copy, sha256=sha256_file(model))
    with pytest.raises(BundleError, match="not a loadable TFLite model"):
        load_bundle(bundle_copy)


def _tiny_tflite(tmp_path, input_shape, quantize):
    """A real TFLite model built with TensorFlow (tests only), float or full-integer."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input(shape=input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [np.random.default_rng(i).random((1, *input_shape), dtype=np.float32)] for i in range(8))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    path = tmp_path / "tiny.tflite"
    path.write_bytes(converter.convert())
    return path


@pytest.mark.slow
def test_float_model_is_refused(tmp_path, bundle_copy):
    tiny = _tiny_tflite(tmp_path, (28, 28, 1), quantize=False)
    shutil.copy(tiny, bundle_copy / "model.tflite")
    rewrite_manifest(bundle_copy, sha256=sha256_file(bundle_copy / "model.tflite"))
    with pytest.raises(BundleError, match="int8 or uint8 model is required"):
        load_bundle(bundle_copy)


@pytest.mark.slow
def test_int8_model_with_wrong_input_shape_is_refused(tmp_path):
    tiny = _tiny_tflite(tmp_path, (32, 32, 1), quantize=True)
    with pytest.raises(BundleError, match=r"input shape \[1, 32, 32, 1\]"):
        Int8Classifier(tiny)


def test_shipped_bundle_is_full_integer():
    assert non_integer_ops(SHIPPED_BUNDLE / "model.tflite") == []
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(SHIPPED_BUNDLE / "model.tflite")
    assert manifest["input"]["dtype"] == "uint8" and manifest["output"]["dtype"] in ("int8", "uint8")


def test_batches_of_any_size_match_one_by_one(shipped):
    digits = np.load(ROOT / "edge_agent" / "assets" / "demo_digits.npz")["images"][:9]
    singles = np.concatenate([shipped.classifier.classify(d[None]).probabilities for d in digits])
    for size in (9, 4, 1, 9):
        batch = shipped.classifier.classify(digits[:size]).probabilities
        np.testing.assert_allclose(batch, singles[:size], atol=1e-6)
    assert np.allclose(singles.sum(axis=1), 1.0, atol=1e-4)


def test_empty_batch_and_bad_input(shipped):
    assert shipped.classifier.classify(np.zeros((0, 28, 28), np.uint8)).labels.shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        shipped.classifier.classify(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        shipped.classifier.classify(np.zeros((2, 32, 32), np.uint8))


def test_shipped_bundle_reaches_manifest_accuracy_on_t10k(shipped):
    test = mnist_split("test")
    correct = 0
    for start in range(0, len(test), 1000):
        result = shipped.classifier.classify(test.images[start:start + 1000])
        correct += int(np.sum(result.labels == test.labels[start:start + 1000]))
    accuracy = correct / len(test)
    assert len(test) == 10_000
    assert accuracy == pytest.approx(shipped.manifest.raw["metrics"]["int8_accuracy"], abs=1e-4)
    assert accuracy >= 0.985


def test_base_install_classifies_without_tensorflow():
    """Runs in a fresh interpreter where importing TensorFlow is impossible."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now raises ImportError
        import numpy as np
        from edge_agent.loader import load_bundle
        model = load_bundle({str(SHIPPED_BUNDLE)!r})
        assert model.classifier.runtime in ("ai_edge_litert", "tflite_runtime"), model.classifier.runtime
        data = np.load({str(ROOT / "edge_agent" / "assets" / "demo_digits.npz")!r})
        result = model.classifier.classify(data["images"][:50])
        print(float(np.mean(result.labels == data["labels"][:50])))
        assert not any(name.startswith("tensorflow") and sys.modules[name] is not None
                       for name in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) >= 0.9


def test_site_install_requires_no_tensorflow():
    setup_py = (ROOT / "setup.py").read_text()
    base = setup_py.split("install_requires=[", 1)[1].split("]", 1)[0]
    assert "tensorflow" not in base and "ai-edge-litert" in base


# What the runtime's C++ side prints on fd 2 goes to the log, never straight to the operator.

def _noisy_interpreter(monkeypatch, say: Callable[[], bytes], raises: Exception | None = None) -> str:
    """Make the interpreter's constructor write say() to fd 2 as native code does; returns the runtime."""
    real_class, runtime = loader._interpreter_class()

    class Noisy(real_class):
        def __init__(self, *args, **kwargs):
            time.sleep(0.002)  # as long as a real build: concurrent builds overlap
            os.write(2, say())  # to the file descriptor, as C++ does: no Python stream involved
            if raises is not None:
                raise raises
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loader, "_interpreter_class", lambda: (Noisy, runtime))
    return runtime


def _loader_records(caplog) -> dict[str, int]:
    return {r.getMessage(): r.levelno for r in caplog.records if r.name == "edge_agent.loader"}


def test_unexpected_native_stderr_is_logged_as_a_warning(monkeypatch, caplog, capfd):
    runtime = _noisy_interpreter(monkeypatch, lambda: b"WARNING: delegate fell back to reference kernels\n")
    with caplog.at_level(logging.DEBUG, logger="edge_agent.loader"):
        load_bundle(SHIPPED_BUNDLE)
    assert capfd.readouterr().err == ""
    records = _loader_records(caplog)
    assert records[f"{runtime}: WARNING: delegate fell back to reference kernels"] == logging.WARNING


def test_native_error_is_logged_when_the_interpreter_fails(monkeypatch, caplog, capfd):
    runtime = _noisy_interpreter(monkeypatch, lambda: b"ERROR: Didn't find op for builtin opcode 'FOO'\n",
                                 raises=RuntimeError("Encountered unresolved custom op"))
    with caplog.at_level(logging.DEBUG, logger="edge_agent.loader"), \
            pytest.raises(BundleError, match="not a loadable TFLite model"):
        load_bundle(SHIPPED_BUNDLE)
    assert _loader_records(caplog)[f"{runtime}: ERROR: Didn't find op for builtin opcode 'FOO'"] == logging.ERROR
    os.write(2, b"fd 2 is back\n")
    assert capfd.readouterr().err == "fd 2 is back\n"


def test_concurrent_loads_each_log_their_own_native_output(monkeypatch, caplog, capfd):
    """fd 2 is one per process: interpreters built at once must not lose or swap what they print."""
    counter = itertools.count()
    runtime = _noisy_interpreter(monkeypatch, lambda: f"WARNING: interpreter {next(counter)}\n".encode())
    with caplog.at_level(logging.DEBUG, logger="edge_agent.loader"), ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: load_bundle(SHIPPED_BUNDLE), range(32)))
    assert capfd.readouterr().err == ""
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == sorted(f"{runtime}: WARNING: interpreter {i}" for i in range(32))


def test_a_nan_quantisation_scale_is_refused():
    from edge_agent.bundle import BundleError, TensorSpec, check_int8_digit_model

    good = TensorSpec((1, 28, 28, 1), "uint8", 0.0039, 0)
    nan_out = TensorSpec((1, 10), "int8", float("nan"), 0)
    with pytest.raises(BundleError, match="positive finite"):
        check_int8_digit_model(good, nan_out, 10, "model.tflite")


# Calibration: the manifest's temperature divides the logits before the softmax.

def _without_calibration(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("calibration", None)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_loader_applies_the_manifest_temperature(bundle_copy):
    digits = np.load(ROOT / "edge_agent" / "assets" / "demo_digits.npz")["images"][:40]
    _without_calibration(bundle_copy)
    plain = load_bundle(bundle_copy)
    rewrite_manifest(bundle_copy, calibration={"method": "temperature", "temperature": 2.0})
    tempered = load_bundle(bundle_copy)
    assert (plain.classifier.temperature, tempered.classifier.temperature) == (1.0, 2.0)
    logits = plain.classifier.outputs(digits)
    np.testing.assert_array_equal(tempered.classifier.outputs(digits), logits)  # the model is untouched
    expected = np.exp(logits / 2.0 - (logits / 2.0).max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    hot, cold = tempered.classifier.classify(digits), plain.classifier.classify(digits)
    np.testing.assert_allclose(hot.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(hot.labels, cold.labels)
    assert np.all(hot.confidences <= cold.confidences + 1e-7)  # T > 1 only ever lowers the top score
    assert np.mean(hot.confidences) < np.mean(cold.confidences)


def test_a_manifest_without_calibration_means_temperature_one(bundle_copy):
    """A 1.0.0 manifest (no "calibration") keeps working, with the plain softmax of the logits."""
    digits = np.load(ROOT / "edge_agent" / "assets" / "demo_digits.npz")["images"][:20]
    _without_calibration(bundle_copy)
    model = load_bundle(bundle_copy)
    assert model.manifest.temperature == 1.0 and model.classifier.temperature == 1.0
    logits = model.classifier.outputs(digits)
    np.testing.assert_allclose(model.classifier.classify(digits).probabilities, loader.softmax(logits))


@pytest.mark.parametrize(("calibration", "message"), [
    ({"method": "isotonic", "table": []}, "method 'isotonic' is not supported"),
    ({"method": "temperature", "temperature": -1.0}, r"must be a number in \[0.01, 100\]"),
    ({"method": "temperature", "temperature": "1.5"}, "must be a number"),
    ({"method": "temperature"}, "must be a number"),
    ("1.5", "must be an object"),
])
def test_a_calibration_the_agent_cannot_apply_is_refused(bundle_copy, calibration, message):
    rewrite_manifest(bundle_copy, calibration=calibration)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_a_temperature_on_a_probabilities_model_is_refused(bundle_copy):
    rewrite_manifest(bundle_copy, output_kind="probabilities",
                     calibration={"method": "temperature", "temperature": 1.5})
    with pytest.raises(BundleError, match="needs output_kind"):
        load_bundle(bundle_copy)


def test_shipped_manifest_has_version_calibration_and_selftest(shipped):
    raw = shipped.manifest.raw
    major, minor, patch = shipped.manifest.version_tuple
    assert (major, minor, patch) > (1, 0, 0)  # 1.0.0 had no calibration
    calibration = raw["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert shipped.classifier.temperature == pytest.approx(calibration["temperature"])
    assert calibration["fitted_on"].startswith("validation")
    assert 0 <= calibration["ece_after"] < calibration["ece_before"]
    assert raw["threshold_selection"]["probabilities"].startswith("calibrated")
    assert raw["selftest"]["n"] >= 200 and (SHIPPED_BUNDLE / raw["selftest"]["file"]).is_file()
    assert raw["selftest"]["sha256"] == sha256_file(SHIPPED_BUNDLE / raw["selftest"]["file"])
    assert (SHIPPED_BUNDLE / "MODEL_CARD.md").read_text().startswith(
        f"# Model card: {shipped.manifest.name} {shipped.manifest.version}")


def test_shipped_threshold_holds_on_its_calibrated_selftest(shipped):
    """The loader's probabilities are the ones the threshold was chosen on: most digits clear it."""
    with np.load(SHIPPED_BUNDLE / shipped.manifest.raw["selftest"]["file"]) as data:
        images, labels = data["images"], data["labels"]
    result = shipped.classifier.classify(images)
    accepted = result.confidences >= shipped.manifest.acceptance_threshold
    assert accepted.mean() > 0.8
    assert np.mean(result.labels[accepted] == labels[accepted]) >= 0.99
