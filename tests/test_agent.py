"""The agent service end to end: real Mosquitto, real camera folder, real SQLite outbox.

Covers: reads reach the sorting machine; broker restart and kill -9 lose nothing; bad
triggers, bad frames and a vanishing camera leave the agent serving.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.agent import build_agent, start_agent
from edge_agent.config import parse_config
from edge_agent.demo import render_demo_camera
from edge_agent.simulated_plc import PlcClient
from edge_agent.pipeline import image_sha256
from tests.broker import free_port
from tests.paths import ROOT

BASE = "postcode/test-site/line-9"


@pytest.fixture(scope="module")
def camera_frames(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Eight rendered envelopes and their truth (image hash -> postcode)."""
    workdir = tmp_path_factory.mktemp("camera")
    folder = render_demo_camera(workdir / "camera", 8, seed=11)
    return folder, json.loads((workdir / "truth.json").read_text())


def agent_table(tmp_path: Path, port: int, camera_dir: Path, **overrides) -> dict:
    table = {
        "site": {"site_id": "test-site", "line_id": "line-9"},
        "camera": {"source": str(camera_dir), "loop": True, "fps": 20.0, "max_frame_age_ms": 2000},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")},
        "review": {"crops_dir": str(tmp_path / "state" / "review"), "max_items": 50},
        "http": {"port": free_port()},
        "logging": {"json": False},
    }
    for section, values in overrides.items():
        table.setdefault(section, {}).update(values)
    return table


class RunningAgent:
    """An in-process agent (build_agent + start) for one test."""

    def __init__(self, table: dict):
        self.agent = build_agent(parse_config(table))
        start_agent(self.agent)

    def stop(self) -> None:
        self.agent.stop(drain_s=5)


def plc_for(port: int, **kwargs) -> PlcClient:
    plc = PlcClient("127.0.0.1", port, trigger_topic=f"{BASE}/trigger", result_topic=f"{BASE}/result",
                    status_topic=f"{BASE}/status", **kwargs)
    plc.start()
    return plc


@pytest.fixture
def running(tmp_path, mqtt_broker, camera_frames):
    folder, _truth = camera_frames
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, folder,
                                     mqtt={"response_topic_prefix": "plc-7/"}))
    plc = plc_for(mqtt_broker.port, watch=(f"{BASE}/events/#", f"{BASE}/review"))
    assert plc.wait_online(30)
    yield agent, plc
    plc.stop()
    agent.stop()


def offline_reads(folder: Path) -> dict[str, tuple[str, bool]]:
    """image hash -> (postcode, accepted) as the reader gives them with no service around it."""
    from edge_agent.loader import load_bundle
    from edge_agent.pipeline import PostcodeReader
    from edge_agent.reader import ReaderConfig

    reader = PostcodeReader(load_bundle(ROOT / "models" / "mnist-int8"), ReaderConfig())
    reads = {}
    for path in sorted(folder.glob("*.png")):
        read = reader.read_image(cv2.imread(str(path), cv2.IMREAD_COLOR))
        # The agent hashes a folder's frames as their file bytes (reader.frame_hash = "encoded").
        reads[read.image_sha256] = reads[image_sha256(path.read_bytes())] = (read.decision.postcode,
                                                                            read.decision.accepted)
    return reads


def test_reads_reach_the_sorting_machine(running, camera_frames):
    agent, plc = running
    folder, truth = camera_frames
    offline = offline_reads(folder)
    file_hashes = {image_sha256(path.read_bytes()) for path in folder.glob("*.png")}
    assert sum(accepted for _, accepted in offline.values()) >= 8  # the demo camera mostly sorts (2 keys each)
    answers = [plc.request(f"item-{i}", timeout_s=20) for i in range(12)]
    assert all(a is not None for a in answers)
    for payload, _latency in answers:
        assert set(payload) >= {"result_id", "item_id", "postcode", "accepted", "confidence", "digits",
                                "reason", "model_version", "captured_at", "latency_ms"}
        assert payload["model_version"] == agent.agent.reader.model.version
        assert payload["image_sha256"] in truth  # the read is traceable to the exact frame
        assert payload["image_sha256"] in file_hashes  # as `sha256sum` of the file (reader.frame_hash)
        # The service answers exactly what the reader says of those pixels.
        assert (payload["postcode"], payload["accepted"]) == offline[payload["image_sha256"]]
        if payload["accepted"]:
            assert payload["postcode"] == truth[payload["image_sha256"]]
            assert len(payload["digits"]) == 5 and payload["reason"] is None
        else:
            assert payload["reason"] in ("digit_count", "low_confidence", "no_postcode")
    # Every review also went to the review topic, with its crops kept on disk.
    reviews = [p for p, _ in answers if not p["accepted"]]
    assert plc.wait_for(lambda c: sum(t.endswith("/review") for t, _ in c.messages) >= len(reviews), 10)
    # Crops are written off the answer path: give the disk a moment.
    deadline = time.monotonic() + 10
    while len(list(agent.agent.review.directory.glob("*/read.json"))) < len(reviews) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(agent.agent.review.directory.glob("*/read.json"))) == len(reviews)


def test_audit_trail_traces_each_item(running):
    agent, plc = running
    payload, _ = plc.request("trace-me", timeout_s=20)
    records = agent.agent.outbox.audit("trace-me")
    assert records and records[0].audit["result_id"] == payload["result_id"]
    assert records[0].audit["image_sha256"] == payload["image_sha256"]
    assert records[0].audit["model_version"] == payload["model_version"]


def test_bad_triggers_get_error_events_and_the_agent_keeps_serving(running):
    agent, plc = running
    plc._client.publish(f"{BASE}/trigger", b"not json at all", qos=1)
    plc._client.publish(f"{BASE}/trigger", json.dumps({"item_id": "x" * 10, "pad": "y" * 20_000}).encode(),
                        qos=1)
    plc._client.publish(f"{BASE}/trigger", json.dumps({"no_item": 1}).encode(), qos=1)
    assert plc.wait_for(lambda c: sum("/events/error" in t for t, _ in c.messages) >= 3, 10)
    errors = [json.loads(p) for t, p in plc.messages if "/events/error" in t]
    assert {e["kind"] for e in errors} == {"bad_trigger"}
    assert any("bytes" in e["error"] for e in errors)  # the oversized one says why
    assert plc.request("after-bad", timeout_s=20) is not None
    assert agent.agent.counters.bad_triggers == 3


def test_mqtt_v5_response_topic_and_correlation_data(running):
    """A v5 PLC gets its answer on its own response topic, with its correlation data."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _agent, plc = running
    got = threading.Event()
    box = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="v5-plc", protocol=paho.MQTTv5)

    def on_message(c, userdata, message):
        box["payload"] = json.loads(message.payload)
        box["correlation"] = message.properties.CorrelationData
        got.set()

    client.on_message = on_message
    client.connect("127.0.0.1", plc.port)
    client.subscribe("plc-7/replies", qos=1)
    client.loop_start()
    time.sleep(0.3)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "plc-7/replies"
    props.CorrelationData = b"req-42"
    client.publish(f"{BASE}/trigger", json.dumps({"item_id": "v5-item"}), qos=1, properties=props)
    try:
        assert got.wait(20)
    finally:
        client.loop_stop()
        client.disconnect()
    assert box["payload"]["item_id"] == "v5-item" and box["correlation"] == b"req-42"


def test_response_topics_outside_the_allowed_prefix_are_refused(running):
    """A trigger cannot make the agent publish onto another line's topics or its own status."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _agent, plc = running
    other_line = "postcode/test-site/line-1/result"
    own_status = f"{BASE}/status"
    seen: list[tuple[str, bytes]] = []
    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
    spy.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    spy.connect("127.0.0.1", plc.port)
    spy.subscribe([(other_line, 1), ("elsewhere/#", 1)])
    spy.loop_start()
    time.sleep(0.3)
    try:
        for item, topic in (("hijack-1", other_line), ("hijack-2", own_status), ("hijack-3", "elsewhere/x")):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            spy.publish(f"{BASE}/trigger", json.dumps({"item_id": item}), qos=1, properties=props)
        for item in ("hijack-1", "hijack-2", "hijack-3"):
            assert plc.result(item, timeout_s=20) is not None  # still answered on the result topic
        assert plc.wait_for(lambda c: sum(t.endswith("/events/error") for t, _ in c.messages) >= 3, 10)
        errors = [json.loads(p) for t, p in plc.messages if t.endswith("/events/error")]
        assert {e["item_id"] for e in errors if e["kind"] == "response_topic_refused"} == \
            {"hijack-1", "hijack-2", "hijack-3"}
        time.sleep(0.5)
        assert seen == []
        status = plc.agent_status()
        assert status["state"] == "online"  # the retained status was not overwritten by a result
    finally:
        spy.loop_stop()
        spy.disconnect()


def test_broker_restart_loses_nothing(tmp_path, persistent_mqtt_broker, camera_frames):
    """Stop the broker mid-stream, keep triggering (interval mode), restart: every result arrives once."""
    broker = persistent_mqtt_broker
    folder, _ = camera_frames
    agent = RunningAgent(agent_table(tmp_path, broker.port, folder,
                                     trigger={"mode": "interval", "interval_ms": 50},
                                     reader={"workers": 2}))
    plc = plc_for(broker.port, persistent=True, client_id="sorter-1")
    try:
        assert plc.wait_online(30)
        time.sleep(0.5)
        broker.stop()
        time.sleep(1.5)  # the agent keeps reading and queues in its outbox meanwhile
        assert agent.agent.outbox.stats()["pending"] > 0
        broker.start()
        time.sleep(1.0)
    finally:
        agent.stop()  # stops triggering, then drains the outbox
    stored = agent_results(tmp_path / "state" / "outbox.sqlite")
    assert len(stored) >= 20
    assert plc.wait_for(lambda c: set(stored) <= set(c.results()), 30), \
        f"missing {len(set(stored) - set(plc.results()))} of {len(stored)}"
    assert len(plc.results()) == len(stored)  # each item once, after de-duplication
    plc.stop()


def agent_results(db: Path) -> dict[str, str]:
    """item_id -> state of every result-topic message in an outbox file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT item_id, state FROM messages WHERE topic LIKE '%/result'").fetchall()
    return dict(rows)


def results_so_far(db: Path) -> dict[str, str]:
    """As agent_results, while the agent may still be creating the file and its tables."""
    try:
        return agent_results(db) if db.exists() else {}
    except sqlite3.OperationalError:  # "no such table" until the agent's schema is committed
        return {}


def _spawn_agent(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_minus_9_with_a_backlog_loses_nothing(tmp_path, mqtt_broker, camera_frames):
    """Results queued while the broker is down survive kill -9 and go out in order on restart."""
    folder, _ = camera_frames
    mqtt_broker.stop()
    config = tmp_path / "agent.toml"
    table = agent_table(tmp_path, mqtt_broker.port, folder,
                        trigger={"mode": "interval", "interval_ms": 40}, logging={"level": "WARNING"})
    config.write_text(_to_toml(table))
    agent = _spawn_agent(config)
    db = tmp_path / "state" / "outbox.sqlite"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(results_so_far(db)) < 30:
            time.sleep(0.2)
    finally:  # killed whatever happens: a failing test must not leave an agent running
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    backlog = agent_results(db)
    assert len(backlog) >= 30 and set(backlog.values()) == {"pending"}

    mqtt_broker.start()
    plc = plc_for(mqtt_broker.port)
    table["trigger"] = {"mode": "mqtt"}  # no new items: only the backlog flows
    config.write_text(_to_toml(table))
    agent = _spawn_agent(config)
    try:
        assert plc.wait_for(lambda c: set(backlog) <= set(c.results()), 60)
        with sqlite3.connect(db) as conn:
            order = [r[0] for r in conn.execute(
                "SELECT item_id FROM messages WHERE topic LIKE '%/result' ORDER BY id")]
        arrival = [i for i in plc.arrival_order() if i in backlog]
        # Triggers journaled but not yet answered at the kill are answered after the restart
        # (agent_restart): they follow the backlog and are not part of it.
        assert arrival == [i for i in order if i in backlog]  # delivered in the order they were read
    finally:
        plc.stop()
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
    assert set(agent_results(db).values()) == {"delivered"}


def test_sigusr1_writes_every_threads_stack_and_sigterm_still_stops_cleanly(tmp_path, mqtt_broker, camera_frames):
    """For an agent that seems hung: `kill -USR1` puts its threads' stacks in the journal."""
    folder, _ = camera_frames
    config = tmp_path / "agent.toml"
    config.write_text(_to_toml(agent_table(tmp_path, mqtt_broker.port, folder, logging={"level": "INFO"})))
    agent = _spawn_agent(config)
    try:
        plc = plc_for(mqtt_broker.port)
        try:
            assert plc.wait_online(30)
        finally:
            plc.stop()
        agent.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        returncode = agent.wait(20)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    stderr = agent.stderr.read().decode(errors="replace")
    assert returncode == 0, stderr[-20_000:]  # a crash's own traceback is in stderr (faulthandler)
    # The main thread (it may still be finishing the start: online comes first) ...
    assert "Current thread" in stderr and "in cmd_run" in stderr, stderr
    assert "_read_loop" in stderr and "_journal_loop" in stderr, stderr  # and every stage's thread
    assert "agent stopping" in stderr, stderr


def _to_toml(table: dict) -> str:
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_corrupt_empty_and_huge_frames(tmp_path, mqtt_broker):
    """Corrupt and empty files are reported and skipped; a 10,000 x 10,000 frame is read safely."""
    camera = tmp_path / "camera"
    camera.mkdir()
    (camera / "a-empty.png").write_bytes(b"")
    (camera / "b-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 50)
    cv2.imwrite(str(camera / "c-huge.png"), np.full((10_000, 10_000), 255, np.uint8))
    # Reading 100 megapixels takes seconds on a busy machine: this test is about safety, not the
    # line's budget, so the budget is generous.
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera,
                                     camera={"loop": False, "max_frame_age_ms": 600_000},
                                     trigger={"decision_budget_ms": 30_000}))
    plc = plc_for(mqtt_broker.port)
    try:
        assert plc.wait_online(30)
        assert agent.agent.grabber.wait_for_frame(0, 60) is not None  # the huge one decoded
        payload, _ = plc.request("huge-blank", timeout_s=30)
        assert payload["accepted"] is False and payload["reason"] == "no_postcode"
        assert agent.agent.grabber.health()["state"] == "ok"
        assert agent.agent.grabber.source._inner.bad_files == 2
    finally:
        plc.stop()
        agent.stop()


def test_vanishing_camera_sends_items_to_review_and_recovers(tmp_path, mqtt_broker, camera_frames):
    folder, _ = camera_frames
    camera = tmp_path / "camera"
    camera.mkdir()
    frame = sorted(folder.glob("*.png"))[0]
    (camera / frame.name).write_bytes(frame.read_bytes())
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera,
                                     camera={"loop": True, "fps": 20.0, "max_frame_age_ms": 200,
                                             "frame_wait_ms": 300, "reopen_backoff_min_s": 0.1,
                                             "reopen_backoff_max_s": 0.5}))
    plc = plc_for(mqtt_broker.port)
    try:
        assert plc.wait_online(30)
        assert agent.agent.grabber.wait_for_frame(0, 30) is not None
        payload, _ = plc.request("before", timeout_s=30)
        assert payload["reason"] != "no_frame"

        moved = tmp_path / "camera-unplugged"
        camera.rename(moved)  # the camera disappears
        deadline = time.monotonic() + 20
        while agent.agent.grabber.health()["state"] not in ("reconnecting", "failed"):
            assert time.monotonic() < deadline, agent.agent.grabber.health()
            time.sleep(0.05)
        time.sleep(0.3)  # the last frame is now older than max_frame_age_ms
        payload, _ = plc.request("while-gone", timeout_s=30)
        assert payload["accepted"] is False and payload["reason"] == "no_frame"

        moved.rename(camera)  # and comes back
        seq = agent.agent.grabber.last_seq
        assert agent.agent.grabber.wait_for_frame(seq, 30) is not None
        payload, _ = plc.request("after", timeout_s=30)
        assert payload["reason"] != "no_frame"
    finally:
        plc.stop()
        agent.stop()


def test_agent_never_imports_tensorflow():
    script = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None
        import edge_agent.agent, edge_agent.cli, edge_agent.demo, edge_agent.reader, edge_agent.render
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_predict_cli_prints_one_json_line_per_image(tmp_path, camera_frames):
    folder, truth = camera_frames
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    images = sorted(folder.glob("*.png"))[:3]
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "predict", *map(str, images),
                          str(tmp_path / "empty.png"), str(tmp_path / "corrupt.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 5 and out.returncode == 1  # non-zero: some inputs were unreadable
    for line, image in zip(lines[:3], images):
        assert line["source"] == str(image)
        assert set(line) == {"source", "postcode", "accepted", "confidence", "reason", "digits", "decided_by"}
        assert line["decided_by"] == "digit_threshold"  # no --sort-plan: today's per-digit rule
        sha = image_sha256(cv2.imread(str(image)))
        if line["accepted"]:
            assert line["postcode"] == truth[sha]
    assert lines[3]["error"] == "empty file" and lines[3]["reason"] == "bad_frame"
    assert "not a decodable image" in lines[4]["error"]


def test_damaged_outbox_stops_the_start_with_a_clear_message(tmp_path, camera_frames):
    folder, _ = camera_frames
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"this is not a database" * 100)
    config = tmp_path / "agent.toml"
    config.write_text(_to_toml(agent_table(tmp_path, 1, folder)))
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cannot start" in out.stderr and "outbox" in out.stderr.lower()
    assert "Traceback" not in out.stderr


def test_scene_change_reads_each_new_envelope_once(tmp_path, mqtt_broker, camera_frames):
    """Change mode: empty belt, envelope, empty belt, envelope -> exactly two reads, the right ones."""
    folder, truth = camera_frames
    envelopes = sorted(folder.glob("*.png"))[:2]
    empty = np.full_like(cv2.imread(str(envelopes[0])), 235)
    camera = tmp_path / "camera"
    camera.mkdir()
    background = tmp_path / "empty.png"
    cv2.imwrite(str(background), empty)
    frames = [background] * 6 + [envelopes[0]] * 8 + [background] * 8 + [envelopes[1]] * 8 + [background] * 6
    for i, source in enumerate(frames):  # the folder source reads each file once, in name order
        (camera / f"{i:03d}.png").write_bytes(source.read_bytes())
    plc = plc_for(mqtt_broker.port)
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera,
                                     camera={"loop": False, "fps": 20.0},
                                     trigger={"mode": "change", "settle_frames": 3,
                                              "background_image": str(background)}))
    try:
        assert plc.wait_for(lambda c: len(c.results()) >= 2, 30)
        time.sleep(1.0)  # the trailing empty frames must not add a read
    finally:
        agent.stop()
        plc.stop()
    results = plc.results()
    assert len(results) == 2
    read_frames = [truth[p["image_sha256"]] for p in sorted(results.values(), key=lambda p: p["captured_at"])]
    expected = [truth[image_sha256(cv2.imread(str(e)))] for e in envelopes]
    assert read_frames == expected


def test_triggers_journaled_before_a_crash_are_answered_at_the_next_start(tmp_path, mqtt_broker, camera_frames):
    """Open journal rows left by a dead process: each answered once, as review agent_restart."""
    from edge_agent.outbox import Outbox
    from edge_agent.types import SystemClock, Trigger

    folder, _ = camera_frames
    table = agent_table(tmp_path, mqtt_broker.port, folder)
    box = Outbox(tmp_path / "state" / "outbox.sqlite", clock=SystemClock())
    then = time.time() - 30  # the crash was a while ago: every deadline has passed
    box.journal_triggers([Trigger(item_id=f"orphan-{i}", received_at=then, deadline=then + 1.5)
                          for i in range(3)], 3600, f"{BASE}/result")
    box.close()
    plc = plc_for(mqtt_broker.port, persistent=True, client_id="sorter-restart")
    agent = RunningAgent(table)
    try:
        for i in range(3):
            payload, _ = plc.result(f"orphan-{i}", timeout_s=20)
            assert payload["accepted"] is False and payload["reason"] == "agent_restart"
        assert agent.agent.counters.recovered == 3
        assert agent.agent.outbox.journal_stats()["open"] == 0
    finally:
        plc.stop()
        agent.stop()


_DIES_AFTER_DELIVERING = """
import sys, time
sys.path.insert(0, sys.argv[1])
from edge_agent.outbox import Outbox
from edge_agent.types import SystemClock

box = Outbox(sys.argv[2], clock=SystemClock())
ids = [box.add(sys.argv[3], ('{"result_id": "r-%d", "item_id": "before-%d"}' % (i, i)).encode(), 1, None,
               {"result_id": "r-%d" % i, "item_id": "before-%d" % i}) for i in range(3)]
box.mark_delivered_many(ids)  # the broker acknowledged them ...
if sys.argv[4] == "close":
    box.close()
print("delivered", flush=True)
sys.stdin.read()  # ... and then this process and the broker die together
"""


@pytest.mark.parametrize("ending", ["kill", "close"])
def test_after_a_crash_the_results_a_broker_may_have_lost_are_sent_again(tmp_path, mqtt_broker, camera_frames,
                                                                         ending):
    """A power cut takes the agent and the broker on its box together: the broker forgets what it
    acknowledged since its last save. The next start sends those results again; after a clean
    stop it does not."""
    folder, _ = camera_frames
    outbox_path = tmp_path / "state" / "outbox.sqlite"
    script = tmp_path / "dies.py"
    script.write_text(_DIES_AFTER_DELIVERING)
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(outbox_path), f"{BASE}/result", ending],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"delivered"
    finally:
        proc.kill()
        proc.wait()
    plc = plc_for(mqtt_broker.port, persistent=True, client_id="sorter-after-crash")
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, folder))
    try:
        if ending == "kill":
            for i in range(3):
                payload, _ = plc.result(f"before-{i}", timeout_s=20)
                assert payload["result_id"] == f"r-{i}"
            assert agent.agent.link.stats()["resent"] == 3
        else:
            assert plc.wait_online(30)
            assert plc.request("after", timeout_s=20) is not None  # the agent is up and answering
            time.sleep(0.5)  # copies go out when nothing new waits: time for any to arrive
            assert plc.result("before-0", timeout_s=0) is None and agent.agent.link.stats()["resent"] == 0
    finally:
        plc.stop()
        agent.stop()


def test_corrupt_frames_raise_error_events_and_count_in_health(tmp_path, mqtt_broker, camera_frames):
    folder, _ = camera_frames
    camera = tmp_path / "camera"
    shutil.copytree(folder, camera)
    (camera / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera))
    plc = plc_for(mqtt_broker.port, watch=(f"{BASE}/events/error",))
    try:
        assert plc.wait_for(lambda c: any(json.loads(p).get("kind") == "bad_frame" for _t, p in c.messages), 20)
        assert agent.agent.health()["counters"]["bad_frames"] >= 1
        assert agent.agent.health()["camera"]["bad_frames"] >= 1
        payload, _ = plc.request("still-reading", timeout_s=20)  # the line goes on
        assert payload["reason"] != "no_frame"
    finally:
        plc.stop()
        agent.stop()


def test_items_without_a_frame_do_not_hold_up_each_other(tmp_path, mqtt_broker, camera_frames):
    """With the camera gone, a burst of items is answered no_frame together, not one wait after another."""
    folder, _ = camera_frames
    camera = tmp_path / "camera"
    shutil.copytree(folder, camera)
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera,
                                     camera={"max_frame_age_ms": 200, "frame_wait_ms": 500}))
    plc = plc_for(mqtt_broker.port)
    try:
        assert plc.wait_online(30)
        camera.rename(tmp_path / "unplugged")
        time.sleep(1.0)
        items = [f"dark-{i}" for i in range(20)]
        plc.burst(items, timeout_s=30)
        results = plc.results()
        assert {results[i]["reason"] for i in items} == {"no_frame"}
        # Twenty items waiting one after another would take 20 x 0.5 s; together they take one wait.
        spread = max(results[i]["decided_at"] for i in items) - min(results[i]["triggered_at"] for i in items)
        assert spread < 5.0, spread
    finally:
        plc.stop()
        agent.stop()


def test_online_is_announced_only_once_triggers_can_arrive(tmp_path, mqtt_broker, camera_frames):
    """A PLC that sends its first trigger the moment the agent says "online" (a new session, so the
    broker has no trigger subscription until the SUBACK) gets an answer every time."""
    folder, _truth = camera_frames
    for attempt in range(3):
        line = f"fresh-{attempt}"
        base = f"postcode/test-site/{line}"
        table = agent_table(tmp_path / line, mqtt_broker.port, folder, site={"site_id": "test-site", "line_id": line})
        plc = PlcClient("127.0.0.1", mqtt_broker.port, trigger_topic=f"{base}/trigger",
                        result_topic=f"{base}/result", status_topic=f"{base}/status", client_id=f"plc-{line}")
        plc.start()
        sent = threading.Event()

        def send_when_online(c, item=f"first-{attempt}"):
            if not sent.is_set() and c.status.get("state") == "online":
                sent.set()
                c.trigger(item)
            return sent.is_set()

        agent = RunningAgent(table)
        try:
            assert plc.wait_for(send_when_online, 30)
            assert plc.result(f"first-{attempt}", timeout_s=15) is not None, f"attempt {attempt}: trigger lost"
        finally:
            plc.stop()
            agent.stop()


def test_a_site_made_trigger_is_answered_or_not_taken_in_once_the_stop_began(tmp_path, mqtt_broker, camera_frames):
    """A scene-change or interval trigger racing SIGTERM is either counted before the stop began
    (and answered before the agent exits) or not taken in: never taken in after drain() stopped
    waiting, which would leave it for a next start that a site-made trigger never gets."""
    from edge_agent.types import Trigger

    folder, _truth = camera_frames
    running = RunningAgent(agent_table(tmp_path, mqtt_broker.port, folder))
    agent = running.agent
    try:
        agent.submit(Trigger(item_id="before-stop", received_at=time.time()))
        assert agent.drain(10)
        assert agent.counters.triggers == 1
        agent.stopping.set()  # what stop() does first
        agent.submit(Trigger(item_id="after-stop", received_at=time.time()))
        assert agent.counters.triggers == 1
        assert agent.drain(0.0), "a trigger taken in after the stop began would be waited for here"
    finally:
        running.stop()
    results = agent_results(tmp_path / "state" / "outbox.sqlite")
    assert "before-stop" in results and "after-stop" not in results
