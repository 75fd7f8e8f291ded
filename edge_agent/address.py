"""``HOST:PORT`` as an engineer types it for a broker, parsed once for every command that takes one."""

from __future__ import annotations

import re

MQTT_PORT = 1883
_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([A-Za-z0-9.\-]+)(?::(\d{1,5}))?")


def parse_host_port(text: str, default_port: int = MQTT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (the default port) or ``[v6addr]:PORT`` into (host, port).

    Raises ValueError naming what is wrong; callers add which option it came from.
    """
    match = _ADDRESS.fullmatch(text.strip())
    if not match:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or default_port)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return host, port
