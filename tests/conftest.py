"""Shared fixtures: a real Mosquitto broker for the MQTT integration tests, and the shipped model."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.logs import PAHO_LOGGERS
from tests.broker import MosquittoBroker, find_mosquitto
from tests.paths import DEMO_DIGITS, SHIPPED_BUNDLE


@pytest.fixture(scope="session")
def mosquitto_executable() -> str:
    """Path of mosquitto; the test is skipped, saying why, where it is not installed."""
    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); MQTT integration tests need it")
    return path


@pytest.fixture
def mqtt_broker(tmp_path: Path, mosquitto_executable: str) -> Iterator[MosquittoBroker]:
    """A fresh mosquitto on a free loopback port, persistence off; stop()/start()/restart() keep the port."""
    broker = MosquittoBroker(tmp_path / "mosquitto", mosquitto_executable)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def persistent_mqtt_broker(tmp_path: Path, mosquitto_executable: str) -> Iterator[MosquittoBroker]:
    """Like mqtt_broker, with persistence on: sessions and queued messages survive a clean restart."""
    broker = MosquittoBroker(tmp_path / "mosquitto-persistent", mosquitto_executable, persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def mqtt_address(mqtt_broker: MosquittoBroker) -> tuple[str, int]:
    """(host, port) of a running mosquitto."""
    return mqtt_broker.address


@pytest.fixture(scope="session", autouse=True)
def shipped_selftest() -> None:
    """The shipped bundle's self-test, as the install builds it (it is not committed): also for a
    checkout whose tests run without installing it again."""
    from sync.selftest_file import build_shipped_selftest

    if (SHIPPED_BUNDLE / "manifest.json").exists():
        build_shipped_selftest(SHIPPED_BUNDLE, DEMO_DIGITS)


@pytest.fixture(scope="module")
def model():
    """The shipped bundle, loaded once per test module (skips where the bundle is absent)."""
    if not (SHIPPED_BUNDLE / "manifest.json").exists():
        pytest.skip(f"no model bundle at {SHIPPED_BUNDLE}: the lead ships models/mnist-int8")
    from edge_agent.loader import load_bundle

    return load_bundle(SHIPPED_BUNDLE)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging configures the whole process: put the root, paho, warnings and OpenCV back.

    For every test, because a CLI run in process installs a handler on the test's captured
    stderr; left in place, later tests' threads log into that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    paho_levels = {name: logging.getLogger(name).level for name in PAHO_LOGGERS}
    opencv_env = os.environ.get("OPENCV_LOG_LEVEL")
    cv2 = sys.modules.get("cv2")
    opencv_level = cv2.utils.logging.getLogLevel() if cv2 else None
    excepthook = threading.excepthook
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, paho_level in paho_levels.items():
            logging.getLogger(name).setLevel(paho_level)
        logging.captureWarnings(False)
        threading.excepthook = excepthook
        if opencv_env is None:
            os.environ.pop("OPENCV_LOG_LEVEL", None)
        else:
            os.environ["OPENCV_LOG_LEVEL"] = opencv_env
        if cv2:
            cv2.utils.logging.setLogLevel(opencv_level)
