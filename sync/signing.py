"""Ed25519 keys and detached signatures (base64 text) over exact bytes. Pure but for key files."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.errors import SignatureError, SyncError

PRIVATE_KEY_FILE = "sync-signing.key"
PUBLIC_KEY_FILE = "sync-signing.pub"


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) and its public key; refuse to overwrite."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SyncError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SyncError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SyncError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SyncError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SyncError(f"{path} is not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint for logs: the first 16 hex digits of sha256 of the raw key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The detached signature file's content: base64 of the 64-byte signature and a newline."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(keys: Sequence[Ed25519PublicKey], data: bytes, signature_text: bytes, what: str) -> str:
    """Return the id of the pinned key that signed ``data``; SignatureError otherwise."""
    if not keys:
        raise SignatureError("no public key pinned")
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} signature is not base64") from exc
    if len(signature) != 64:
        raise SignatureError(f"{what} signature is {len(signature)} bytes, not an Ed25519 signature")
    for key in keys:
        try:
            key.verify(signature, data)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError(f"{what} signature does not verify with any pinned key")
