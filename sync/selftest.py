"""The self-test inside a bundle: labelled 28x28 digits and the accuracy the bundle scores on them."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import MANIFEST_FILE, BundleError, sha256_file
from edge_agent.loader import LoadedModel, load_bundle
from sync.errors import SyncError, ValidationError
from sync.selftest_file import selftest_npz_bytes

SELFTEST_FILE = "selftest.npz"
DEFAULT_TOLERANCE = 0.01
CARD_FILE = "MODEL_CARD.md"
ATTRIBUTION_FILE = "ATTRIBUTION.md"  # beside the digits: where they come from and their licence
_CARD_SECTION = "## Self-test digits"


def read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (N, 28, 28) and labels (N,) from an npz; no pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = np.asarray(data["images"]), np.asarray(data["labels"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValidationError(f"self-test {Path(path).name} is unreadable: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) \
            or labels.shape != (len(images),) or len(images) == 0:
        raise ValidationError(f"self-test {Path(path).name} must hold images uint8 (N, 28, 28) and N labels")
    return images, labels.astype(np.int64)


def score(model: LoadedModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the model on the digits; a NaN anywhere in its output is a ValidationError."""
    result = model.classifier.classify(images)
    if not np.all(np.isfinite(result.probabilities)):
        raise ValidationError(f"model {model.version} outputs NaN or infinite values")
    return float(np.mean(result.labels == labels))


def add_selftest(bundle: Path, digits: Path) -> dict[str, Any]:
    """Copy the digits into the bundle as selftest.npz and record the bundle's own score on them."""
    bundle = Path(bundle)
    images, labels = read_digits(Path(digits))
    target = bundle / SELFTEST_FILE
    target.write_bytes(selftest_npz_bytes({"images.npy": _npy(images), "labels.npy": _npy(labels.astype(np.uint8))}))
    try:
        model = load_bundle(bundle)
    except BundleError as exc:
        raise SyncError(f"cannot add a self-test: {exc}") from exc
    accuracy = score(model, images, labels)
    entry = {"file": SELFTEST_FILE, "sha256": sha256_file(target), "accuracy": round(accuracy, 6),
             "n": int(len(images))}
    manifest_path = bundle / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["selftest"] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (bundle / "manifest.json.sig").unlink(missing_ok=True)  # it signed the old manifest
    _describe_in_card(bundle, Path(digits), entry)
    return entry


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def _describe_in_card(bundle: Path, digits: Path, entry: dict[str, Any]) -> None:
    """Say in the model card what the self-test digits are and, from the attribution file
    kept beside them, whose they are: a bundle travels to every site with them inside."""
    card = bundle / CARD_FILE
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    text = text.split("\n" + _CARD_SECTION + "\n")[0].rstrip("\n")  # adding again replaces it
    lines = [_CARD_SECTION, f"`{SELFTEST_FILE}`: {entry['n']} labelled digits, copied from `{digits.name}`; "
             f"this bundle reads {entry['accuracy']:.2%} of them right. A site refuses the bundle if it "
             "scores less than that on them (edge-sync's tolerance)."]
    attribution = digits.parent / ATTRIBUTION_FILE
    if attribution.is_file():
        lines += ["", "Source and licence (from the digits' attribution file):", "",
                  *("> " + line if line else ">" for line in attribution.read_text(encoding="utf-8").strip().splitlines())]
    card.write_text(text + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


def run_selftest(model: LoadedModel, directory: Path, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Refuse a bundle that scores below its manifest's own self-test figure minus ``tolerance``."""
    entry = model.manifest.raw.get("selftest")
    if not isinstance(entry, dict) or not isinstance(entry.get("accuracy"), (int, float)):
        raise ValidationError(f"bundle {model.version} has no self-test in its manifest")
    path = Path(directory) / str(entry.get("file", SELFTEST_FILE))
    if Path(entry.get("file", SELFTEST_FILE)).name != entry.get("file", SELFTEST_FILE) or not path.is_file():
        raise ValidationError(f"bundle {model.version} lacks its self-test file")
    if sha256_file(path) != str(entry.get("sha256", "")).lower():
        raise ValidationError(f"bundle {model.version} self-test file does not match its manifest sha256")
    images, labels = read_digits(path)
    accuracy = score(model, images, labels)
    expected = float(entry["accuracy"])
    if math.isnan(accuracy) or accuracy < expected - tolerance:
        raise ValidationError(f"self-test failed: {model.version} scores {accuracy:.4f} on {len(images)} "
                              f"digits, manifest promises {expected:.4f} (tolerance {tolerance})")
    return accuracy
