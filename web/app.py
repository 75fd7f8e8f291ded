"""edge-web: the site dashboard, a read-only Flask app over a SiteState."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from web.state import LINE_ID, MAX_MINUTES, StateUnavailable

log = logging.getLogger(__name__)

DEFAULT_MINUTES = 30
MAX_QUERY_CHARS = 256  # no route takes more than a few short parameters

SECURITY_HEADERS = {
    # Scripts and styles only from static files of this appliance; the crops are data: images.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class StateSource(Protocol):
    site: str

    def snapshot(self, minutes: int = ...) -> dict[str, Any]: ...

    def line(self, line_id: str, minutes: int = ...) -> dict[str, Any] | None: ...


class BadRequest(ValueError):
    """A query parameter the API does not take, with a message for the client."""


def create_app(state: StateSource, config: Mapping[str, Any] | None = None) -> Flask:
    """The dashboard app; ``state`` answers snapshots, ``config`` overrides Flask settings."""
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config.from_mapping(REFRESH_MS=1000, SEND_FILE_MAX_AGE_DEFAULT=300, MAX_CONTENT_LENGTH=1024)
    if config:
        app.config.from_mapping(config)
    app.extensions["site_state"] = state
    _register_routes(app)
    _register_errors(app)
    app.after_request(_secure)
    return app


def _state() -> StateSource:
    return current_app.extensions["site_state"]


def _query(allowed: Mapping[str, tuple[int, int, int]]) -> dict[str, int]:
    """Integer query parameters within their bounds; anything else is a BadRequest."""
    if len(request.query_string) > MAX_QUERY_CHARS:
        raise BadRequest(f"query string longer than {MAX_QUERY_CHARS} characters")
    values: dict[str, int] = {}
    for name in request.args:
        if name not in allowed:
            names = ", ".join(allowed) or "none"
            raise BadRequest(f"unknown query parameter {name[:40]!r} (allowed: {names})")
    for name, (low, high, default) in allowed.items():
        raw = request.args.getlist(name)
        if len(raw) > 1:
            raise BadRequest(f"{name} given more than once")
        if not raw:
            values[name] = default
            continue
        text = raw[0]
        if not text.isascii() or not text.isdigit() or len(text) > 6:
            raise BadRequest(f"{name} must be a whole number from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {value}")
        values[name] = value
    return values


def _snapshot(call, *args: Any) -> Any:
    """Ask the state; a source that fails is a 503, never a traceback."""
    try:
        return call(*args)
    except Exception as exc:
        log.exception("dashboard state unavailable")
        raise StateUnavailable(str(exc)) from exc


MINUTES = {"minutes": (1, MAX_MINUTES, DEFAULT_MINUTES)}


def _register_routes(app: Flask) -> None:
    @app.get("/")
    def index() -> str:
        _query({})
        return render_template("index.html", site=_state().site, refresh_ms=app.config["REFRESH_MS"],
                               max_minutes=MAX_MINUTES, default_minutes=DEFAULT_MINUTES)

    @app.get("/api/site")
    def api_site() -> Response:
        minutes = _query(MINUTES)["minutes"]
        return jsonify(_snapshot(_state().snapshot, minutes))

    @app.get("/api/line/<line_id>")
    def api_line(line_id: str) -> Response | tuple[Response, int]:
        if not LINE_ID.match(line_id):
            raise BadRequest("line id must be 1-64 characters of A-Z a-z 0-9 _ . -")
        minutes = _query(MINUTES)["minutes"]
        view = _snapshot(_state().line, line_id, minutes)
        if view is None:
            return jsonify(error=f"no line {line_id!r} has been heard from on this site"), 404
        return jsonify(view)

    @app.get("/healthz")
    def healthz() -> Response:
        _query({})
        return jsonify(status="ok")


def _register_errors(app: Flask) -> None:
    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    @app.errorhandler(StateUnavailable)
    def unavailable(_exc: StateUnavailable) -> tuple[Response, int]:
        return jsonify(error="the dashboard's view of the site is unavailable; see edge-web's log"), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(Exception)
    def internal_error(_exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error serving %s", request.path)
        return jsonify(error="internal error; see edge-web's log"), 500


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/") or request.path in ("/", "/healthz"):
        response.headers["Cache-Control"] = "no-store"
    return response
