"""The agent's one typed configuration, loaded from TOML; every mistake is one clear line.

Every key has a default, so an empty file is a valid configuration for a lab bench.
Secrets (the MQTT password) come from an environment variable or a file, never the TOML.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "mnist-int8"


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one line per mistake."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


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


@dataclass(frozen=True)
class ReaderSettings:
    postcode_lengths: tuple[int, ...] = (5,)
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h of the postcode field in the frame
    workers: int = 1  # reader threads; 2 on a 4-core box doubles burst throughput of distinct frames


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
    max_inflight: int = 100
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
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
POSITIVE = {"model.num_threads", "camera.fps", "trigger.interval_ms", "trigger.max_payload_bytes",
            "mqtt.port", "mqtt.keepalive_s", "mqtt.result_expiry_s", "mqtt.max_inflight",
            "outbox.max_pending", "review.max_items", "trigger.settle_frames",
            "camera.max_frame_age_ms", "camera.frame_wait_ms", "reader.workers",
            "trigger.decision_budget_ms", "trigger.dedup_window_s", "mqtt.session_expiry_s"}


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


def _check_values(config: AgentConfig, errors: list[str]) -> None:
    for path, allowed in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            errors.append(f"{path}: {value!r} is not one of {', '.join(allowed)}")
    for path in POSITIVE:
        section, key = path.split(".")
        if getattr(getattr(config, section), key) <= 0:
            errors.append(f"{path}: must be positive")
    threshold = config.model.acceptance_threshold
    if threshold is not None and not 0.0 < threshold <= 1.0:
        errors.append("model.acceptance_threshold: must be in (0, 1]")
    if not config.reader.postcode_lengths or any(n < 1 or n > 12 for n in config.reader.postcode_lengths):
        errors.append("reader.postcode_lengths: give one or more lengths between 1 and 12")
    roi = config.reader.roi
    if roi is not None and (len(roi) != 4 or roi[2] <= 0 or roi[3] <= 0 or min(roi[:2]) < 0):
        errors.append("reader.roi: expected [x, y, width, height] with positive size")
    if not (config.model.bundle / "manifest.json").is_file():
        errors.append(f"model.bundle: no model bundle at {config.model.bundle} (manifest.json missing)")
    background = config.trigger.background_image
    if background is not None and not background.is_file():
        errors.append(f"trigger.background_image: {background} does not exist")
    if config.mqtt.password_file is not None and not config.mqtt.password_file.is_file():
        errors.append(f"mqtt.password_file: {config.mqtt.password_file} does not exist")
    if (config.mqtt.cert_file is None) != (config.mqtt.key_file is None):
        errors.append("mqtt.cert_file and mqtt.key_file: give both for client-certificate TLS, or neither")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(config.mqtt, key)
        if path is not None and not path.is_file():
            errors.append(f"mqtt.{key}: {path} does not exist")
    if config.camera.reopen_backoff_min_s > config.camera.reopen_backoff_max_s:
        errors.append("camera.reopen_backoff_min_s: must not exceed reopen_backoff_max_s")


def parse_config(table: dict[str, Any], base_dir: Path | None = None) -> AgentConfig:
    """Build and validate an AgentConfig from a parsed TOML table."""
    errors: list[str] = []
    config = _build(AgentConfig, table, "", errors)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    if not errors:
        _check_values(config, errors)
    if errors:
        raise ConfigError(errors)
    return config


def _resolve_paths(config: AgentConfig, base_dir: Path) -> AgentConfig:
    """Relative paths in a config file are relative to that file, not to the working directory."""
    def fix(section: Any) -> Any:
        changes = {f.name: base_dir / getattr(section, f.name) for f in dataclasses.fields(section)
                   if isinstance(getattr(section, f.name), Path) and not getattr(section, f.name).is_absolute()}
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
