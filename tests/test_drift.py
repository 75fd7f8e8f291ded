"""Drift alarms end to end: a real agent reads demo frames; the site's reference, then shifted traffic.

Normal demo traffic after the reference raises no alarm; traffic whose digits come from two
classes raises prediction_drift, and blurred frames raise blurred_frames, within the window;
each alarm is published retained on MQTT and exported on /metrics.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.mnist import DigitSet
from edge_agent.render import load_demo_digits, render_postcode_dataset
from tests.test_agent import BASE, RunningAgent, agent_table, plc_for

WINDOW = {"reference_reads": 60, "min_reads": 40, "window_reads": 80, "window_s": 600.0, "health_period_s": 0.5}


def write_frames(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"envelope-{i:03d}.png"), frame)
    return folder


def demo_frames(n: int, seed: int, classes: tuple[int, ...] | None = None) -> list[np.ndarray]:
    digits = load_demo_digits()
    if classes is not None:
        keep = np.isin(digits.labels, classes)
        digits = DigitSet(digits.images[keep], digits.labels[keep])
    return [frame for frame, _ in render_postcode_dataset(digits, n, np.random.default_rng(seed), vary=False)]


def observability(agent: RunningAgent) -> dict:
    return agent.agent.health()["observability"]


def run_until(table: dict, done, timeout_s: float = 60.0) -> tuple[RunningAgent, dict]:
    agent = RunningAgent(table)
    deadline = time.monotonic() + timeout_s
    snapshot = observability(agent)
    while time.monotonic() < deadline and not done(snapshot):
        time.sleep(0.2)
        snapshot = observability(agent)
    return agent, snapshot


def table_for(tmp_path: Path, port: int, camera: Path) -> dict:
    return agent_table(tmp_path, port, camera, camera={"fps": 20.0, "loop": True},
                       trigger={"mode": "interval", "interval_ms": 50}, observability=WINDOW)


def alarm_kinds(snapshot: dict) -> set[str]:
    return {a["kind"] for a in snapshot["drift"]["alarms"]}


@pytest.fixture
def reference_built(tmp_path, mqtt_broker):
    """Run 1: normal demo traffic builds the site's reference (kept on disk) and raises nothing."""
    camera = write_frames(tmp_path / "normal", demo_frames(30, seed=1))
    agent, snapshot = run_until(table_for(tmp_path, mqtt_broker.port, camera),
                                lambda s: s["drift"]["judged"] and s["window"]["frames"] >= WINDOW["window_reads"])
    try:
        assert snapshot["reference"]["complete"] and snapshot["drift"]["judged"], snapshot["reference"]
        assert alarm_kinds(snapshot) == set(), snapshot["drift"]
        assert snapshot["training"]["class_distribution"] is not None  # shown beside it, never alarms
    finally:
        agent.stop()
    assert list((tmp_path / "state").glob("reference-*.json"))
    return tmp_path


def shifted_run(tmp_path: Path, port: int, camera: Path, kind: str) -> None:
    plc = plc_for(port, watch=(f"{BASE}/drift",))
    agent, snapshot = run_until(table_for(tmp_path, port, camera), lambda s: kind in alarm_kinds(s))
    try:
        assert snapshot["reference"]["complete"]  # restored from run 1, not rebuilt from shifted traffic
        assert kind in alarm_kinds(snapshot), snapshot["drift"]
        assert snapshot["window"]["frames"] <= WINDOW["window_reads"]  # raised within the window
        assert plc.wait_for(lambda c: any(json.loads(p).get("state") == "alarm" and
                                          kind in {a["kind"] for a in json.loads(p)["alarms"]}
                                          for t, p in c.messages if t.endswith("/drift")), 10)
        body = urllib.request.urlopen(f"{agent.agent.endpoint.url}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert kind in {s.labels["kind"] for s in families["postcode_drift_alarm"].samples}
        figures = {s.labels["figure"]: s.value for s in families["postcode_drift_figure"].samples}
        assert {"prediction_psi", "confidence_psi", "sharpness_ratio"} <= figures.keys()
    finally:
        plc.stop()
        agent.stop()


def test_digits_from_two_classes_raise_prediction_drift(reference_built, mqtt_broker):
    camera = write_frames(reference_built / "two-classes", demo_frames(30, seed=2, classes=(1, 7)))
    shifted_run(reference_built, mqtt_broker.port, camera, "prediction_drift")


def test_blurred_frames_raise_blurred_frames(reference_built, mqtt_broker):
    frames = [cv2.GaussianBlur(f, (0, 0), 3.0) for f in demo_frames(30, seed=3)]
    camera = write_frames(reference_built / "blurred", frames)
    shifted_run(reference_built, mqtt_broker.port, camera, "blurred_frames")


def test_other_normal_envelopes_raise_no_alarm(reference_built, mqtt_broker):
    camera = write_frames(reference_built / "normal-2", demo_frames(30, seed=4))
    agent, snapshot = run_until(table_for(reference_built, mqtt_broker.port, camera),
                                lambda s: s["drift"]["judged"] and s["window"]["frames"] >= WINDOW["window_reads"])
    try:
        assert snapshot["drift"]["judged"] and alarm_kinds(snapshot) == set(), snapshot["drift"]["figures"]
    finally:
        agent.stop()
