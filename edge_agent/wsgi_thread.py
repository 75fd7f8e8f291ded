"""A WSGI app served by waitress on a background thread: binds at construction, stops cleanly.

The agent's /metrics endpoint and the site dashboard both run one. waitress's loop is not
thread-safe: closing its sockets from another thread while the loop is inside ``select`` on
them ends the loop thread with "Bad file descriptor" (seen when an agent stopped under load).
So ``stop()`` hands the close to the loop's own thread through waitress's trigger and waits
for the loop to end: the port is free when ``stop()`` returns, and nothing is logged as a crash.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

log = logging.getLogger(__name__)


class WsgiThread:
    """waitress serving ``app`` on a daemon thread named ``name``; ``url`` is valid from construction."""

    def __init__(self, app: Any, host: str, port: int, *, threads: int, ident: str, name: str) -> None:
        # waitress binds in create_server, so a port in use fails here, at start, with a clear error.
        self._server = create_server(app, host=host, port=port, threads=threads, ident=ident,
                                     clear_untrusted_proxy_headers=True)
        self.host, self.port = host, int(self._server.effective_port)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def alive(self) -> bool:
        """The serving thread still runs (what the systemd watchdog pings depend on)."""
        return self._thread.is_alive()

    def start(self) -> "WsgiThread":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Let the worker threads finish what they serve, close every socket, end the loop thread."""
        self._server.task_dispatcher.shutdown(timeout=timeout_s)  # type: ignore[union-attr]
        if not self._thread.is_alive():
            self._server.close()
            return
        # On the loop's own thread: the listening socket, the connections clients kept open and
        # the trigger itself; with nothing left to watch the loop returns.
        sockets = self._server._map  # type: ignore[union-attr]  # the loop's own socket map
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(sockets))  # type: ignore[union-attr]
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the HTTP server on %s did not stop within %.0f s", self.url, timeout_s)
