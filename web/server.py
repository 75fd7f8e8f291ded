"""waitress on a background thread: the dashboard's production WSGI server (never Flask's own)."""

from __future__ import annotations

from typing import Any

from edge_agent.wsgi_thread import WsgiThread


class DashboardServer(WsgiThread):
    """Binds at construction (a taken port fails at once), serves after ``start()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8080, threads: int = 4) -> None:
        super().__init__(app, host, port, threads=threads, ident="edge-web", name="waitress")
