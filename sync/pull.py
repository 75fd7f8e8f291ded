"""One pull: index -> verify -> choose -> download -> verify -> validate -> activate.

Every step is reported as one event dict (the CLI logs it as a JSON line; the agent side will
publish it on MQTT). Any refusal raises inside and is returned as a ``PullResult`` with one-line
``reason``; ``DIR/active`` is only ever touched by the final switch.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.bundle import MANIFEST_FILE, MODEL_FILE, BundleError, parse_manifest, parse_version, sha256_file
from edge_agent.loader import load_bundle
from sync import activation
from sync.errors import ActivationError, DownloadError, RegistryError, SignatureError, SyncError, ValidationError
from sync.fetch import HttpSettings, NotFound, download, get_index, get_small
from sync.registry import (INDEX_FILE, INDEX_SIG_FILE, MANIFEST_SIG_FILE, MAX_INDEX_BYTES, iso, parse_index,
                           parse_time)
from sync.selftest import DEFAULT_TOLERANCE, run_selftest
from sync.signing import verify

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class PullSettings:
    """What one site pulls, from where, trusting which keys."""

    registry_url: str
    public_keys: Sequence[Ed25519PublicKey]
    models_dir: Path
    channel: str = "stable"
    pin: str | None = None
    keep: int = activation.DEFAULT_KEEP
    tolerance: float = DEFAULT_TOLERANCE
    http: HttpSettings = field(default_factory=HttpSettings)


@dataclass(frozen=True)
class PullResult:
    outcome: str  # "up_to_date", "updated" or "refused"
    version: str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome != "refused"


def _url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _fetch_index(settings: PullSettings, state: dict[str, Any], report: Report) -> tuple[bytes, bytes]:
    """The verified index bytes and signature: fresh, or the cached pair when the server says 304."""
    models_dir = settings.models_dir
    cached, cached_sig = models_dir / INDEX_FILE, models_dir / INDEX_SIG_FILE
    have_cache = cached.is_file() and cached_sig.is_file()
    response = get_index(_url(settings.registry_url, INDEX_FILE), settings.http, MAX_INDEX_BYTES,
                         etag=state.get("etag") if have_cache else None,
                         last_modified=state.get("last_modified") if have_cache else None)
    if response.not_modified:
        # Checked again: the pinned keys may have changed since it was stored (a rotation, a leak).
        body, signature = cached.read_bytes(), cached_sig.read_bytes()
        key = verify(settings.public_keys, body, signature, "cached index.json")
        report({"event": "index_not_modified", "key": key})
        return body, signature
    try:
        signature = get_small(_url(settings.registry_url, INDEX_SIG_FILE), settings.http, 4096, INDEX_SIG_FILE)
    except NotFound as exc:
        raise SignatureError("index.json is unsigned (the registry has no index.json.sig)") from exc
    key = verify(settings.public_keys, response.body, signature, "index.json")
    report({"event": "index_verified", "key": key})
    state["_fresh"] = (response, signature)
    return response.body, signature


def _store_index(settings: PullSettings, state: dict[str, Any]) -> None:
    fresh = state.pop("_fresh", None)
    if fresh is None:
        return
    response, signature = fresh
    for name, data in ((INDEX_SIG_FILE, signature), (INDEX_FILE, response.body)):
        tmp = settings.models_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(settings.models_dir / name)
    state["etag"], state["last_modified"] = response.etag, response.last_modified


def _choose(settings: PullSettings, index: dict[str, Any], state: dict[str, Any],
            active: str | None) -> str | None:
    """The version to install, None when up to date; refusals raise."""
    if settings.pin:
        target = settings.pin
        if target not in index["versions"]:
            raise RegistryError(f"pinned version {target} is not in the registry")
    else:
        target = index["channels"].get(settings.channel)
        if target is None:
            raise RegistryError(f"channel {settings.channel!r} is not in the registry")
        if target not in index["versions"]:
            raise RegistryError(f"channel {settings.channel} points to {target}, which the index does not list")
    if target == active:
        return None
    failed = state.get("failed", {})
    if target in failed:
        raise ValidationError(f"version {target} failed before ({failed[target]}); waiting for a newer one")
    if not settings.pin:
        # Equal to the high-water mark is allowed: published versions are immutable, so that is
        # exactly a version this site once verified (one it rolled back from is in ``failed``).
        floor = [v for v in (active, state.get("high_water")) if v]
        for mark in floor:
            if parse_version(target) < parse_version(mark):
                raise RegistryError(f"downgrade refused: {settings.channel} offers {target}, older than "
                                    f"{mark} (high-water mark {state.get('high_water')}); pin it to downgrade")
    return target


def _verify_bundle(settings: PullSettings, staged: Path, version: str, files: dict[str, Any]) -> None:
    """Signature of the manifest, its version, and that its model sha256 is the model we have."""
    if MANIFEST_FILE not in files or MANIFEST_SIG_FILE not in files or MODEL_FILE not in files:
        raise SignatureError(f"bundle {version} lacks manifest.json, manifest.json.sig or model.tflite")
    manifest_bytes = (staged / MANIFEST_FILE).read_bytes()
    verify(settings.public_keys, manifest_bytes, (staged / MANIFEST_SIG_FILE).read_bytes(),
           f"manifest of {version}")
    try:
        manifest = parse_manifest(manifest_bytes.decode("utf-8"))
    except (BundleError, UnicodeDecodeError) as exc:
        raise ValidationError(f"bundle {version}: {exc}") from exc
    if manifest.version != version:
        raise ValidationError(f"manifest says version {manifest.version}, the index lists it as {version}")
    model_sha = files[MODEL_FILE]["sha256"]
    if manifest.sha256 != model_sha:
        raise ValidationError(f"manifest {version} names model sha256 {manifest.sha256[:12]}... but "
                              f"model.tflite is {model_sha[:12]}...: manifest and model do not belong together")


def _validate(settings: PullSettings, staged: Path, version: str) -> float:
    try:
        model = load_bundle(staged)
    except BundleError as exc:
        raise ValidationError(f"bundle {version} does not load: {exc}") from exc
    try:
        return run_selftest(model, staged, settings.tolerance)
    except ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raises, the bundle is unfit
        raise ValidationError(f"bundle {version} self-test crashed: {exc!r}") from exc


def _finish_interrupted_activation(state: dict[str, Any], active: str | None, report: Report) -> None:
    """Record previous and the high-water mark for a switch that happened (now, or before a kill)."""
    pending = state.pop("activating", None)
    if pending and pending.get("version") == active and active:
        if pending.get("previous") and pending["previous"] != active:
            state["previous"] = pending["previous"]
    if active:
        high = state.get("high_water")
        if not high or parse_version(active) > parse_version(high):
            state["high_water"] = active


def pull(settings: PullSettings, report: Report = lambda event: None,
         now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
         pause: Callable[[str], None] = lambda step: None) -> PullResult:
    """Bring ``models_dir`` to the channel's (or pinned) version, or refuse saying why."""
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return PullResult("refused", None, "another edge-sync pull is running on this models dir")
        state = activation.load_state(models_dir)
        state["last_check"] = iso(now())
        try:
            result = _pull(settings, state, report, now, pause)
            state["last_error"] = None
        except (SyncError, OSError) as exc:
            reason = str(exc) if isinstance(exc, SyncError) else \
                f"file system error in {models_dir}: {exc.strerror or exc}"
            result = PullResult("refused", state.get("_target"), reason)
            state["last_error"] = reason
            report({"event": "refused", "version": result.version, "reason": result.reason})
        state.pop("_fresh", None)
        state.pop("_target", None)
        state["last_result"] = {"outcome": result.outcome, "version": result.version, "reason": result.reason,
                                "at": iso(now())}
        try:
            activation.save_state(models_dir, state)
        except OSError:
            pass  # a full disk: the switch (if any) already happened or did not; state is rebuilt next time
        return result


def _pull(settings: PullSettings, state: dict[str, Any], report: Report,
          now: Callable[[], datetime], pause: Callable[[str], None]) -> PullResult:
    models_dir = Path(settings.models_dir)
    active = activation.active_version(models_dir)
    _finish_interrupted_activation(state, active, report)
    report({"event": "check", "active": active, "channel": settings.channel, "pin": settings.pin})
    index_bytes, _ = _fetch_index(settings, state, report)
    index = parse_index(index_bytes, now())
    last_issued = state.get("index_issued_at")
    if last_issued and parse_time(index["issued_at"], "issued_at") < parse_time(last_issued, "issued_at"):
        raise RegistryError(f"index issued {index['issued_at']} is older than one already seen "
                            f"({last_issued}): replayed")
    _store_index(settings, state)
    state["index_issued_at"] = index["issued_at"]
    target = _choose(settings, index, state, active)
    if target is None:
        report({"event": "up_to_date", "version": active})
        return PullResult("up_to_date", active)
    state["_target"] = target
    entry = index["versions"][target]
    files = entry["files"]
    total = sum(spec["size"] for spec in files.values())
    if total > settings.http.max_bytes:
        raise DownloadError(f"bundle {target} is {total} bytes, over the {settings.http.max_bytes}-byte cap")
    staging_root = models_dir / activation.STAGING
    staged = staging_root / target
    # Only this version's partial files are worth resuming; anything else staged is stale.
    if staging_root.is_dir():
        for other in staging_root.iterdir():
            if other.name != target:
                shutil.rmtree(other, ignore_errors=True)
    staged.mkdir(parents=True, exist_ok=True)
    report({"event": "download", "version": target, "bytes": total})
    started = time.monotonic()
    try:
        for name, spec in sorted(files.items()):
            dest = staged / name
            if dest.is_file() and dest.stat().st_size == spec["size"] and sha256_file(dest) == spec["sha256"]:
                continue  # verified by an earlier, interrupted pull
            dest.unlink(missing_ok=True)
            url = _url(settings.registry_url, entry["path"].rstrip("/") + "/" + name)
            download(url, dest, spec["size"], spec["sha256"], settings.http,
                     on_chunk=lambda done: pause("during_download"))
        for stray in staged.iterdir():
            if stray.name not in files:
                stray.unlink()
        report({"event": "downloaded", "version": target, "seconds": round(time.monotonic() - started, 3)})
        _verify_bundle(settings, staged, target, files)
        report({"event": "verified", "version": target})
        pause("after_verify")
        accuracy = _validate(settings, staged, target)
        report({"event": "validated", "version": target, "selftest_accuracy": round(accuracy, 6)})
    except (SignatureError, ValidationError) as exc:
        # Verified bytes that are wrong stay wrong: remember the version, do not fetch it again.
        state.setdefault("failed", {})[target] = str(exc)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise DownloadError(f"cannot write {target} to {staged}: {exc.strerror or exc}") from exc
    except DownloadError as exc:
        if "sha256" in str(exc) or "more than" in str(exc):
            shutil.rmtree(staged, ignore_errors=True)
        raise
    # Written before the switch: a kill right after it still leaves previous and high-water right.
    state["activating"] = {"version": target, "previous": active}
    activation.save_state(models_dir, {k: v for k, v in state.items() if not k.startswith("_")})
    try:
        activation.install(models_dir, target, staged, pause)
    except SyncError:
        shutil.rmtree(staged, ignore_errors=True)
        state.pop("activating", None)
        raise
    _finish_interrupted_activation(state, target, report)
    pruned = activation.prune(models_dir, settings.keep, target, state.get("previous"))
    report({"event": "activated", "version": target, "previous": active, "pruned": pruned})
    return PullResult("updated", target)


def adopt(models_dir: Path, bundle: Path, tolerance: float = DEFAULT_TOLERANCE,
          report: Report = lambda event: None,
          now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> PullResult:
    """A line's first model: install a local bundle (the one shipped in the package) when none is active.

    Run before every agent start (the unit's ExecStartPre): once a model is active this does
    nothing, so a synced newer version is never replaced by the shipped one. The bundle passes
    the same validation as a pulled one (loads, its self-test holds); there is no signature to
    check because it came with the installed software itself.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # wait for a pull that is switching
        active = activation.active_version(models_dir)
        if active is not None:
            return PullResult("up_to_date", active)
        try:
            version = parse_manifest((Path(bundle) / MANIFEST_FILE).read_text(encoding="utf-8")).version
        except (OSError, BundleError) as exc:
            raise ValidationError(f"cannot adopt {bundle}: {exc}") from exc
        state = activation.load_state(models_dir)
        staged = models_dir / activation.STAGING / version
        shutil.rmtree(staged, ignore_errors=True)
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(bundle, staged)
            accuracy = _validate(PullSettings("", [], models_dir, tolerance=tolerance), staged, version)
            activation.install(models_dir, version, staged)
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise ActivationError(f"cannot adopt {version} into {models_dir}: {exc.strerror or exc}") from exc
        except SyncError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        _finish_interrupted_activation(state, version, report)
        state["last_result"] = {"outcome": "adopted", "version": version, "reason": f"from {bundle}",
                                "at": iso(now())}
        activation.save_state(models_dir, state)
        report({"event": "adopted", "version": version, "bundle": str(bundle), "selftest_accuracy": accuracy})
        return PullResult("updated", version)


def status(models_dir: Path) -> dict[str, Any]:
    """What is active, previous, staged; the high-water mark, failed versions, last check and error."""
    models_dir = Path(models_dir)
    state = activation.load_state(models_dir)
    staging = models_dir / activation.STAGING
    return {
        "active": activation.active_version(models_dir),
        "previous": state.get("previous"),
        "installed": activation.installed_versions(models_dir),
        "staged": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
        "high_water": state.get("high_water"),
        "failed": state.get("failed", {}),
        "last_check": state.get("last_check"),
        "last_error": state.get("last_error"),
        "last_result": state.get("last_result"),
    }


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True)
