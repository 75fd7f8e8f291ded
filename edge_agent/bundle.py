"""Model bundle: a folder with model.tflite, manifest.json and MODEL_CARD.md.

Pure checks on files and values; the LiteRT interpreter is built in loader.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "MODEL_CARD.md"
INT8_DTYPES = ("uint8", "int8")
REQUIRED_KEYS = ("name", "version", "sha256", "input", "output", "labels", "acceptance_threshold")


class BundleError(Exception):
    """A model bundle is missing, tampered with, or not the int8 model the appliance runs."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and affine quantisation of one model input or output."""

    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "TensorSpec":
        try:
            return cls(
                shape=tuple(int(x) for x in data["shape"]),
                dtype=str(data["dtype"]),
                scale=float(data["scale"]),
                zero_point=int(data["zero_point"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest {where} tensor is malformed: {exc!r}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "scale": self.scale,
                "zero_point": self.zero_point}


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json the runtime relies on; ``raw`` keeps the rest (baselines, metrics)."""

    name: str
    version: str
    sha256: str
    input: TensorSpec
    output: TensorSpec
    labels: tuple[str, ...]
    acceptance_threshold: float
    output_kind: str  # "logits" (softmax applied at runtime) or "probabilities"
    raw: dict[str, Any]
    # softmax(logits / temperature): 1.0 for bundles without a "calibration" section (1.0.0).
    temperature: float = 1.0

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        return parse_version(self.version)


def parse_version(text: str) -> tuple[int, int, int]:
    """'1.4.2' -> (1, 4, 2); anything else is a BundleError."""
    parts = str(text).split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise BundleError(f"version {text!r} is not semantic MAJOR.MINOR.PATCH")
    return int(parts[0]), int(parts[1]), int(parts[2])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_manifest(text: str) -> Manifest:
    """Validate manifest JSON text; every problem is one BundleError line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError("manifest.json must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise BundleError(f"manifest.json lacks {', '.join(missing)}")
    parse_version(data["version"])
    labels = tuple(str(x) for x in data["labels"])
    threshold = data["acceptance_threshold"]
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise BundleError(f"acceptance_threshold {threshold!r} must be a number in [0, 1]")
    manifest = Manifest(
        name=str(data["name"]),
        version=str(data["version"]),
        sha256=str(data["sha256"]).lower(),
        input=TensorSpec.from_json(data["input"], "input"),
        output=TensorSpec.from_json(data["output"], "output"),
        labels=labels,
        acceptance_threshold=float(threshold),
        output_kind=str(data.get("output_kind", "probabilities")),
        raw=data,
        temperature=parse_calibration(data.get("calibration")),
    )
    if manifest.temperature != 1.0 and manifest.output_kind != "logits":
        raise BundleError(f"calibration.temperature {manifest.temperature} needs output_kind \"logits\", "
                          f"not {manifest.output_kind!r}")
    check_int8_digit_model(manifest.input, manifest.output, len(labels), "manifest")
    return manifest


def parse_calibration(section: Any) -> float:
    """The temperature of a manifest's "calibration" section; none at all means 1.0.

    An unknown method is refused rather than ignored: the acceptance threshold was chosen on the
    calibrated probabilities, so running the model uncalibrated would shift what it accepts.
    """
    if section is None:
        return 1.0
    if not isinstance(section, dict):
        raise BundleError("manifest calibration must be an object like "
                          '{"method": "temperature", "temperature": 1.5}')
    method = section.get("method")
    if method != "temperature":
        raise BundleError(f"manifest calibration method {method!r} is not supported by this agent "
                          "(it knows \"temperature\"); update the agent or use a bundle without it")
    temperature = section.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and 0.01 <= temperature <= 100.0):
        raise BundleError(f"manifest calibration.temperature {temperature!r} must be a number in [0.01, 100]")
    return float(temperature)


def check_int8_digit_model(inp: TensorSpec, out: TensorSpec, n_labels: int, where: str) -> None:
    """The appliance runs 28x28 single-channel int8 digit classifiers only."""
    if inp.dtype not in INT8_DTYPES or out.dtype not in INT8_DTYPES:
        raise BundleError(
            f"{where}: input {inp.dtype} / output {out.dtype}; an int8 or uint8 model is required"
        )
    if tuple(inp.shape[1:]) not in ((28, 28, 1), (28, 28)):
        raise BundleError(f"{where}: input shape {list(inp.shape)}, expected [N, 28, 28, 1]")
    if tuple(out.shape[1:]) != (n_labels,):
        raise BundleError(f"{where}: output shape {list(out.shape)}, expected [N, {n_labels}]")
    # "not > 0" rather than "<= 0": a NaN scale fails every comparison and must fail this one too.
    if not (inp.scale > 0 and out.scale > 0) or not (math.isfinite(inp.scale) and math.isfinite(out.scale)):
        raise BundleError(f"{where}: quantisation scale must be a positive finite number")


def read_bundle(directory: Path) -> tuple[Manifest, Path]:
    """Check a bundle folder's files and the model's sha256; return its manifest and model path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} does not exist")
    manifest_path = directory / MANIFEST_FILE
    model_path = directory / MODEL_FILE
    for path in (manifest_path, model_path):
        if not path.is_file():
            raise BundleError(f"model bundle {directory} has no {path.name}")
    manifest = parse_manifest(manifest_path.read_text(encoding="utf-8", errors="replace"))
    actual = sha256_file(model_path)
    if actual != manifest.sha256:
        raise BundleError(
            f"{model_path} sha256 {actual[:12]}... does not match manifest {manifest.sha256[:12]}...; "
            "the model file is corrupt or was tampered with"
        )
    return manifest, model_path
