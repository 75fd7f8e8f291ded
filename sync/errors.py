"""One small hierarchy: every refusal is a SyncError whose message is one line naming the reason."""

from __future__ import annotations


class SyncError(Exception):
    """Something was refused or failed; the active model is untouched."""


class SignatureError(SyncError):
    """A signature is missing, malformed or made by no pinned key."""


class RegistryError(SyncError):
    """The registry's index is unusable: not JSON, expired, older than one seen, no such channel."""


class DownloadError(SyncError):
    """A transfer failed: HTTP error, timeout, size over the listed size or the cap, sha256 mismatch."""


class ValidationError(SyncError):
    """A verified bundle is not fit to run: does not load, wrong contract, self-test below its figure."""


class ActivationError(SyncError):
    """The switch itself failed (disk full, permissions); the previous model stays active."""
