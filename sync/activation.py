"""The models folder the site owns, and the atomic switch of ``active``.

    DIR/active -> versions/<version>      relative symlink, replaced atomically (the agent loads this)
    DIR/versions/<version>/               complete, verified bundles only (arrive by rename)
    DIR/staging/<version>/                downloads in progress (``*.part`` resumes with HTTP Range)
    DIR/state.json                        high-water mark, previous, failed versions, ETag, last check
    DIR/index.json, DIR/index.json.sig    the last verified index (reused on 304 Not Modified)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.bundle import parse_version
from sync.errors import ActivationError, SyncError

ACTIVE = "active"
VERSIONS = "versions"
STAGING = "staging"
STATE_FILE = "state.json"
DEFAULT_KEEP = 3


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file in a bundle folder, then the folder itself."""
    for child in Path(path).iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(models_dir: Path) -> dict[str, Any]:
    path = Path(models_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}  # state.json is written atomically; an unreadable one is rebuilt from what is on disk
    return state if isinstance(state, dict) else {}


def save_state(models_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(Path(models_dir) / STATE_FILE, state)


def active_version(models_dir: Path) -> str | None:
    """The version ``active`` points to, or None when nothing is active yet."""
    link = Path(models_dir) / ACTIVE
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return Path(target).name


def active_bundle(models_dir: Path) -> Path:
    """The complete, verified bundle the agent should load: ``DIR/active`` resolved to its version folder.

    Resolve once and load from the returned path: ``active`` may be switched at any moment, and
    the folder it pointed to stays intact until a later pull prunes it.
    """
    link = Path(models_dir) / ACTIVE
    if not link.is_symlink():
        raise SyncError(f"{link} does not exist: no model has been activated yet")
    resolved = link.resolve(strict=False)
    if not resolved.is_dir():
        raise SyncError(f"{link} points to {resolved}, which is missing")
    return resolved


def installed_versions(models_dir: Path) -> list[str]:
    root = Path(models_dir) / VERSIONS
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        try:
            parse_version(child.name)
        except Exception:  # noqa: BLE001 - a stray folder is not ours to judge
            continue
        if child.is_dir():
            found.append(child.name)
    return sorted(found, key=parse_version)


def switch_active(models_dir: Path, version: str) -> None:
    """Point ``active`` at versions/<version>: a new symlink renamed over the old one, folder fsynced."""
    models_dir = Path(models_dir)
    if not (models_dir / VERSIONS / version).is_dir():
        raise ActivationError(f"version {version} is not installed")
    tmp = models_dir / f"{ACTIVE}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"{VERSIONS}/{version}", tmp)
    os.replace(tmp, models_dir / ACTIVE)
    fsync_dir(models_dir)


def install(models_dir: Path, version: str, staged: Path,
            pause: Callable[[str], None] = lambda step: None) -> None:
    """Move a verified staged bundle to versions/<version> (fsync, rename, fsync) and switch to it."""
    models_dir = Path(models_dir)
    versions = models_dir / VERSIONS
    versions.mkdir(exist_ok=True)
    final = versions / version
    try:
        fsync_tree(staged)
        if final.exists():
            # Left by an activation killed before the switch; never the active one (checked by the caller).
            shutil.rmtree(final)
        os.rename(staged, final)
        fsync_dir(versions)
        fsync_dir(staged.parent)
        pause("during_activation")
        switch_active(models_dir, version)
        pause("after_switch")
    except OSError as exc:
        raise ActivationError(f"activation of {version} failed: {exc.strerror or exc}") from exc


def prune(models_dir: Path, keep: int, active: str, previous: str | None) -> list[str]:
    """Keep the active version and the ``keep`` newest others (the rollback target always); delete the rest."""
    others = [v for v in installed_versions(models_dir) if v != active]
    doomed = [v for v in (others[:-keep] if keep > 0 else others) if v != previous]
    for version in doomed:
        shutil.rmtree(Path(models_dir) / VERSIONS / version, ignore_errors=True)
    return doomed


def rollback(models_dir: Path, reason: str = "rolled back") -> tuple[str, str]:
    """Switch ``active`` back to the recorded previous version; the high-water mark stays.

    The version left is remembered as failed with ``reason`` (the health check passes its own),
    so the next pull does not install it again; a newer version supersedes it.
    """
    models_dir = Path(models_dir)
    state = load_state(models_dir)
    current = active_version(models_dir)
    previous = state.get("previous")
    if not previous or previous == current:
        raise SyncError("no previous version to roll back to")
    if not (models_dir / VERSIONS / previous).is_dir():
        raise SyncError(f"previous version {previous} is no longer installed")
    switch_active(models_dir, previous)
    state["previous"] = current
    if current:
        # The rolled-back version is not fetched again; a newer version supersedes it.
        state.setdefault("failed", {})[current] = reason
    save_state(models_dir, state)
    return current or "", previous


class ActivePointer:
    """What the agent polls between frames: has ``DIR/active`` been switched since the last look?

    ``changed()`` costs one readlink; it returns the newly active bundle's folder once per switch
    (a pull or a rollback), else None. Load from that folder, never from ``DIR/active`` itself.
    """

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self.seen = active_version(self.models_dir)

    def changed(self) -> Path | None:
        current = active_version(self.models_dir)
        if current is None or current == self.seen:
            return None
        self.seen = current
        return active_bundle(self.models_dir)
