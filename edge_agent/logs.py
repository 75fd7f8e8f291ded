"""Logging set-up for entry points: JSON lines for journald, or plain text for a terminal.

Everything an operator reads goes through the one handler set up here: our own records,
Python warnings, paho's records, and what LiteRT writes natively (``loader`` routes that).
OpenCV's native warnings have no Python route, so they are turned down to errors at the source.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

# paho logs through the logger MqttLink gives it (``edge_agent.mqtt.paho``), or its own ``paho.*``.
PAHO_LOGGERS = ("paho", "edge_agent.mqtt.paho")

# While a broker is down, paho says so at ERROR on every reconnect attempt. MqttLink already
# reports the outage once, in words an operator can act on, so these are debug detail.
_PAHO_OUTAGE_CHATTER = ("Client is not connected", "failed to receive on socket")


class JsonLines(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _is_paho(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in PAHO_LOGGERS)


class PahoOutageChatter(logging.Filter):
    """Demote paho's per-retry outage errors to DEBUG: dropped unless debugging."""

    def __init__(self, debugging: bool):
        super().__init__()
        self.debugging = debugging

    def filter(self, record: logging.LogRecord) -> bool:
        if not (_is_paho(record.name) and str(record.msg).startswith(_PAHO_OUTAGE_CHATTER)):
            return True
        if not self.debugging:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_native_logs() -> None:
    """Turn OpenCV's native logging (``[ WARN:0@...]`` on stderr) down to errors only.

    An ``OPENCV_LOG_LEVEL`` already in the environment is an engineer's explicit choice and is
    kept. Otherwise the variable is set, for an OpenCV imported later in this process or in a
    child process, and an OpenCV already imported is told directly; OpenCV is not imported here
    (a process that never needs it should not pay its memory).
    """
    if "OPENCV_LOG_LEVEL" in os.environ:
        return
    os.environ["OPENCV_LOG_LEVEL"] = "ERROR"
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def setup_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Send every record, warning and library message through one handler at ``level``."""
    numeric = level if isinstance(level, int) else logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    debugging = numeric <= logging.DEBUG
    handler = logging.StreamHandler(sys.stdout if json_lines else sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PahoOutageChatter(debugging))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # paho's info and connection chatter only when debugging; never below the level asked for
    # (a logger's own level decides alone, the root's is not consulted again).
    for name in PAHO_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debugging else max(logging.WARNING, numeric))
    logging.captureWarnings(True)  # library DeprecationWarnings and the like, as records
    threading.excepthook = _log_thread_crash  # a dying thread's traceback as one record, not raw text
    quiet_native_logs()


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("edge_agent").critical(
        "thread %s died", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
