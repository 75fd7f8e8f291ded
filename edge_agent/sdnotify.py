"""systemd's readiness and watchdog protocol (sd_notify(3)): datagrams to ``$NOTIFY_SOCKET``.

The protocol is a few lines of text on a Unix datagram socket, so it is spoken directly here
rather than through a library. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("edge_agent.sdnotify")


class Notifier:
    """Sends READY=1, WATCHDOG=1, STATUS=..., STOPPING=1 to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace (a leading NUL byte on the wire).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._warned = False
        self.watchdog_period_s = _watchdog_period(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_period_s is not None

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False (logged once) if it could not be sent."""
        if not self._address:
            return False
        message = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self._address)
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd on %r: %s", self._address, exc)
                self._warned = True
            return False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_period(env: Mapping[str, str]) -> float | None:
    """How often to ping: half of WatchdogSec, as sd_watchdog_enabled(3) advises; None if no watchdog.

    WATCHDOG_PID names the process the watchdog is meant for; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2.0
