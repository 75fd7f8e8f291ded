"""The registry: a static tree any static host serves.

    index.json, index.json.sig                 the signed list of versions and channel pointers
    bundles/<version>/model.tflite, manifest.json, manifest.json.sig, selftest.npz, MODEL_CARD.md

``parse_index`` is pure (bytes already verified -> checked dict); ``publish`` writes the tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import MANIFEST_FILE, BundleError, parse_version, read_bundle, sha256_file
from sync.errors import RegistryError, SyncError
from sync.signing import sign

INDEX_FILE = "index.json"
INDEX_SIG_FILE = "index.json.sig"
MANIFEST_SIG_FILE = "manifest.json.sig"
INDEX_FORMAT = 1
DEFAULT_VALIDITY = timedelta(days=30)
MAX_INDEX_BYTES = 1 << 20


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError as exc:
        raise RegistryError(f"index {field} {text!r} is not an ISO 8601 time") from exc
    if moment.tzinfo is None:
        raise RegistryError(f"index {field} {text!r} has no time zone")
    return moment


def parse_index(data: bytes, now: datetime) -> dict[str, Any]:
    """Check a signature-verified index: format, times (refuse expired), versions and channels."""
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"index.json is not JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise RegistryError(f"index.json format is not {INDEX_FORMAT}")
    issued = parse_time(index.get("issued_at"), "issued_at")
    expires = parse_time(index.get("expires_at"), "expires_at")
    if now >= expires:
        raise RegistryError(f"index expired at {iso(expires)} (issued {iso(issued)}): a stale or replayed "
                            "registry; the publisher must re-sign it")
    versions = index.get("versions")
    channels = index.get("channels")
    if not isinstance(versions, dict) or not isinstance(channels, dict):
        raise RegistryError("index.json lacks versions or channels")
    for version, entry in versions.items():
        try:
            parse_version(version)
        except BundleError as exc:
            raise RegistryError(f"index: {exc}") from exc
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or not isinstance(entry.get("path"), str):
            raise RegistryError(f"index entry {version} lacks path or files")
        for name, spec in files.items():
            if "/" in name or name.startswith(".") or not isinstance(spec, dict) \
                    or not isinstance(spec.get("size"), int) or spec["size"] < 0 \
                    or not isinstance(spec.get("sha256"), str) or len(spec["sha256"]) != 64:
                raise RegistryError(f"index entry {version} file {name!r} is malformed")
        if ".." in entry["path"].split("/") or entry["path"].startswith("/"):
            raise RegistryError(f"index entry {version} path {entry['path']!r} leaves the registry")
    return index


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_index(registry: Path, index: dict[str, Any], key: Ed25519PrivateKey,
                now: datetime | None = None, validity: timedelta = DEFAULT_VALIDITY) -> bytes:
    """Stamp issued_at/expires_at, write index.json and its detached signature; return the bytes."""
    now = now or datetime.now(timezone.utc)
    index = dict(index, format=INDEX_FORMAT, issued_at=iso(now), expires_at=iso(now + validity))
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    # The signature goes first: a host serving between the two writes shows a bad pair for a moment
    # (the site refuses and retries next time), never a new index with nothing to check it by.
    signature = sign(key, data)
    _atomic_write(registry / INDEX_SIG_FILE, signature)
    _atomic_write(registry / INDEX_FILE, data)
    return data


def read_registry_index(registry: Path) -> dict[str, Any]:
    path = Path(registry) / INDEX_FILE
    if not path.exists():
        return {"format": INDEX_FORMAT, "versions": {}, "channels": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _bundle_files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.iterdir() if p.is_file() and not p.name.endswith(".sig")
                  and not p.name.startswith("."))


def publish(bundle: Path, registry: Path, channel: str, key: Ed25519PrivateKey,
            now: datetime | None = None, validity: timedelta = DEFAULT_VALIDITY) -> str:
    """Add a bundle under bundles/<version>/ (never rewriting one), point ``channel`` at it, re-sign."""
    bundle, registry = Path(bundle), Path(registry)
    try:
        manifest, _ = read_bundle(bundle)
    except BundleError as exc:
        raise SyncError(f"cannot publish: {exc}") from exc
    if not isinstance(manifest.raw.get("selftest"), dict):
        raise SyncError(f"cannot publish {bundle}: no self-test (sites refuse it); run edge-sync add-selftest")
    version = manifest.version
    registry.mkdir(parents=True, exist_ok=True)
    index = read_registry_index(registry)
    dest = registry / "bundles" / version
    sources = _bundle_files(bundle)
    if dest.exists():
        published = {p.name for p in _bundle_files(dest)}
        same = published == {p.name for p in sources} and all(
            (dest / p.name).read_bytes() == p.read_bytes() for p in sources)
        if not same:
            raise SyncError(f"version {version} is already published with different bytes; "
                            "bump the version (a published version is never rewritten)")
    else:
        staging = Path(tempfile.mkdtemp(dir=registry, prefix=f".publish-{version}-"))
        try:
            for source in sources:
                shutil.copyfile(source, staging / source.name)
            (staging / MANIFEST_SIG_FILE).write_bytes(sign(key, (staging / MANIFEST_FILE).read_bytes()))
            dest.parent.mkdir(exist_ok=True)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not (dest / MANIFEST_SIG_FILE).exists():
        (dest / MANIFEST_SIG_FILE).write_bytes(sign(key, (dest / MANIFEST_FILE).read_bytes()))
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(dest.iterdir()) if p.is_file()}
    index.setdefault("versions", {})[version] = {"path": f"bundles/{version}/", "files": files}
    index.setdefault("channels", {})[channel] = version
    write_index(registry, index, key, now=now, validity=validity)
    return version


def resign(registry: Path, key: Ed25519PrivateKey, now: datetime | None = None,
           validity: timedelta = DEFAULT_VALIDITY) -> str:
    """Re-sign the unchanged index with a fresh expiry (a cron job on the registry); return expires_at."""
    registry = Path(registry)
    if not (registry / INDEX_FILE).exists():
        raise SyncError(f"{registry} has no {INDEX_FILE}; publish a bundle first")
    data = write_index(registry, read_registry_index(registry), key, now=now, validity=validity)
    return json.loads(data)["expires_at"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
