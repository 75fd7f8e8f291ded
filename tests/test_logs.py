"""Logging set-up: an operator reads only the product's own words, as JSON lines or plain text."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import paho.mqtt.client
import pytest

from edge_agent.logs import setup_logging
from tests.paths import ROOT, SHIPPED_BUNDLE

# paho logs to the logger MqttLink hands it, or to its own when used without one.
PAHO_LOGGERS = ("edge_agent.mqtt.paho", "paho")
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run SCRIPT in a fresh interpreter at the repository root, as an entry point would run."""
    environment = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"} | env
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=environment,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def json_records(text: str) -> list[dict]:
    """Every non-empty line as a JSON log record; fails on the first line that is not one."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON log line: {line!r}")
    return records


LOAD_BUNDLE = f"""
    from pathlib import Path
    from edge_agent.logs import setup_logging
    setup_logging({{level!r}}, json_lines={{json_lines}})
    from edge_agent.loader import load_bundle
    load_bundle(Path({str(SHIPPED_BUNDLE)!r}))
"""


def test_loading_the_model_in_a_service_prints_only_json_lines():
    out = run_python(LOAD_BUNDLE.format(level="INFO", json_lines=True))
    assert json_records(out.stderr) == []
    assert any("loaded model" in r["msg"] for r in json_records(out.stdout))


def test_litert_start_up_line_is_a_debug_record():
    out = run_python(LOAD_BUNDLE.format(level="DEBUG", json_lines=True))
    assert json_records(out.stderr) == []
    assert {"level": "DEBUG", "logger": "edge_agent.loader",
            "msg": "ai_edge_litert: INFO: Created TensorFlow Lite XNNPACK delegate for CPU."} in [
        {k: r[k] for k in ("level", "logger", "msg")} for r in json_records(out.stdout)]


def test_loading_the_model_on_a_terminal_prints_only_our_plain_lines():
    out = run_python(LOAD_BUNDLE.format(level="INFO", json_lines=False))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(PLAIN_LINE.match(line) for line in lines), lines


MISSING_CAMERA = """
    import cv2  # entry points import OpenCV before they set up logging
    from edge_agent.logs import setup_logging
    if {setup}:
        setup_logging("INFO", json_lines=True)
    capture = cv2.VideoCapture("/dev/video99", cv2.CAP_V4L2)
    assert not capture.isOpened()
    capture = cv2.VideoCapture(99)
    assert not capture.isOpened()
"""


def test_opencv_warnings_for_a_missing_camera_stay_off_stderr():
    assert "[ WARN" in run_python(MISSING_CAMERA.format(setup=False)).stderr  # what it prints unchecked
    assert run_python(MISSING_CAMERA.format(setup=True)).stderr == ""


def test_opencv_imported_after_setup_is_quiet_too():
    out = run_python("""
        import sys
        from edge_agent.logs import setup_logging
        setup_logging("INFO", json_lines=True)
        assert "cv2" not in sys.modules
        import cv2
        assert not cv2.VideoCapture("/dev/video99", cv2.CAP_V4L2).isOpened()
        assert not cv2.VideoCapture(99).isOpened()
    """)
    assert out.stderr == ""


def test_an_engineers_opencv_log_level_is_kept():
    out = run_python(MISSING_CAMERA.format(setup=True), OPENCV_LOG_LEVEL="WARNING")
    assert "[ WARN" in out.stderr


def test_python_warnings_become_log_records():
    out = run_python("""
        import warnings
        from edge_agent.logs import setup_logging
        setup_logging("INFO", json_lines=True)
        warnings.warn("this call is going away", DeprecationWarning)
    """)
    assert out.stderr == ""
    [record] = json_records(out.stdout)
    assert record["logger"] == "py.warnings" and "this call is going away" in record["msg"]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("level", "paho_level"), [
    ("INFO", logging.WARNING), ("WARNING", logging.WARNING), ("ERROR", logging.ERROR),
    ("DEBUG", logging.NOTSET),  # inherits: everything paho says, when debugging
])
def test_paho_speaks_up_only_for_warnings(level, paho_level):
    setup_logging(level, json_lines=True)
    for name in PAHO_LOGGERS:
        assert logging.getLogger(name).level == paho_level
        assert logging.getLogger(name).getEffectiveLevel() == max(paho_level, logging.DEBUG)


@pytest.mark.usefixtures("restore_logging")
def test_paho_outage_chatter_is_debug_detail(capsys):
    paho_log = logging.getLogger("edge_agent.mqtt.paho")  # the logger MqttLink hands to paho
    chatter = "Client is not connected. Socket: None). Last known Connection State: MQTT_CS_CONNECTING"
    setup_logging("INFO", json_lines=True)
    paho_log.error(chatter)
    paho_log.error("failed to receive on socket: %s", ConnectionResetError(104, "Connection reset by peer"))
    paho_log.error("Caught exception in on_connect: %s", "boom")
    [record] = json_records(capsys.readouterr().out)
    assert record["level"] == "ERROR" and record["msg"] == "Caught exception in on_connect: boom"

    setup_logging("DEBUG", json_lines=True)
    paho_log.error(chatter)
    [record] = json_records(capsys.readouterr().out)
    assert record["level"] == "DEBUG" and record["msg"] == chatter


def test_paho_still_words_its_outage_chatter_as_we_filter_it():
    source = inspect.getsource(paho.mqtt.client)
    assert "Client is not connected" in source and "failed to receive on socket" in source


def test_a_crashing_thread_is_one_log_record_not_raw_text(capsys):
    import threading

    from edge_agent.logs import setup_logging

    old = threading.excepthook
    try:
        setup_logging("INFO", json_lines=True)
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()
        out, err = capsys.readouterr()
        assert err == ""
        [line] = [json.loads(x) for x in out.splitlines() if "doomed" in x]
        assert line["level"] == "CRITICAL" and "ZeroDivisionError" in line["exc"]
    finally:
        threading.excepthook = old
