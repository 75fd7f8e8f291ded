"""A real Mosquitto broker on a free loopback port, for integration tests."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edge_agent.demo import free_port  # noqa: F401 - the tests' ports come from the same place as the demo's

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None (it lives in sbin, often not on a user's PATH)."""
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """True once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class BrokerError(RuntimeError):
    """Mosquitto did not start; the message carries its log."""


class MosquittoBroker:
    """One mosquitto process; ``stop()``/``start()`` keep the port so clients reconnect to it."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, executable: str, *, persistence: bool = False,
                 tls: tuple[Path, Path, Path] | None = None, extra_config: Sequence[str] = ()) -> None:
        """``tls``: (CA file, server certificate, server key) adds a TLS listener on ``tls_port``;
        ``extra_config``: further mosquitto.conf lines, written last so they override the defaults."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.executable = executable
        self.persistence = persistence
        self.tls = tls
        self.extra_config = tuple(extra_config)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",  # as on site: Nagle would hold a result behind a PUBACK
            # Running as root, mosquitto would switch to the 'mosquitto' user and then
            # could not write into pytest's private tmp folders.
            f"user {getpass.getuser()}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"listener {self.tls_port} {self.host}", f"cafile {ca}", f"certfile {cert}",
                      f"keyfile {key}"]
        if self.persistence:
            # Saved on a clean shutdown (SIGTERM), so persistent sessions and their
            # queued messages survive stop()/start() like on a real site broker.
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines += self.extra_config
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto and return once it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        conf = self._write_config()
        self.proc = subprocess.Popen([self.executable, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        if not all(wait_for_port(self.host, port, timeout_s, self.proc) for port in ports):
            self.kill()
            log = self.log_path.read_text() if self.log_path.exists() else "(no log)"
            raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}:\n{log}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop cleanly (SIGTERM): clients see the connection drop, persistence is saved."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL): nothing is saved."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        # The port was free a moment ago and nothing else binds loopback ports here,
        # but a socket in TIME_WAIT may delay the bind: retry briefly.
        for attempt in range(5):
            try:
                self.start()
                return
            except BrokerError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


class V311OnlyProxy:
    """A TCP front for a broker that speaks only MQTT 3.1.1.

    It answers a v5 CONNECT with the 3.1.1 refusal "unacceptable protocol version"
    (CONNACK return code 1), as an old broker does, and relays every other
    connection byte for byte to the real broker behind it.
    """

    host = "127.0.0.1"

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.refused = 0
        self.relayed = 0
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((self.host, 0))
        self._server.listen(16)
        self.port = int(self._server.getsockname()[1])
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_packet(conn: socket.socket) -> bytes:
        """One whole MQTT packet (fixed header, remaining length, body)."""
        data = bytearray(conn.recv(1))
        multiplier, length = 1, 0
        while True:
            byte = conn.recv(1)
            if not byte:
                raise ConnectionError("closed mid-header")
            data += byte
            length += (byte[0] & 0x7F) * multiplier
            if not byte[0] & 0x80:
                break
            multiplier *= 128
        while length:
            chunk = conn.recv(length)
            if not chunk:
                raise ConnectionError("closed mid-packet")
            data += chunk
            length -= len(chunk)
        return bytes(data)

    def _handle(self, conn: socket.socket) -> None:
        try:
            first = self._read_packet(conn)
            header_len = 2
            while first[header_len - 1] & 0x80:
                header_len += 1
            # Variable header of CONNECT: protocol name (2-byte length + "MQTT"), then the level.
            name_len = int.from_bytes(first[header_len:header_len + 2], "big")
            level = first[header_len + 2 + name_len]
            if level == 5:
                self.refused += 1
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(first)
            self.relayed += 1
        except (OSError, ConnectionError, IndexError):
            conn.close()
            return
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()
