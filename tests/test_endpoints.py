"""The agent's /metrics, /healthz and /readyz: real agent, real Mosquitto, real HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.endpoints import Check, readiness
from tests.test_agent import BASE, RunningAgent, agent_table, camera_frames, plc_for  # noqa: F401 - fixture


def get(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_readiness_names_every_failing_check():
    status, body = readiness({"model": Check(True), "broker": Check(False, "not connected"),
                              "camera": Check(False, "state reconnecting")})
    assert status == 503 and body["failing"] == ["broker", "camera"] and body["ready"] is False
    assert body["checks"]["broker"] == {"ok": False, "detail": "not connected"}
    assert readiness({"model": Check(True)}) == (200, {"ready": True, "failing": [],
                                                       "checks": {"model": {"ok": True, "detail": ""}}})


@pytest.fixture
def served(tmp_path, mqtt_broker, camera_frames):  # noqa: F811 - pytest fixture by name
    folder, _ = camera_frames
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, folder))
    plc = plc_for(mqtt_broker.port)
    assert plc.wait_online(30)
    yield agent, plc, agent.agent.endpoint.url, mqtt_broker
    plc.stop()
    agent.stop()


def test_metrics_parse_with_prometheus_own_parser_and_carry_every_stage(served):
    agent, plc, url, _ = served
    for i in range(5):
        assert plc.request(f"m-{i}", timeout_s=20) is not None
    assert wait_for(lambda: "postcode_stage_seconds_count" in get(f"{url}/metrics")[1].decode())
    status, body, headers = get(f"{url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    stages = {s.labels["stage"] for s in families["postcode_stage_seconds"].samples if "stage" in s.labels}
    assert {"wait_frame", "locate", "classify", "decide", "store", "publish_ack"} <= stages
    counts = {s.labels["stage"]: s.value for s in families["postcode_stage_seconds"].samples
              if s.name.endswith("_count")}
    assert counts["store"] >= 5 and counts["locate"] >= 1 and counts["publish_ack"] >= 5
    assert sum(s.value for s in families["postcode_triggers"].samples if s.name.endswith("_total")) >= 5
    assert any(s.name == "postcode_trigger_to_result_seconds_count" and s.value >= 5
               for s in families["postcode_trigger_to_result_seconds"].samples)
    assert families["postcode_broker_connected"].samples[0].value == 1
    link = {s.labels["kind"]: s.value for s in families["postcode_mqtt_messages"].samples if s.name.endswith("_total")}
    assert link["acked"] >= 5 and link["published"] >= link["acked"] and link["resent"] == link["disconnects"] == 0
    assert "postcode_outbox_pending" in families and "postcode_camera_state" in families
    # What the accepted answers' own posteriors expect to go wrong: 1 - the digits' product each
    # (no plan here), summed over the answers sent to the sorter.
    answers = {s.labels["outcome"]: s.value for s in families["postcode_answers"].samples if s.name.endswith("_total")}
    [expected] = [s.value for s in families["postcode_misdirects_expected"].samples if s.name.endswith("_total")]
    assert 0.0 <= expected <= answers["accepted"] * (1 - agent.agent.reader.model.manifest.acceptance_threshold ** 5)
    assert (expected > 0) == (answers["accepted"] > 0)
    [info] = families["postcode_model_info"].samples
    assert info.labels["version"] == agent.agent.reader.model.version
    # Which stage uses the core, per thread role; the reader read five frames.
    cpu = {s.labels["thread"]: s.value for s in families["postcode_thread_cpu_seconds"].samples
           if s.name.endswith("_total")}
    assert {"reader-0", "store", "journal", "mqtt-deliver", "mqtt-network", "grabber", "health"} <= set(cpu)
    assert cpu["reader-0"] > 0


def test_readyz_fails_naming_the_broker_while_it_is_down_and_recovers(served):
    _agent, _plc, url, broker = served
    assert wait_for(lambda: get(f"{url}/readyz")[0] == 200)
    assert get(f"{url}/healthz")[0] == 200
    broker.stop()
    assert wait_for(lambda: get(f"{url}/readyz")[0] == 503)
    body = json.loads(get(f"{url}/readyz")[1])
    assert body["failing"] == ["broker"] and "not connected" in body["checks"]["broker"]["detail"]
    assert get(f"{url}/healthz")[0] == 200  # alive all the same
    broker.start()
    assert wait_for(lambda: get(f"{url}/readyz")[0] == 200)


def test_readyz_names_the_camera_when_it_is_gone(tmp_path, mqtt_broker, camera_frames):  # noqa: F811
    import shutil

    folder, _ = camera_frames
    camera = tmp_path / "camera"
    shutil.copytree(folder, camera)
    agent = RunningAgent(agent_table(tmp_path, mqtt_broker.port, camera))
    url = agent.agent.endpoint.url
    try:
        assert wait_for(lambda: get(f"{url}/readyz")[0] == 200)
        camera.rename(tmp_path / "unplugged")
        assert wait_for(lambda: "camera" in json.loads(get(f"{url}/readyz")[1])["failing"])
        (tmp_path / "unplugged").rename(camera)
        assert wait_for(lambda: get(f"{url}/readyz")[0] == 200)
    finally:
        agent.stop()


def test_unknown_paths_and_writes_get_json_errors(served):
    _agent, _plc, url, _ = served
    status, body, headers = get(f"{url}/../etc/passwd")
    assert status == 404 and "error" in json.loads(body)
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, body, _ = get(f"{url}/metrics", method="POST")
    assert status == 405 and "read-only" in json.loads(body)["error"]


def test_rate_window_counts_the_last_minute_only():
    from edge_agent.metrics import RateWindow

    window = RateWindow(60.0)
    window.add(0.0, True, None)  # falls out of the window
    for t, accepted, reason in ((50.0, True, None), (55.0, False, "low_confidence"), (58.0, True, None)):
        window.add(t, accepted, reason)
    rates = window.rates(61.0)
    assert rates["reads_per_min"] == 3.0 and rates["auto_sort_pct"] == 66.67
    assert rates["review_pct_by_reason"] == {"low_confidence": 33.33}
    assert RateWindow(60.0).rates(0.0)["auto_sort_pct"] is None


def test_the_http_thread_stops_cleanly_with_a_client_holding_a_connection():
    """stop() closes the sockets on waitress's own loop thread: the thread ends, the port is free
    at once, and no "Bad file descriptor" crash is reported from the loop (as it was when the
    sockets were closed from the stopping thread while the loop sat in select on them)."""
    import http.client
    import socket
    import threading

    from edge_agent.endpoints import EndpointServer, make_app
    from prometheus_client import CollectorRegistry

    crashed: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: crashed.append(f"{args.thread.name}: {args.exc_value!r}")
    try:
        for _ in range(10):
            server = EndpointServer(make_app(CollectorRegistry(), lambda: {}, lambda: {}), "127.0.0.1", 0).start()
            keep_alive = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            keep_alive.request("GET", "/healthz")
            assert keep_alive.getresponse().read()  # HTTP/1.1: the connection stays open
            server.stop()
            assert not server.alive, "the loop thread still runs after stop()"
            with socket.socket() as again:  # the port can be bound again straight away
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                again.bind(("127.0.0.1", server.port))
            keep_alive.close()
    finally:
        threading.excepthook = previous_hook
    assert crashed == []
