"""The agent's one typed configuration, loaded from TOML; every mistake is one clear line.

Every key has a default, so an empty file is a valid configuration for a lab bench.
Secrets (the MQTT password) come from an environment variable or a file, never the TOML.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.bundle import MANIFEST_FILE, BundleError, parse_manifest



def _shipped_bundle() -> Path:
    """The model bundle that comes with the package.

    In a source checkout it is ``models/mnist-int8``; a wheel installs the same files as data
    under ``<venv>/share/postcode-edge/models/mnist-int8`` (see setup.py's ``data_files``).
    """
    checkout = Path(__file__).resolve().parent.parent / "models" / "mnist-int8"
    installed = Path(sys.prefix) / "share" / "postcode-edge" / "models" / "mnist-int8"
    return checkout if checkout.is_dir() else installed


DEFAULT_BUNDLE = _shipped_bundle()


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one line per mistake."""

    def __init__(self, errors: list[str], config: AgentConfig | None = None):
        super().__init__("\n".join(errors))
        self.errors = errors
        # As far as it could be built (defaults stand in for unusable values), so that
        # --validate-config can go on to check the bundle and folders; None if unreadable.
        self.config = config


@dataclass(frozen=True)
class SiteConfig:
    site_id: str = "site-1"  # used in MQTT topics and the client id
    line_id: str = "line-1"


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path = DEFAULT_BUNDLE
    num_threads: int = 1  # XNNPACK threads; 1 leaves a core for OpenCV and MQTT
    acceptance_threshold: float | None = None  # override the bundle's (e.g. stricter at one site)


@dataclass(frozen=True)
class CameraConfig:
    source: str = "0"  # V4L2 index or /dev/videoN, rtsp:// or http:// URL, video file, or image folder
    loop: bool = False  # replay a video file or folder (demo and soak tests)
    fps: float = 30.0  # read rate for file and folder sources; live cameras run at their own rate
    reopen_backoff_min_s: float = 0.5
    # A camera that comes back is reopened within about this long; short, because every
    # second it is not retried is a second of envelopes sent to review.
    reopen_backoff_max_s: float = 1.0
    # An item is read from the frame captured in [trigger - max_frame_age_ms, trigger + frame_wait_ms]:
    # the newest frame at its trigger if it is at most max_frame_age_ms old, else the first one after.
    max_frame_age_ms: int = 200  # an older frame may show the previous envelope: wait for a new one
    wait_after_trigger: bool = False  # always read a frame captured after the trigger (adds a frame time)
    frame_wait_ms: int = 500  # no frame in the window by then: the item goes to review (no_frame)


@dataclass(frozen=True)
class TriggerConfig:
    mode: str = "mqtt"  # "mqtt" (the PLC), "interval" or "change" (scene change)
    interval_ms: int = 1000
    max_payload_bytes: int = 4096
    settle_frames: int = 3  # change mode: still frames after motion before a new envelope is read
    settle_ms: int = 0  # change mode: and still for at least this long (fps-independent)
    background_image: Path | None = None  # change mode: the empty view; settling on it is no envelope
    # The sorting machine acts on an answer only until the envelope reaches the diverter: an item
    # not answered within this budget of its trigger is answered at once as review "late".
    decision_budget_ms: int = 1500
    # A trigger whose item_id was answered within this window gets the stored answer again.
    dedup_window_s: float = 3600.0
    # After the broker connection comes back, a PLC may flush triggers it buffered while the
    # broker was away: without a "triggered_at" stamp their time is unknown, so triggers that
    # arrive this soon after a reconnect are answered as review "late" instead of being read.
    reconnect_guard_ms: int = 3000
    # One camera sees envelopes one after another: unstamped triggers arriving faster than this
    # have queued somewhere and their moment is unknown, so they are answered as review "surge"
    # (0 turns the guard off). Far above a line's rate and the brief's 100/s bursts.
    surge_rate_per_s: float = 250.0


@dataclass(frozen=True)
class ReaderSettings:
    postcode_lengths: tuple[int, ...] = (5,)
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h of the postcode field in the frame
    workers: int = 1  # reader threads; 2 on a 4-core box doubles burst throughput of distinct frames
    # What a result's image_sha256 hashes. "encoded": the bytes a frame came as (a folder's or a
    # network camera's JPEG/PNG: `sha256sum` of the file), which spares decoding the frame to
    # colour and hashing its pixels (~1 ms a frame); frames a camera hands over as pixels are
    # hashed as pixels either way. "pixels": the decoded BGR pixels, for every source.
    frame_hash: str = "encoded"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # default: edge-<site>-<line>
    topic_prefix: str = "postcode"  # topics: <prefix>/<site>/<line>/{trigger,result,review,status,events}
    protocol: str = "auto"  # "auto" (v5, else 3.1.1), "5" or "3.1.1"
    keepalive_s: int = 30
    username: str = ""
    password_env: str = "EDGE_MQTT_PASSWORD"  # environment variable holding the password
    password_file: Path | None = None  # or a file holding it (e.g. a systemd credential)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    result_expiry_s: int = 600  # MQTT v5 message expiry: a read this old is of no use to a sorter
    max_inflight: int = 1000  # results in flight to the broker: a burst drains in round trips of this many
    # After a lost connection, results the broker acknowledged this many seconds before it go out
    # again: a broker killed -9 forgets what it acknowledged since its last autosave (Mosquitto's
    # autosave_interval; the Ansible role sets this to that plus 5). 0 turns it off.
    resend_window_s: int = 15
    # Persistent session: triggers sent while the agent is down wait at the broker this long.
    session_expiry_s: int = 3600
    # MQTT v5 response topics are honoured only under this prefix ("" allows none); never the
    # agent's own topics or another line's.
    response_topic_prefix: str = ""


@dataclass(frozen=True)
class OutboxConfig:
    path: Path = Path("var/outbox.sqlite")
    max_pending: int = 100_000  # past this the oldest undelivered results are dropped and counted
    retention_days: float = 30.0  # audit trail kept this long after delivery


@dataclass(frozen=True)
class ReviewConfig:
    crops_dir: Path = Path("var/review")
    max_items: int = 10_000  # oldest review crops are deleted past this


@dataclass(frozen=True)
class HttpConfig:
    """The agent's own HTTP endpoint: /metrics (Prometheus), /healthz, /readyz."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback: a site that scrapes from elsewhere sets it deliberately
    port: int = 9400  # one agent per line: give each line on a box its own port
    # /readyz wants a read completed this recently while triggers are coming in
    ready_max_read_age_s: float = 120.0


@dataclass(frozen=True)
class ObservabilityConfig:
    """Model and data observability: sliding windows, drift against the site's reference."""

    window_reads: int = 500  # the sliding window: the last N reads ...
    window_s: float = 3600.0  # ... within the last hour
    # The site's own reference: the first N reads after a model change (a real office's digit
    # mix is never uniform: its postcodes share their first digits).
    reference_reads: int = 500
    min_reads: int = 100  # fewer reads in the window: drift is not judged yet
    psi_alarm: float = 0.25  # population stability index at or above this raises the alarm
    blur_alarm: float = 0.5  # mean sharpness below this share of the reference's: "blurred frames"
    # Digits shorter than this on average over the window (as the reader saw them): "small_digits", the
    # camera is too far from the postcode field (docs/OPERATIONS.md). 0 turns the alarm off.
    min_digit_height_px: float = 40.0
    health_period_s: float = 2.0  # events/health every this often (the site dashboard's pulse)
    read_events_per_s: float = 5.0  # events/read (one read with its digit crops) at most this often


@dataclass(frozen=True)
class SortPlanConfig:
    """The site's sort plan (valid postcodes and their chutes) and how sure a chute must be."""

    path: Path | None = None  # CSV postcode,chute; none: decided digit by digit on the bundle's threshold
    # At most this share of the mail sorted automatically goes to a wrong chute. 1 in 1,000 held
    # to every item: on validation postcodes it sorted 81% (8,000 codes) and 73% (30,000), no
    # misdirect; 1 in 10,000 sorted 67% and 52%, no better than digit by digit (docs/BENCHMARKS.md).
    target_misdirect_rate: float = 1e-3
    # Share of mail written with a postcode the plan does not have. Set it from the site's own
    # counts; err high: a prior below the true share sorts such mail onto a valid neighbour. On
    # validation envelopes with 5% of such mail (30,000 codes, 5 seeds), a 1% prior sorted 6 of
    # them and misdirected 7 of 7,685 (99.91%); 5% sorted 1 and misdirected 2 of 7,189, for about
    # 5 points less mail sorted (docs/BENCHMARKS.md). Every figure in the docs is at 5%.
    invalid_prior: float = 0.05
    # "per_item": every sorted item at least 1 - target sure. "spent": the target is a rate over
    # the sorted mail and the bar is set from the recent reads' chute posteriors
    # (decoder.MisdirectBudget: 0.99 <= bar <= 1 - target, strict until a quarter of the window is
    # known). "spent" sorts about 6 points more. At 8,000 codes it held 99.94-100% precision on
    # validation and t10k envelopes (86.9% sorted against 80.8%); at 30,000 codes two validation
    # seeds fell to 99.87% and t10k to 99.73% (4 of 1,480) (docs/MODELS.md, section 8). "auto"
    # (the default): "spent" while the plan's valid codes are at most 10% of the codes of their
    # length (decoder.SPARSE_PLAN_SHARE), "per_item" above; decided again on every plan reload.
    acceptance: str = "auto"
    spent_window: int = 2000  # recent reads the spent bar is set from


@dataclass(frozen=True)
class WatchdogConfig:
    """When the agent stops telling systemd it is alive (WATCHDOG=1), so that systemd restarts it.

    Restarting loses nothing (the journal answers every trigger taken in), so a stage that has
    stopped making progress is better restarted than waited for.
    """

    stage_stall_s: float = 10.0  # a pipeline loop (journal, binder, readers, store, ...) silent this long
    camera_stall_s: float = 15.0  # one call into the camera (open or read) has not returned in this long
    mqtt_probe_s: float = 5.0  # while connected, a probe goes to the broker and back this often
    mqtt_echo_timeout_s: float = 20.0  # no probe came back for this long: the MQTT loop is dead or wedged


@dataclass(frozen=True)
class SyncConfig:
    """edge-sync for this line (``edge-sync pull --config``): where models come from, which ones to trust.

    The models folder is the one holding ``model.bundle`` (which must be its ``active`` pointer).
    """

    registry: str = ""  # base URL of the signed registry; "" leaves this line's model alone
    public_keys: tuple[Path, ...] = ()  # Ed25519 public keys trusted for the index (two during a rotation)
    channel: str = "stable"  # "canary" on the one line that tries a release first
    pin: str = ""  # install exactly this version (the only way to go back to an older one)
    keep: int = 3  # previous versions kept on disk for rollback
    health_timeout_s: float = 60.0  # the agent must prove the new model healthy within this long
    min_reads: int = 5  # reads on the new version needed to judge it (when triggers come)
    max_review_pct: float = 90.0  # more reads than this sent to review: the new model is unhealthy


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    json: bool = True  # JSON lines for journald; plain text for a terminal


@dataclass(frozen=True)
class AgentConfig:
    site: SiteConfig = field(default_factory=SiteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    sort_plan: SortPlanConfig = field(default_factory=SortPlanConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.site.site_id}/{self.site.line_id}"

    def topic(self, kind: str) -> str:
        return f"{self.topic_base}/{kind}"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-{self.site.site_id}-{self.site.line_id}"


CHOICES = {
    "trigger.mode": ("mqtt", "interval", "change"),
    "mqtt.protocol": ("auto", "5", "3.1.1"),
    "reader.frame_hash": ("encoded", "pixels"),
    "sort_plan.acceptance": ("auto", "spent", "per_item"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
MQTT_MAX_UINT16 = 65_535  # port, keepalive and receive maximum are 16-bit fields in MQTT
MQTT_MAX_UINT32 = 4_294_967_295  # message and session expiry intervals are 32-bit seconds
# Inclusive (lowest, highest) bounds; None: no bound on that side.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "model.num_threads": (1, 64),
    "camera.fps": (None, 1000),  # above 0 too (POSITIVE); more than this is a typo, not a camera
    "camera.max_frame_age_ms": (1, None),
    "camera.frame_wait_ms": (1, None),
    "trigger.interval_ms": (1, None),
    "trigger.max_payload_bytes": (1, None),
    "trigger.settle_frames": (1, None),
    "trigger.settle_ms": (0, None),
    "trigger.decision_budget_ms": (1, None),
    "trigger.reconnect_guard_ms": (0, None),
    "trigger.surge_rate_per_s": (0, 100_000),
    "reader.workers": (1, 16),
    "mqtt.port": (1, MQTT_MAX_UINT16),
    # The MQTT link refuses less: pings that often only add false disconnects on a slow link.
    "mqtt.keepalive_s": (5, MQTT_MAX_UINT16),
    "mqtt.result_expiry_s": (1, MQTT_MAX_UINT32),
    "mqtt.max_inflight": (1, MQTT_MAX_UINT16),
    "mqtt.resend_window_s": (0, 86_400),
    "mqtt.session_expiry_s": (1, MQTT_MAX_UINT32),
    "outbox.max_pending": (1, None),
    "outbox.retention_days": (0, None),
    "review.max_items": (1, None),
    "http.port": (1, 65_535),
    "http.ready_max_read_age_s": (1, None),
    "observability.window_reads": (10, 1_000_000),
    "observability.window_s": (10, None),
    "observability.reference_reads": (10, 1_000_000),
    "observability.min_reads": (1, None),
    "observability.psi_alarm": (0.01, 10),
    "observability.blur_alarm": (0.01, 1),
    "observability.min_digit_height_px": (0, 1000),
    "observability.health_period_s": (0.2, 3600),
    "observability.read_events_per_s": (0, 100),
    "sort_plan.target_misdirect_rate": (1e-9, 0.5),
    "sort_plan.invalid_prior": (1e-9, 0.5),
    "sort_plan.spent_window": (100, 1_000_000),
    "watchdog.stage_stall_s": (1, 3600),
    "watchdog.camera_stall_s": (1, 3600),
    "watchdog.mqtt_probe_s": (1, 3600),
    "watchdog.mqtt_echo_timeout_s": (2, 3600),
    "sync.keep": (1, 100),
    "sync.health_timeout_s": (1, 86_400),
    "sync.min_reads": (1, None),
    "sync.max_review_pct": (0, 100),
}
# Fractional keys that must be above zero (a range's inclusive lower bound cannot say that).
POSITIVE = {"camera.fps", "camera.reopen_backoff_min_s", "trigger.dedup_window_s"}
# Topic levels: a wildcard would make the agent subscribe to, or answer on, other lines' topics.
TOPIC_LEVELS = ("site.site_id", "site.line_id")
TOPIC_PREFIXES = ("mqtt.topic_prefix", "mqtt.response_topic_prefix")


def error_key(line: str) -> str:
    """The config key an error line is about: every line starts with it (``mqtt.port: ...``)."""
    return line.split(": ", 1)[0].split("[", 1)[0]


def _convert(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """Check one TOML value against a type hint; record an error line and return None if wrong."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(value, options[0], where, errors)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {type(value).__name__}")
            return None
        return _build(hint, value, where, errors)
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return None
        item = typing.get_args(hint)[0]
        items = [_convert(v, item, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items)
    if hint is Path:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a path string, got {type(value).__name__}")
            return None
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or
                                            (hint is not bool and isinstance(value, bool))):
        errors.append(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return None
    return value


def _build(cls: type, table: dict[str, Any], where: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            errors.append(f"{where + '.' if where else ''}{key}: unknown key "
                          f"(known: {', '.join(sorted(known))})")
    values = {}
    for name in known & table.keys():
        values[name] = _convert(table[name], hints[name], f"{where + '.' if where else ''}{name}", errors)
    return cls(**{k: v for k, v in values.items() if v is not None})


def _value(config: AgentConfig, path: str) -> Any:
    section, key = path.split(".")
    return getattr(getattr(config, section), key)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bound_error(path: str, value: float, low: float | None, high: float | None) -> str | None:
    if (low is None or value >= low) and (high is None or value <= high):
        return None
    given = _number(value)
    if low is not None and high is not None:
        return f"{path}: must be between {_number(low)} and {_number(high)}, got {given}"
    if low == 0:
        return f"{path}: must not be negative, got {given}"
    if low == 1:
        return f"{path}: must be positive, got {given}"
    return f"{path}: must be at least {_number(low)}, got {given}" if low is not None \
        else f"{path}: must be at most {_number(high)}, got {given}"


def _check_values(config: AgentConfig, errors: list[str], unusable: set[str]) -> None:
    """Ranges and cross-field rules; keys in ``unusable`` already have a line and hold their default."""
    def given(*keys: str) -> bool:
        # A wrong-typed value was replaced by its default: a rule comparing it with another key
        # would blame a number the operator never wrote.
        return not any(k in unusable or k.split(".")[0] in unusable for k in keys)

    for path, allowed in CHOICES.items():
        value = _value(config, path)
        if value not in allowed:
            errors.append(f"{path}: {value!r} is not one of {', '.join(allowed)}")
    for path in sorted(POSITIVE):
        value = _value(config, path)
        if value <= 0:
            errors.append(f"{path}: must be positive, got {_number(value)}")
    for path, (low, high) in RANGES.items():
        line = _bound_error(path, _value(config, path), low, high)
        if line and not (path in POSITIVE and _value(config, path) <= 0):  # one line per key
            errors.append(line)
    if not config.mqtt.host.strip():
        errors.append("mqtt.host: must name the broker (a host name or an IP address)")
    for path in TOPIC_LEVELS:
        value = _value(config, path)
        if not value or any(c in value for c in "/+#"):
            errors.append(f"{path}: {value!r} must be a single MQTT topic level: not empty, no '/', '+' or '#'")
    for path in TOPIC_PREFIXES:
        value = _value(config, path)
        if any(c in value for c in "+#"):
            errors.append(f"{path}: {value!r} must not contain the MQTT wildcards '+' or '#'; "
                          "it is the start of a topic name, not a subscription filter")
    if not config.mqtt.topic_prefix.strip("/"):
        errors.append("mqtt.topic_prefix: must not be empty (topics are <prefix>/<site>/<line>/...)")
    threshold = config.model.acceptance_threshold
    if threshold is not None and not 0.0 < threshold <= 1.0:
        errors.append("model.acceptance_threshold: must be in (0, 1]")
    elif threshold is not None and given("model.bundle", "model.acceptance_threshold"):
        _check_threshold_is_stricter(config.model.bundle, threshold, errors)
    lengths = config.reader.postcode_lengths
    if not lengths or any(n is not None and not 1 <= n <= 12 for n in lengths):
        errors.append("reader.postcode_lengths: give one or more lengths between 1 and 12")
    roi = config.reader.roi
    if roi is not None and None not in roi and (len(roi) != 4 or roi[2] <= 0 or roi[3] <= 0
                                                or min(roi[:2]) < 0):
        errors.append("reader.roi: expected [x, y, width, height] with positive size")
    if not (config.model.bundle / MANIFEST_FILE).is_file():
        errors.append(f"model.bundle: no model bundle at {config.model.bundle} (manifest.json missing)")
    background = config.trigger.background_image
    if background is not None and not background.is_file():
        errors.append(f"trigger.background_image: {background} does not exist")
    if config.mqtt.password_file is not None and not config.mqtt.password_file.is_file():
        errors.append(f"mqtt.password_file: {config.mqtt.password_file} does not exist")
    if (config.mqtt.cert_file is None) != (config.mqtt.key_file is None) \
            and given("mqtt.cert_file", "mqtt.key_file"):
        errors.append("mqtt.cert_file and mqtt.key_file: give both for client-certificate TLS, or neither")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(config.mqtt, key)
        if path is not None and not path.is_file():
            errors.append(f"mqtt.{key}: {path} does not exist")
    _check_sync(config.sync, config.model.bundle, errors)
    if config.sort_plan.path is not None and not config.sort_plan.path.is_file():
        errors.append(f"sort_plan.path: {config.sort_plan.path} does not exist")
    camera, trigger = config.camera, config.trigger
    if camera.reopen_backoff_min_s > camera.reopen_backoff_max_s \
            and given("camera.reopen_backoff_min_s", "camera.reopen_backoff_max_s"):
        errors.append("camera.reopen_backoff_min_s: must not exceed reopen_backoff_max_s")
    if camera.frame_wait_ms >= trigger.decision_budget_ms \
            and given("camera.frame_wait_ms", "trigger.decision_budget_ms"):
        errors.append(f"camera.frame_wait_ms: {camera.frame_wait_ms} must be less than "
                      f"trigger.decision_budget_ms ({trigger.decision_budget_ms}), else an item whose "
                      "frame arrives at the end of its wait is already answered as late")


def _check_sync(sync: SyncConfig, bundle: Path, errors: list[str]) -> None:
    """A line that syncs needs a registry URL, keys it can read, and its model behind ``active``."""
    if not sync.registry:
        return
    if not sync.registry.startswith(("https://", "http://", "file://")):
        errors.append(f"sync.registry: {sync.registry!r} must be an https://, http:// or file:// URL")
    if not sync.public_keys:
        errors.append("sync.public_keys: a line that syncs must pin at least one registry public key")
    for key in sync.public_keys:
        if key is not None and not key.is_file():
            errors.append(f"sync.public_keys: {key} does not exist")
    if not sync.channel or "/" in sync.channel:
        errors.append(f"sync.channel: {sync.channel!r} must be a channel name such as stable or canary")
    if bundle.name != "active":
        errors.append(f"model.bundle: {bundle} must be the models folder's active pointer "
                      "(<models>/active) on a line that syncs, or edge-sync would swap a model the agent never loads")


def _check_threshold_is_stricter(bundle: Path, threshold: float, errors: list[str]) -> None:
    """A site may demand more confidence than the bundle's own threshold, never less."""
    manifest_path = bundle / MANIFEST_FILE
    if not manifest_path.is_file():
        return  # reported as model.bundle
    try:
        manifest = parse_manifest(manifest_path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, BundleError) as exc:
        errors.append(f"model.acceptance_threshold: cannot compare {threshold} with the bundle's own "
                      f"threshold, {manifest_path} cannot be read: {exc}")
        return
    if threshold < manifest.acceptance_threshold:
        errors.append(f"model.acceptance_threshold: {threshold} is looser than the bundle's own "
                      f"{manifest.acceptance_threshold} ({manifest.name} {manifest.version}); an override "
                      f"may only be stricter: set it to {manifest.acceptance_threshold} or more, or remove it")


def parse_config(table: dict[str, Any], base_dir: Path | None = None) -> AgentConfig:
    """Build and validate an AgentConfig from a parsed TOML table; ConfigError lists every mistake."""
    errors: list[str] = []
    config = _build(AgentConfig, table, "", errors)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    _check_values(config, errors, unusable={error_key(line) for line in errors})
    if errors:
        raise ConfigError(errors, config)
    return config


def state_path_errors(config: AgentConfig) -> list[str]:
    """Why the agent could not keep its outbox or review crops where configured; creates nothing."""
    errors = []
    outbox = config.outbox.path
    if outbox.is_dir():
        errors.append(f"outbox.path: {outbox} is a folder; give the path of the outbox file, "
                      f"e.g. {outbox / 'outbox.sqlite'}")
    else:
        problem = _folder_problem(outbox.parent)
        if problem:
            errors.append(f"outbox.path: {problem}")
        elif outbox.exists() and not os.access(outbox, os.R_OK | os.W_OK):
            errors.append(f"outbox.path: {outbox} cannot be read and written by this user "
                          f"(uid {os.geteuid()})")
    problem = _folder_problem(config.review.crops_dir)
    if problem:
        errors.append(f"review.crops_dir: {problem}")
    return errors


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is neither a usable folder nor creatable by this user, or None."""
    user = f"this user (uid {os.geteuid()})"
    # mkdir -p succeeds if the nearest thing that exists on the way down is a folder we may write in.
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if existing is None:
        return f"cannot create {folder}: none of its parent folders exists"
    if not existing.is_dir():
        what = "a file" if existing.exists() else "a broken symbolic link"
        if existing == folder:
            return f"{folder} is {what}, not a folder"
        return f"cannot create {folder}: {existing} is {what}, not a folder"
    if existing == folder:
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            return f"{folder} is not writable by {user}"
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create {folder}: {existing} is not writable by {user}"
    return None


def _is_loopback(host: str) -> bool:
    name = host.strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def security_warnings(config: AgentConfig) -> list[str]:
    """Risky but working MQTT settings, one line each: the broker is reached over a network."""
    mqtt = config.mqtt
    if _is_loopback(mqtt.host):
        return []  # the broker is on this machine: nothing crosses a network
    warnings = []
    if not mqtt.username:
        warnings.append(f"mqtt.username: empty, so the agent connects to {mqtt.host} anonymously; a broker "
                        "that lets it in lets any client on the network publish triggers and read results: "
                        "set mqtt.username and its password (mqtt.password_env or mqtt.password_file)")
    if not mqtt.tls:
        carried = "triggers, results and the password" if mqtt.username else "triggers and results"
        warnings.append(f"mqtt.tls: false, so {carried} cross the network to {mqtt.host} in plain text: "
                        "set mqtt.tls = true (and mqtt.ca_file for the site's own CA)")
    return warnings


def _resolve_paths(config: AgentConfig, base_dir: Path) -> AgentConfig:
    """Relative paths in a config file are relative to that file, not to the working directory."""
    def fix_one(value: Any) -> Any:
        return base_dir / value if isinstance(value, Path) and not value.is_absolute() else value

    def fix(section: Any) -> Any:
        changes = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, Path):
                changes[f.name] = fix_one(value)
            elif isinstance(value, tuple) and any(isinstance(v, Path) for v in value):
                changes[f.name] = tuple(fix_one(v) for v in value)  # e.g. sync.public_keys
        return dataclasses.replace(section, **changes)

    return dataclasses.replace(config, **{f.name: fix(getattr(config, f.name))
                                          for f in dataclasses.fields(config)})


def load_config(path: Path) -> AgentConfig:
    """Read a TOML file; ConfigError lists every mistake."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such configuration file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_config(table, base_dir=Path(path).resolve().parent)


def mqtt_password(config: MqttConfig, environ: typing.Mapping[str, str] = os.environ) -> str | None:
    """The broker password from the configured file or environment variable, if any."""
    if config.password_file is not None:
        return config.password_file.read_text(encoding="utf-8").strip()
    return environ.get(config.password_env) or None
