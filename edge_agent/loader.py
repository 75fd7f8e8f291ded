"""Open a model bundle and classify batches of 28x28 digits with the int8 model under LiteRT.

This is the only module that imports a TFLite runtime. It tries LiteRT
(``ai_edge_litert``), then the legacy ``tflite_runtime``, then ``tensorflow.lite``. What the
runtime prints natively while an interpreter is built goes to this module's logger.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import BundleError, Manifest, TensorSpec, check_int8_digit_model, read_bundle

log = logging.getLogger(__name__)

# int32 tensors the converter legitimately leaves in a full-integer model:
# biases of conv/fully-connected ops and the shape operand of RESHAPE.
OUTPUT_KINDS = ("logits", "probabilities")
INT32_ALLOWED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "RESHAPE", "TRANSPOSE_CONV"}


# The runtime's C++ side writes straight to file descriptor 2, past Python's logging, and LiteRT
# (ai-edge-litert 2.x) ignores TF_CPP_MIN_LOG_LEVEL: interpreters are built with fd 2 caught.
# File descriptors belong to the process, so one capture at a time. What it prints on a healthy
# start (once per process) is debug detail:
_NATIVE_STDERR_LOCK = threading.Lock()
_ROUTINE_RUNTIME_LINES = frozenset({
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "INFO: Initialized TensorFlow Lite runtime.",
})


def _runtime_line_level(line: str) -> int:
    """DEBUG for the runtime's routine start-up lines, ERROR for its errors, WARNING otherwise."""
    if line in _ROUTINE_RUNTIME_LINES:
        return logging.DEBUG
    if line.startswith(("ERROR", "FATAL", "E0", "F0")):
        return logging.ERROR
    return logging.WARNING


@contextmanager
def native_stderr_to_log(source: str) -> Iterator[None]:
    """Catch what native code writes to fd 2 inside the block and log it, line by line.

    While the block runs, anything else the process writes to fd 2 is caught too and logged
    with it (at WARNING, so nothing is lost); keep the block to the native calls that print.
    """
    with _NATIVE_STDERR_LOCK, tempfile.TemporaryFile() as sink:  # a file, not a pipe: never blocks
        if sys.stderr is not None:
            sys.stderr.flush()  # Python's text written before the block goes where it was meant to
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a daemon that closed it): nothing to catch
            saved = None
        if saved is None:
            yield
            return
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            # Also when the block raised: the runtime's own words are often the best explanation.
            for line in sink.read().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    log.log(_runtime_line_level(line.strip()), "%s: %s", source, line.rstrip())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), row by row."""
    if temperature != 1.0:
        logits = logits / np.float32(temperature)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    try:
        from tensorflow.lite import Interpreter  # type: ignore[import-not-found]

        return Interpreter, "tensorflow.lite"
    except ImportError as exc:
        raise BundleError(
            "no TFLite runtime: install ai-edge-litert (pip install ai-edge-litert)"
        ) from exc


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        shape=tuple(int(x) for x in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


@dataclass(frozen=True)
class Classification:
    """Per digit: the top label index and the dequantised probabilities of all classes."""

    labels: np.ndarray  # (N,) int
    probabilities: np.ndarray  # (N, classes) float32

    @property
    def confidences(self) -> np.ndarray:
        return self.probabilities.max(axis=1) if len(self.labels) else np.zeros(0, np.float32)


class Int8Classifier:
    """A LiteRT interpreter for an int8 digit model; one ``invoke`` per batch, thread-safe."""

    def __init__(self, model_path: Path, num_threads: int = 1, n_labels: int = 10,
                 use_xnnpack: bool = True, output_kind: str = "logits", temperature: float = 1.0):
        if output_kind not in OUTPUT_KINDS:
            raise BundleError(f"output_kind {output_kind!r} must be one of {', '.join(OUTPUT_KINDS)}")
        if not (np.isfinite(temperature) and temperature > 0):
            raise BundleError(f"temperature {temperature!r} must be a positive number")
        if temperature != 1.0 and output_kind != "logits":
            raise BundleError("a calibration temperature applies to logits only")
        self.output_kind = output_kind
        # The bundle's calibration: probabilities are softmax(logits / temperature).
        self.temperature = float(temperature)
        interpreter_class, self.runtime = _interpreter_class()
        options: dict[str, Any] = {"model_path": str(model_path), "num_threads": num_threads}
        if not use_xnnpack:
            # Plain builtin kernels: the graph stays op by op, as needed to inspect tensor types.
            resolver = getattr(sys.modules[interpreter_class.__module__], "OpResolverType", None)
            if resolver is not None:
                options["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            # XNNPACK is LiteRT's default CPU delegate; num_threads sizes its thread pool.
            with native_stderr_to_log(self.runtime):
                self._interpreter = interpreter_class(**options)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{model_path} is not a loadable TFLite model: {exc}") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{model_path}: expected one input and one output tensor")
        self.input_spec, self.output_spec = _spec(inputs[0]), _spec(outputs[0])
        check_int8_digit_model(self.input_spec, self.output_spec, n_labels, str(model_path))
        self._input_index = inputs[0]["index"]
        self._output_index = outputs[0]["index"]
        self._input_rank = len(self.input_spec.shape)
        self._batch = int(self.input_spec.shape[0])
        self._lock = threading.Lock()

    def _quantise(self, digits: np.ndarray) -> np.ndarray:
        """uint8 pixels (0-255) to the model's input encoding."""
        spec = self.input_spec
        if spec.dtype == "uint8" and spec.zero_point == 0 and abs(spec.scale * 255 - 1) < 1e-6:
            return digits  # the model takes raw pixels: no arithmetic on the hot path
        info = np.iinfo(spec.dtype)
        values = np.round(digits.astype(np.float32) / 255.0 / spec.scale + spec.zero_point)
        return np.clip(values, info.min, info.max).astype(spec.dtype)

    def classify(self, digits: np.ndarray) -> Classification:
        """Classify (N, 28, 28) uint8 digits, white ink on black, in one invoke."""
        values = self.outputs(digits)
        if len(values) == 0:
            return Classification(np.zeros(0, int), np.zeros((0, 10), np.float32))
        probabilities = softmax(values, self.temperature) if self.output_kind == "logits" else values
        return Classification(probabilities.argmax(axis=1), probabilities.astype(np.float32))

    def outputs(self, digits: np.ndarray) -> np.ndarray:
        """The model's dequantised output for (N, 28, 28) uint8 digits: logits before any temperature
        (or probabilities, for an ``output_kind`` "probabilities" model). Calibration fits on these."""
        digits = np.asarray(digits)
        if digits.ndim != 3 or digits.shape[1:] != (28, 28) or digits.dtype != np.uint8:
            raise ValueError(f"digits must be uint8 (N, 28, 28), got {digits.dtype} {digits.shape}")
        n = len(digits)
        if n == 0:
            return np.zeros((0, self.output_spec.shape[-1]), np.float32)
        batch = self._quantise(digits)
        batch = batch.reshape((n, 28, 28, 1) if self._input_rank == 4 else (n, 28, 28))
        with self._lock:
            if n != self._batch:
                # Re-planning memory is costly, so only when the batch size changes.
                self._interpreter.resize_tensor_input(self._input_index, list(batch.shape))
                self._interpreter.allocate_tensors()
                self._batch = n
            self._interpreter.set_tensor(self._input_index, np.ascontiguousarray(batch))
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output_index).copy()
        out = self.output_spec
        return (raw.astype(np.float32) - out.zero_point) * np.float32(out.scale)

    def tensor_types_by_op(self) -> list[tuple[str, list[str]]]:
        """(op name, dtypes of its input and output tensors) for every op in the graph."""
        tensors = {t["index"]: np.dtype(t["dtype"]).name for t in self._interpreter.get_tensor_details()}
        report = []
        for op in self._interpreter._get_ops_details():  # noqa: SLF001 - no public equivalent
            indices = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
            report.append((op["op_name"], [tensors.get(i, "unknown") for i in indices]))
        return report


def non_integer_ops(model_path: Path) -> list[str]:
    """Ops that are not full-integer: any float tensor, or int32 outside biases and shapes."""
    offenders = []
    inspector = Int8Classifier(model_path, use_xnnpack=False)
    for op_name, dtypes in inspector.tensor_types_by_op():
        for dtype in dtypes:
            if dtype in ("int8", "uint8"):
                continue
            if dtype == "int32" and op_name in INT32_ALLOWED_OPS:
                continue
            offenders.append(f"{op_name} has a {dtype} tensor")
            break
    return offenders


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle: its manifest and a ready classifier."""

    manifest: Manifest
    classifier: Int8Classifier
    directory: Path

    @property
    def version(self) -> str:
        return self.manifest.version


def load_bundle(directory: Path, num_threads: int = 1) -> LoadedModel:
    """Verify a bundle (files, sha256, manifest) and build its int8 interpreter."""
    manifest, model_path = read_bundle(Path(directory))
    classifier = Int8Classifier(model_path, num_threads=num_threads, n_labels=len(manifest.labels),
                                output_kind=manifest.output_kind, temperature=manifest.temperature)
    for name, declared, actual in (
        ("input", manifest.input, classifier.input_spec),
        ("output", manifest.output, classifier.output_spec),
    ):
        if declared.dtype != actual.dtype or not abs(declared.scale - actual.scale) <= 1e-9 \
                or declared.zero_point != actual.zero_point:
            raise BundleError(
                f"manifest {name} tensor {declared.to_json()} does not match the model's {actual.to_json()}"
            )
    log.info("loaded model %s %s from %s (%s, temperature %g)", manifest.name, manifest.version, directory,
             classifier.runtime, manifest.temperature)
    return LoadedModel(manifest, classifier, Path(directory))
