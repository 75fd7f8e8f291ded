"""What to sync, read from the agents' own TOML configs: one job per line that syncs.

A site keeps one config per line (``/etc/postcode-edge/lines/<line>.toml``); its ``[sync]``
section says where models come from and which keys to trust, ``model.bundle`` (the models
folder's ``active`` pointer) where they go, and ``[mqtt]`` how to report and health-check.
So ``edge-sync pull --config /etc/postcode-edge/lines`` needs nothing else, and a canary line
is just a line whose ``sync.channel`` is ``canary``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import AgentConfig, ConfigError, error_key, load_config, mqtt_password
from sync.errors import SyncError
from sync.fetch import HttpSettings
from sync.mqtt_report import HealthCriteria
from sync.pull import PullSettings
from sync.signing import load_public_key


@dataclass(frozen=True)
class MqttTarget:
    """Where a line's sync events go and its health is watched: the line's own broker and login."""

    host: str
    port: int
    site: str
    line: str
    prefix: str = "postcode"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None


@dataclass(frozen=True)
class Job:
    """One line's pull: what to fetch and trust, where it goes, and how to prove it healthy."""

    name: str  # "<site>/<line>", or the models folder for a pull given on the command line
    settings: PullSettings
    mqtt: MqttTarget | None
    health: HealthCriteria


def config_files(path: Path) -> list[Path]:
    """The TOML file itself, or every ``*.toml`` in the folder (sorted: a stable order of lines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.toml") if p.is_file())
        if not files:
            raise SyncError(f"--config {path}: no *.toml line configs in this folder")
        return files
    if not path.is_file():
        raise SyncError(f"--config {path}: no such file or folder")
    return [path]


def load_line(path: Path) -> AgentConfig:
    """The line's config; a missing ``active`` bundle is fine here (sync or adopt is what makes it)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        others = [e for e in exc.errors if not (error_key(e) == "model.bundle" and "missing" in e)]
        if not others and exc.config is not None:
            return exc.config
        raise SyncError(f"{path}: " + "; ".join(others)) from None


def line_jobs(path: Path, http: HttpSettings, tolerance: float) -> tuple[list[Job], list[str]]:
    """Jobs for the lines that sync, and a note for each config that does not (``sync.registry`` empty)."""
    jobs, skipped = [], []
    for file in config_files(path):
        config = load_line(file)
        name = f"{config.site.site_id}/{config.site.line_id}"
        sync = config.sync
        if not sync.registry:
            skipped.append(f"{file}: {name} does not sync (sync.registry is empty)")
            continue
        settings = PullSettings(registry_url=sync.registry, public_keys=[load_public_key(k) for k in sync.public_keys],
                                models_dir=config.model.bundle.parent, channel=sync.channel, pin=sync.pin or None,
                                keep=sync.keep, tolerance=tolerance, http=http)
        health = HealthCriteria(timeout_s=sync.health_timeout_s, min_reads=sync.min_reads,
                                max_review_pct=sync.max_review_pct)
        jobs.append(Job(name, settings, mqtt_target(config), health))
    return jobs, skipped


def mqtt_target(config: AgentConfig) -> MqttTarget:
    m = config.mqtt
    return MqttTarget(host=m.host, port=m.port, site=config.site.site_id, line=config.site.line_id,
                      prefix=m.topic_prefix, username=m.username or None,
                      password=mqtt_password(m) if m.username else None, tls=m.tls, ca_file=m.ca_file)
