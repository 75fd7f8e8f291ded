"""edge-web's settings: one typed object, built from the command line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_agent.address import parse_host_port
from web.state import LINE_ID

TOPIC_PART = re.compile(r"[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,3}\Z")


class WebConfigError(ValueError):
    """A setting edge-web cannot start with; the message names it."""


@dataclass(frozen=True)
class BrokerSettings:
    """How edge-web reaches the site broker and which topics it reads."""

    host: str = "127.0.0.1"
    port: int = 1883
    site: str = "site-1"
    topic_prefix: str = "postcode"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    # Short: a dead broker is noticed (and shown) within about 1.5 keep-alives.
    keepalive_s: int = 10
    client_id: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def site_base(self) -> str:
        return f"{self.topic_prefix}/{self.site}"


@dataclass(frozen=True)
class WebConfig:
    broker: BrokerSettings
    host: str = "127.0.0.1"  # loopback: serving the site network is a deliberate choice
    port: int = 8080
    threads: int = 4
    log_level: str = "INFO"


def parse_broker_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 1883; ``[v6addr]:PORT``) into its parts."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise WebConfigError(f"--broker: {exc}") from None


def check_names(site: str, topic_prefix: str) -> None:
    """Site and prefix become topic levels: no wildcards, no empty levels."""
    if not LINE_ID.match(site):
        raise WebConfigError(f"--site: {site!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if not TOPIC_PART.match(topic_prefix):
        raise WebConfigError(f"--topic-prefix: {topic_prefix!r} must be topic levels of A-Z a-z 0-9 _ . - "
                             "(no wildcards)")


def read_password(path: Path) -> str:
    """The broker password from a file (e.g. a systemd credential); never from the command line."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise WebConfigError(f"--password-file: cannot read {path}: {exc.strerror}") from None
