"""waitress on a background thread: the dashboard's production WSGI server (never Flask's own)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from waitress.server import create_server

log = logging.getLogger(__name__)


class DashboardServer:
    """Binds at construction (a taken port fails at once), serves after ``start()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8080, threads: int = 4) -> None:
        self._server = create_server(app, host=host, port=port, threads=threads, ident="edge-web",
                                     clear_untrusted_proxy_headers=True)
        self.host, self.port = host, int(self._server.effective_port)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._server.run, name="waitress", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "DashboardServer":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The serving thread still runs (what the systemd watchdog pings depend on)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Close the listening socket and let the worker threads finish what they serve."""
        self._server.close()
        self._server.task_dispatcher.shutdown(timeout=2)  # type: ignore[union-attr]
