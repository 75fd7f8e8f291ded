"""edge-sync pull --mqtt: step events on MQTT, the retained sync state, and the health check after an
activation, against a real Mosquitto, a real in-process agent following ``models/active`` and a real
registry served over HTTP on loopback. An unhealthy version is rolled back automatically."""

from __future__ import annotations

import json
import subprocess
import sys

from sync import activation
from sync.pull import pull
from tests.broker import free_port
from tests.paths import ROOT
from tests.test_agent import RunningAgent, agent_table, camera_frames, plc_for  # noqa: F401 - fixture
# site_v1 runs the shipped bundle announced as BASE_VERSION, whatever the shipped version is.
from tests.test_sync import (BASE_VERSION, add_version, base_bundle, keys, rewrite_manifest,  # noqa: F401
                             server, settings_for, site_v1)

SITE, LINE = "test-site", "line-9"
BASE = f"postcode/{SITE}/{LINE}"


def run_pull(server, site, keys, *extra, timeout=90):
    args = [sys.executable, "-m", "sync", "pull", "--registry", server.url,
            "--public-key", str(keys[0].public_path), "--models-dir", str(site),
            "--timeout", "2", "--retries", "0", *map(str, extra)]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def mqtt_args(port, **overrides):
    options = {"--mqtt": f"127.0.0.1:{port}", "--site": SITE, "--line": LINE, "--health-timeout": 30,
               "--min-reads": 5, "--max-review-pct": 90}
    options.update(overrides)
    return [item for pair in options.items() for item in pair]


def start_line(tmp_path, broker, site, camera):
    folder, _ = camera
    table = agent_table(tmp_path, broker.port, folder, model={"bundle": str(site / "active")},
                        trigger={"mode": "interval", "interval_ms": 50},
                        observability={"health_period_s": 0.5})
    watcher = plc_for(broker.port, watch=(f"{BASE}/events/sync", f"{BASE}/sync"))
    agent = RunningAgent(table)
    return agent, watcher


def sync_events(watcher):
    return [json.loads(p) for t, p in list(watcher.messages) if t == f"{BASE}/events/sync"]


def retained_sync_state(port):
    """A fresh subscriber gets the retained sync state."""
    probe = plc_for(port, watch=(f"{BASE}/sync",))
    try:
        assert probe.wait_for(lambda c: any(t == f"{BASE}/sync" for t, _ in c.messages), 10)
        return json.loads([p for t, p in probe.messages if t == f"{BASE}/sync"][-1])
    finally:
        probe.stop()


def test_pull_with_mqtt_activates_and_passes_the_health_check(tmp_path, mqtt_broker, camera_frames, base_bundle,
                                                              server, keys, site_v1):
    agent, watcher = start_line(tmp_path, mqtt_broker, site_v1, camera_frames)
    try:
        assert watcher.wait_for(lambda c: c.agent_status().get("model_version") == BASE_VERSION, 15)
        add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
        out = run_pull(server, site_v1, keys, *mqtt_args(mqtt_broker.port))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "updated: 1.1.0"
        assert activation.active_version(site_v1) == "1.1.0"
        assert watcher.agent_status().get("model_version") == "1.1.0"
        assert watcher.wait_for(lambda c: "healthy" in [e["event"] for e in sync_events(c)], 10)
        events = [e["event"] for e in sync_events(watcher)]
        assert events == ["check", "index_verified", "download", "downloaded", "verified", "validated",
                          "activated", "health_check", "healthy"]
        healthy = sync_events(watcher)[-1]
        assert healthy["version"] == "1.1.0" and healthy["reads"] >= 5 and healthy["review_pct"] <= 90
        state = retained_sync_state(mqtt_broker.port)
        assert state["active"] == "1.1.0" and state["previous"] == BASE_VERSION
        assert state["last_result"]["outcome"] == "updated" and state["last_error"] is None
    finally:
        agent.stop()
        watcher.stop()


def _review_everything(bundle):
    """An honest bad model for the line: the same weights, but a manifest acceptance_threshold of 1.0.

    It loads, its contract is the agent's, and the self-test (which scores labels, not the threshold)
    passes at the recorded accuracy, so validation accepts it; on the line nearly every read falls
    below a confidence of 1.0 and goes to review. The manifest is re-signed by publish."""
    rewrite_manifest(bundle, acceptance_threshold=1.0)


def test_an_unhealthy_version_is_rolled_back_and_not_retried(tmp_path, mqtt_broker, camera_frames, base_bundle,
                                                             server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
    assert pull(settings_for(server, site_v1, keys)).version == "1.1.0"
    agent, watcher = start_line(tmp_path, mqtt_broker, site_v1, camera_frames)
    try:
        assert watcher.wait_for(lambda c: c.agent_status().get("model_version") == "1.1.0", 15)
        add_version(tmp_path, base_bundle, server, keys[0], "1.2.0", prepare=_review_everything)
        out = run_pull(server, site_v1, keys, *mqtt_args(mqtt_broker.port, **{"--health-timeout": 15}))
        assert out.returncode == 1, out.stdout
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("refused: v1.2.0 rolled back: ") and "went to review (max 90%)" in line, line
        assert activation.active_version(site_v1) == "1.1.0"
        assert "1.2.0" in activation.load_state(site_v1)["failed"]
        # The agent did run 1.2.0, and follows the rollback back to 1.1.0.
        assert watcher.wait_for(lambda c: c.agent_status().get("model_version") == "1.1.0", 15)
        events = sync_events(watcher)
        assert [e["event"] for e in events][-3:] == ["activated", "health_check", "rolled_back"]
        rolled = events[-1]
        assert rolled["version"] == "1.2.0" and rolled["to"] == "1.1.0" and rolled["review_pct"] > 90
        state = retained_sync_state(mqtt_broker.port)
        assert state["active"] == "1.1.0" and state["last_result"]["outcome"] == "rolled_back"
        # Not fetched again: the next pull refuses it by name.
        again = run_pull(server, site_v1, keys, *mqtt_args(mqtt_broker.port))
        assert again.returncode == 1 and "1.2.0" in again.stderr.strip().splitlines()[-1]
        assert activation.active_version(site_v1) == "1.1.0"
    finally:
        agent.stop()
        watcher.stop()


def test_pull_goes_on_when_the_broker_is_down(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
    out = run_pull(server, site_v1, keys, *mqtt_args(free_port()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "updated: 1.1.0"
    assert activation.active_version(site_v1) == "1.1.0"
    warnings = [json.loads(line) for line in out.stdout.splitlines()
                if line.startswith("{") and json.loads(line).get("level") == "WARNING"]
    assert len(warnings) == 1 and "unreachable" in warnings[0]["msg"], warnings


# ---------------------------------------------------------------- the verdict alone (no broker)

def _watcher(status, *healths):
    from sync.mqtt_report import SyncMqtt

    mqtt = SyncMqtt("127.0.0.1", 1, SITE, LINE)
    mqtt._status = status
    mqtt.link_up = lambda: True
    for health in healths:
        mqtt._health.put(health)
    return mqtt


def _health(version, accepted, reviews):
    return {"model_version": version, "counters": {"accepted": accepted, "reviews": reviews}}


def test_health_verdicts_name_what_was_missing():
    from sync.mqtt_report import HealthCriteria

    quick = HealthCriteria(timeout_s=0.3, min_reads=5, max_review_pct=90)
    online = {"state": "online", "model_version": "2.0.0"}
    ok = _watcher(online, _health("1.0.0", 500, 500), _health("2.0.0", 100, 50), _health("2.0.0", 104, 52))
    verdict = ok.wait_healthy("2.0.0", quick)
    assert verdict.healthy and verdict.reads == 6 and verdict.review_pct == 33.3
    assert "never said online on 2.0.0" in _watcher({"state": "online", "model_version": "1.0.0"},
                                                    ).wait_healthy("2.0.0", quick).reason
    assert "no health event from 2.0.0" in _watcher(online, _health("1.0.0", 9, 9)).wait_healthy("2.0.0", quick).reason
    few = _watcher(online, _health("2.0.0", 10, 0), _health("2.0.0", 12, 0)).wait_healthy("2.0.0", quick)
    assert not few.healthy and few.reason == "only 2 reads on 2.0.0 in 0.3 s (need 5)"
    # counters that go backwards (an agent restart) start a new baseline instead of negative deltas
    bad = _watcher(online, _health("2.0.0", 50, 50), _health("2.0.0", 0, 0), _health("2.0.0", 0, 20))
    verdict = bad.wait_healthy("2.0.0", quick)
    assert not verdict.healthy and verdict.reason == "100% of 20 reads on 2.0.0 went to review (max 90%)"
    down = _watcher(online)
    down.link_up = lambda: False
    verdict = down.wait_healthy("2.0.0", quick)
    assert not verdict.healthy and not verdict.judged and "lost during the health check" in verdict.reason


def test_a_broker_lost_during_the_check_keeps_the_new_version(tmp_path, mqtt_broker, base_bundle, server, keys,
                                                               site_v1):
    """No agent answers, and the broker dies mid-check: nothing was judged, so no rollback, no failed mark."""
    add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
    args = [sys.executable, "-m", "sync", "pull", "--registry", server.url, "--public-key", str(keys[0].public_path),
            "--models-dir", str(site_v1), "--timeout", "2", "--retries", "0",
            *map(str, mqtt_args(mqtt_broker.port, **{"--health-timeout": 6}))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if '\\"event\\": \\"health_check\\"' in line:
                break
        mqtt_broker.kill()
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (err, rest)
    assert rest.strip().splitlines()[-1] == "updated: 1.1.0"
    assert "lost during the health check" in rest
    assert activation.active_version(site_v1) == "1.1.0"
    assert "1.1.0" not in activation.load_state(site_v1).get("failed", {})


def test_a_health_check_killed_midway_is_resumed_by_the_next_pull(tmp_path, mqtt_broker, base_bundle, server,
                                                                   keys, site_v1):
    """kill -9 while the new version is being judged: the next pull judges it before anything else
    (here no agent runs on the line, so it is rolled back) instead of leaving it active unjudged."""
    import os
    import signal
    import time

    add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
    args = [sys.executable, "-m", "sync", "pull", "--registry", server.url, "--public-key",
            str(keys[0].public_path), "--models-dir", str(site_v1), "--timeout", "2", "--retries", "0",
            *map(str, mqtt_args(mqtt_broker.port, **{"--health-timeout": 120}))]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if _logged_event(line) == "health_check":
                break
        else:
            raise AssertionError("the pull never reached its health check")
        assert activation.load_state(site_v1).get("health_pending") == "1.1.0", (line, activation.load_state(site_v1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert activation.active_version(site_v1) == "1.1.0"  # active, but nobody judged it
    out = run_pull(server, site_v1, keys, *mqtt_args(mqtt_broker.port, **{"--health-timeout": 3}))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rolled back" in out.stderr.strip().splitlines()[-1]
    assert activation.active_version(site_v1) == BASE_VERSION
    assert not activation.load_state(site_v1).get("health_pending")


def _logged_event(line: str) -> str | None:
    """The sync event a JSON log line carries (its message is the event's JSON), if any."""
    try:
        return json.loads(json.loads(line)["msg"]).get("event")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
