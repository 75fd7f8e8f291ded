"""The agent's own HTTP endpoint: /metrics (Prometheus text), /healthz (alive), /readyz (ready).

A small WSGI app served by waitress on a thread, on the address in ``[http]`` (loopback by
default). Read-only; JSON bodies; 503 with the failing checks named when not ready.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.types import Check
from edge_agent.wsgi_thread import WsgiThread

log = logging.getLogger(__name__)

_SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
                     ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]


def readiness(checks: Mapping[str, Check], verdict: str = "ready") -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for /readyz (and /healthz with ``verdict="alive"``): 200 when
    every check passes, else 503 naming the failures."""
    failing = [name for name, check in checks.items() if not check.ok]
    body = {verdict: not failing, "failing": failing,
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()}}
    return (200 if not failing else 503), body


def make_app(registry: CollectorRegistry, ready_checks: Callable[[], Mapping[str, Check]],
             live_checks: Callable[[], Mapping[str, Check]] | None = None):
    """The WSGI app: /metrics, /healthz (is every part making progress), /readyz (can it read
    envelopes now); anything else is a JSON 404."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _json(start_response, 405, {"error": "read-only: use GET"})
        try:
            if path == "/metrics":
                body = generate_latest(registry)
                start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                          ("Content-Length", str(len(body))), *_SECURITY_HEADERS])
                return [body]
            if path == "/healthz":
                status, body = readiness(live_checks() if live_checks else {}, verdict="alive")
                return _json(start_response, status, body)
            if path == "/readyz":
                status, body = readiness(ready_checks())
                return _json(start_response, status, body)
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("serving %s failed", path)
            return _json(start_response, 503, {"error": f"{path} is unavailable; see the agent's log"})
        return _json(start_response, 404, {"error": "not found; try /metrics, /healthz or /readyz"})

    return app


def _json(start_response: Callable[..., Any], status: int, body: Mapping[str, Any]) -> list[bytes]:
    data = json.dumps(body, sort_keys=True).encode()
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                          *_SECURITY_HEADERS])
    return [data]


class EndpointServer(WsgiThread):
    """The endpoint app on waitress, on a thread named ``http``; ``url`` once constructed."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        super().__init__(app, host, port, threads=2, ident="postcode-agent", name="http")

    def start(self) -> "EndpointServer":
        super().start()
        log.info("metrics and health on %s/metrics, /healthz, /readyz", self.url)
        return self
