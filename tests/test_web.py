"""edge-web: the site state (pure), the Flask views, and the whole dashboard against a real Mosquitto."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import free_port, wait_for_port
from tests.paths import ROOT
from web.app import create_app
from web.cli import build_parser, config_from_args
from web.config import BrokerSettings, WebConfigError, parse_broker_address
from web.mqtt_source import MqttSource
from web.server import DashboardServer
from web.state import (FINE_SPAN_S, MAX_CHART_POINTS, MAX_LINES, MAX_READS, MAX_SYNC_EVENTS, LineStatus,
                       MessageKind, Rollout, SiteState)

T0 = 1_800_000_000.0
SITE = "site-7"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()


def status_online(at: float = T0, ttl_s: float = 30) -> bytes:
    return json.dumps({"state": "online", "client_id": "edge-site-7-line-1", "protocol": "5", "since": at - 100,
                       "at": at, "ttl_s": ttl_s}).encode()


def status_offline(reason: str = "connection lost") -> bytes:
    return json.dumps({"state": "offline", "client_id": "edge-site-7-line-1", "reason": reason}).encode()


def health(at: float = T0, reads: int = 100, accepted: int = 70, period: float = 2.0, **extra: Any) -> bytes:
    body = {
        "line": "line-1", "site": SITE, "at": at, "model_version": "1.0.0", "health_period_s": period,
        "metrics_url": "http://127.0.0.1:9400/metrics",
        "counters": {"reads": reads, "accepted": accepted, "reviews": reads - accepted, "read_errors": 0,
                     "by_reason": {"low_confidence": reads - accepted}},
        "rates": {"reads_per_min": 120.0, "auto_sort_pct": 70.0,
                  "review_pct_by_reason": {"low_confidence": 25.0, "digit_count": 5.0}},
        "latency_ms": {"p50": 11.0, "p99": 19.0},
        "stages_ms": {"locate": {"p50": 6.0, "p99": 9.0, "n": 100},
                      "trigger_to_result": {"p50": 12.5, "p99": 21.5, "n": 100}},
        "camera": {"state": "ok", "fps": 10.0, "last_error": None},
        "outbox": {"pending": 3, "added": 100, "delivered": 97, "dropped": 0, "expired": 0},
        "mqtt": {"connected": True, "protocol": "5"},
        "system": {"cpu_pct": 40.0, "mem_rss_mb": 110.0, "mem_pct": 2.0, "disk_free_pct": 50.0,
                   "temperature_c": None},
        "observability": {
            "window": {"reads": 80, "digit_distribution": [0.1] * 10,
                       "digit_distribution_by_position": [[0.1] * 10] * 5,
                       "confidence_histogram": {"edges": [i / 20 for i in range(21)], "counts": [0] * 19 + [400]},
                       "review_rate": 0.3, "digits_per_frame": {"mean": 5.0, "counts": [0] * 9},
                       "quality": {"brightness": 160.0, "contrast": 20.0, "sharpness": 190.0,
                                   "inverted_share": 0.1}},
            "reference": {"reads": 500, "complete": True, "digit_distribution": [0.1] * 10},
            "training": {"class_distribution": [0.1] * 10},
            "drift": {"judged": True, "figures": {"prediction_psi": 0.01, "sharpness_ratio": 1.0},
                      "levels": {"prediction_psi": 0.25}, "alarms": []},
        },
    }
    body.update(extra)
    return json.dumps(body).encode()


def read(n: int, accepted: bool = True, crops: str | None = PNG) -> bytes:
    return json.dumps({"result_id": f"r-{n}", "item_id": f"item-{n}", "postcode": "75001", "accepted": accepted,
                       "reason": None if accepted else "low_confidence", "confidence": 0.99,
                       "digits": [{"digit": 7, "confidence": 0.99}], "crops_png": crops,
                       "decided_at": T0 + n, "latency_ms": 12.0}).encode()


def iso(epoch: float) -> str:
    """Time as edge-sync writes it in last_result (sync.registry.iso)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def sync_state(active: str = "1.1.0", previous: str | None = "1.0.0", outcome: str = "updated",
               version: str | None = None, reason: str = "", at: float = T0, **extra: Any) -> bytes:
    """The retained ``sync`` message, shaped like edge-sync's (sync/cli.py _sync_state + SyncMqtt.state)."""
    error = reason if outcome in ("refused", "rolled_back") else None
    return json.dumps({"active": active, "previous": previous, "last_error": error, "at": at,
                       "last_result": {"outcome": outcome, "version": version or active, "reason": reason,
                                       "at": iso(at)}, **extra}).encode()


def sync_event(event: str, at: float = T0, **fields: Any) -> bytes:
    return json.dumps({"event": event, "at": at, **fields}).encode()


def up_line(state: SiteState, line: str, version: str, now: float, period: float = 2.0) -> None:
    """A line whose agent is online and reports health on ``version``."""
    state.handle(line, MessageKind.STATUS, status_online(now), now=now)
    state.handle(line, MessageKind.HEALTH, health(now, period=period, model_version=version), now=now)


def fed_state(now: float = T0) -> SiteState:
    """A site with one healthy line (line-1) and one whose agent died (line-2)."""
    state = SiteState(SITE, clock=lambda: now, broker="127.0.0.1:1883")
    state.broker_connected(now=now - 60)
    state.handle("line-1", MessageKind.STATUS, status_online(now - 5), now=now - 5)
    for i in range(5):
        state.handle("line-1", MessageKind.HEALTH, health(now - 10 + 2 * i, reads=100 + 10 * i), now=now - 10 + 2 * i)
    for i in range(3):
        state.handle("line-1", MessageKind.READ, read(i, accepted=i != 1), now=now - 3 + i)
    state.handle("line-1", MessageKind.ERROR, b'{"kind": "bad_trigger", "error": "not JSON"}', now=now - 1)
    state.handle("line-2", MessageKind.STATUS, status_offline(), now=now - 20)
    return state


# -- SiteState ---------------------------------------------------------------------------------

def test_online_status_is_up_and_the_last_will_takes_the_line_down():
    state = SiteState(SITE, clock=lambda: T0)
    state.broker_connected(now=T0)
    state.handle("line-1", MessageKind.STATUS, status_online(T0), now=T0)
    assert state.line("line-1", now=T0 + 1)["status"] == LineStatus.UP.value
    state.handle("line-1", MessageKind.STATUS, status_offline("connection lost"), now=T0 + 2)
    view = state.line("line-1", now=T0 + 2)
    assert view["status"] == "down" and "connection lost" in view["status_reason"]
    # The agent restarts: its online status brings the line back.
    state.handle("line-1", MessageKind.STATUS, status_online(T0 + 5), now=T0 + 5)
    assert state.line("line-1", now=T0 + 6)["status"] == "up"


def test_online_status_older_than_its_ttl_is_down_and_a_fresh_one_brings_it_back():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    # A retained "online" restored by a broker from disk: true at its "at", long ago.
    state.handle("line-1", MessageKind.STATUS, status_online(T0 - 120, ttl_s=30), retained=True, now=T0)
    view = state.line("line-1", now=T0)
    assert view["status"] == "down" and "ttl 30" in view["status_reason"]
    # A live status is refreshed every ~10 s; one not refreshed within its ttl is down too.
    state.handle("line-1", MessageKind.STATUS, status_online(T0 + 1), now=T0 + 1)
    assert state.line("line-1", now=T0 + 20)["status"] == "up"
    assert state.line("line-1", now=T0 + 32)["status"] == "down"
    state.handle("line-1", MessageKind.STATUS, status_online(T0 + 40), now=T0 + 40)
    assert state.line("line-1", now=T0 + 41)["status"] == "up"


def test_health_silent_for_three_periods_is_down():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    state.handle("line-1", MessageKind.STATUS, status_online(T0, ttl_s=30), now=T0)
    state.handle("line-1", MessageKind.HEALTH, health(T0, period=2.0), now=T0)
    assert state.line("line-1", now=T0 + 5.9)["status"] == "up"
    view = state.line("line-1", now=T0 + 6.5)
    assert view["status"] == "down" and "no health report" in view["status_reason"]
    state.handle("line-1", MessageKind.HEALTH, health(T0 + 7), now=T0 + 7)
    assert state.line("line-1", now=T0 + 7)["status"] == "up"


def test_an_unreachable_broker_keeps_the_last_state_and_says_lines_are_unknown():
    state = fed_state()
    state.broker_lost("connection to 127.0.0.1:1883 lost", now=T0 + 1)
    snap = state.snapshot(now=T0 + 30)
    assert snap["broker"]["state"] == "unreachable" and not snap["broker"]["connected"]
    line = snap["lines"][0]
    assert line["status"] == "unknown" and "broker unreachable" in line["status_reason"]
    assert line["model_version"] == "1.0.0" and line["rates"]["reads_per_min"] == 120.0  # last known
    # Back: health silence is counted from the reconnection, not across edge-web's own outage.
    state.broker_connected(now=T0 + 60)
    # On resubscribing the broker sends the retained status again (refreshed by the agent 5 s ago).
    state.handle("line-1", MessageKind.STATUS, status_online(T0 + 55), retained=True, now=T0 + 60)
    assert state.line("line-1", now=T0 + 62)["status"] == "up"
    assert state.line("line-1", now=T0 + 67)["status"] == "down"


def test_a_line_view_carries_what_the_page_shows():
    view = fed_state().line("line-1")
    assert view["status"] == "up" and view["model_version"] == "1.0.0"
    assert view["rates"] == {"reads_per_min": 120.0, "auto_sort_pct": 70.0, "review_pct": 30.0,
                             "review_pct_by_reason": {"low_confidence": 25.0, "digit_count": 5.0}}
    assert view["latency_ms"] == {"p50": 12.5, "p99": 21.5}  # trigger to result, when the agent gives it
    assert view["stages_ms"]["locate"] == {"p50": 6.0, "p99": 9.0}
    assert view["outbox"]["pending"] == 3 and view["camera"]["state"] == "ok" and view["mqtt"]["connected"]
    assert view["metrics_url"] == "http://127.0.0.1:9400/metrics"
    assert len(view["series"]["at"]) == 5 and view["series"]["p99_ms"][-1] == 21.5
    assert [r["result_id"] for r in view["reads"]] == ["r-2", "r-1", "r-0"]  # newest first
    assert view["reads"][0]["crops_png"] == PNG
    assert view["errors"][0]["kind"] == "bad_trigger"
    obs = view["observability"]
    # Either name of a field is understood: the agents' keys are still settling.
    assert obs["window"]["by_position"] == [[0.1] * 10] * 5
    assert obs["window"]["input_quality"]["sharpness"] == 190.0
    assert obs["training"]["digit_distribution"] == [0.1] * 10
    assert obs["window"]["confidence_histogram"]["counts"][-1] == 400
    assert view["drift"] == {"state": "ok", "alarms": [], "at": None, "judged": True}
    assert view["chute_threshold"] is None  # no sort plan on this line


def test_the_chute_bar_of_a_line_with_a_sort_plan_keeps_its_decimals():
    state = fed_state()
    body = json.loads(health(T0 + 50))
    body["chute_threshold"] = {"threshold": 0.99364, "acceptance": "spent", "strict": 0.999, "reads": 2000,
                               "min_reads": 500}
    state.handle("line-1", MessageKind.HEALTH, json.dumps(body).encode(), now=T0 + 50)
    assert state.line("line-1", now=T0 + 50)["chute_threshold"] == {
        "threshold": 0.99364, "strict": 0.999, "acceptance": "spent", "reads": 2000.0, "min_reads": 500.0}
    body["chute_threshold"] = {"threshold": "high", "acceptance": "<script>"}
    state.handle("line-1", MessageKind.HEALTH, json.dumps(body).encode(), now=T0 + 51)
    assert state.line("line-1", now=T0 + 51)["chute_threshold"] is None


def test_rates_come_from_counters_when_an_older_agent_sends_none():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    for i, (reads, accepted) in enumerate([(100, 60), (110, 68), (130, 83)]):
        body = json.loads(health(T0 + 10 * i, reads=reads, accepted=accepted))
        del body["rates"], body["stages_ms"], body["health_period_s"]
        state.handle("line-1", MessageKind.HEALTH, json.dumps(body).encode(), now=T0 + 10 * i)
    view = state.line("line-1", now=T0 + 20)
    assert view["rates"]["reads_per_min"] == 120.0  # 20 reads in 10 s
    assert view["rates"]["auto_sort_pct"] == 75.0 and view["rates"]["review_pct"] == 25.0
    assert view["latency_ms"] == {"p50": 11.0, "p99": 19.0}
    assert view["health_period_s"] == 10.0  # the old agents' period


def test_drift_alarm_from_the_retained_event_and_from_health():
    state = fed_state()
    alarm = {"kind": "prediction", "figure": "prediction_psi", "value": 0.61, "level": 0.25,
             "message": "predicted digits differ from the site reference"}
    state.handle("line-1", MessageKind.DRIFT, json.dumps({"state": "alarm", "alarms": [alarm], "at": T0}).encode(),
                 retained=True, now=T0 + 1)
    snap = state.snapshot(now=T0 + 1)
    assert snap["lines"][0]["drift"]["state"] == "alarm" and snap["summary"]["drift_alarms"] == 1
    assert snap["lines"][0]["drift"]["alarms"][0]["message"].startswith("predicted digits")
    # A later health report that carries no alarm any more clears it.
    state.handle("line-1", MessageKind.HEALTH, health(T0 + 2), now=T0 + 2)
    assert state.line("line-1", now=T0 + 2)["drift"]["state"] == "ok"


def test_bad_messages_are_counted_and_change_nothing():
    state = SiteState(SITE)
    assert not state.handle("line-1", MessageKind.HEALTH, b"not json", now=T0)
    assert not state.handle("line-1", MessageKind.HEALTH, b"[1, 2]", now=T0)
    assert not state.handle("bad line!", MessageKind.STATUS, status_online(), now=T0)
    assert not state.handle("line-1", MessageKind.HEALTH, b" " * (300 * 1024), now=T0)
    assert state.snapshot(now=T0)["summary"]["ignored_messages"] == 4 and state.line_ids() == []
    # Wrong types inside a good message come out as "unknown", never as an exception.
    assert state.handle("line-1", MessageKind.HEALTH, json.dumps({
        "rates": "fast", "latency_ms": [1], "counters": None, "observability": {"window": 7},
        "metrics_url": "javascript:alert(1)", "model_version": {"x": 1}}).encode(), now=T0)
    view = state.line("line-1", now=T0)
    assert view["rates"]["reads_per_min"] is None and view["metrics_url"] is None
    assert view["model_version"] is None and view["observability"]["window"]["digit_distribution"] is None


def test_reads_keep_only_valid_crops_and_are_bounded():
    state = SiteState(SITE)
    for n in range(MAX_READS + 8):
        state.handle("line-1", MessageKind.READ, read(n, crops="<script>" if n % 2 else PNG), now=T0 + n)
    reads = state.line("line-1", now=T0 + 30)["reads"]
    assert len(reads) == MAX_READS
    assert {r["crops_png"] for r in reads} == {PNG, None}


def test_lines_and_series_are_bounded():
    state = SiteState(SITE)
    for n in range(MAX_LINES + 5):
        state.handle(f"line-{n}", MessageKind.STATUS, status_online(T0 + n), now=T0 + n)
    ids = state.line_ids()
    assert len(ids) == MAX_LINES and "line-0" not in ids and f"line-{MAX_LINES + 4}" in ids
    # Four hours of health every 2 s: the fine series keeps 30 min, the coarse one a point a minute.
    state = SiteState(SITE)
    for i in range(4 * 1800):
        state.handle("line-1", MessageKind.HEALTH, health(T0 + 2 * i), now=T0 + 2 * i)
    now = T0 + 2 * (4 * 1800 - 1)
    fine = state.line("line-1", minutes=30, now=now)["series"]["at"]
    assert len(fine) <= MAX_CHART_POINTS and fine[-1] == round(now, 1) and fine[0] >= now - FINE_SPAN_S
    coarse = state.line("line-1", minutes=240, now=now)["series"]["at"]
    assert 230 <= len(coarse) <= 241 and coarse[0] >= now - 240 * 60
    assert len(state.line("line-1", minutes=5, now=now)["series"]["at"]) == 151  # both ends of 5 min


# -- models and sync -------------------------------------------------------------------------

def test_sync_state_gives_active_previous_and_the_last_result_with_its_age():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    up_line(state, "line-1", "1.1.0", T0)
    assert state.handle("line-1", MessageKind.SYNC, sync_state(at=T0 - 120), retained=True, now=T0)
    view = state.line("line-1", now=T0 + 5)
    assert view["model_version"] == "1.1.0"
    assert view["sync"] == {"heard": True, "at": T0 - 120, "age_s": 125.0, "last_error": None, "problem": None,
                            "last_result": {"outcome": "updated", "version": "1.1.0", "reason": None,
                                            "at": T0 - 120, "age_s": 125.0}}
    model = view["model"]
    assert (model["running"], model["active"], model["previous"]) == ("1.1.0", "1.1.0", "1.0.0")
    assert model["rollout"] == Rollout.IN_SYNC.value and not model["mismatch"] and not model["canary"]
    # An older edge-sync that says only the outcome, and one that names its channel.
    state.handle("line-1", MessageKind.SYNC, json.dumps({"active": "1.1.0", "last_result": "up_to_date",
                                                         "channel": "stable"}).encode(), now=T0 + 40)
    view = state.line("line-1", now=T0 + 40)
    assert view["sync"]["last_result"] == {"outcome": "up_to_date", "version": None, "reason": None, "at": None,
                                           "age_s": None}
    assert view["sync"]["at"] == T0 + 40 and view["model"]["channel"] == "stable"  # no "at": its arrival


def test_a_refused_or_rolled_back_pull_is_a_sync_problem_with_its_reason():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    up_line(state, "line-1", "1.0.0", T0)
    reason = "unhealthy: 97% of 40 reads on 1.1.0 went to review (max 90%)"
    state.handle("line-1", MessageKind.SYNC, sync_state("1.0.0", "1.1.0", "rolled_back", "1.1.0", reason), now=T0)
    snap = state.snapshot(now=T0 + 1)
    sync = snap["lines"][0]["sync"]
    assert sync["problem"] == {"outcome": "rolled_back", "version": "1.1.0", "reason": reason}
    assert sync["last_error"] == reason and snap["summary"]["sync_problems"] == 1
    # The next pull refuses the failed version again: still a problem, with the new reason.
    refusal = "version 1.1.0 failed before (unhealthy: ...); waiting for a newer one"
    state.handle("line-1", MessageKind.SYNC, sync_state("1.0.0", "1.1.0", "refused", "1.1.0", refusal), now=T0 + 2)
    assert state.line("line-1", now=T0 + 2)["sync"]["problem"]["reason"] == refusal
    # A refusal without a reason still says what happened.
    state.handle("line-1", MessageKind.SYNC, json.dumps({"active": "1.0.0", "last_result": "refused"}).encode(),
                 now=T0 + 3)
    assert state.line("line-1", now=T0 + 3)["sync"]["problem"]["reason"] == "refused"
    state.handle("line-1", MessageKind.SYNC, sync_state("1.2.0", "1.0.0"), now=T0 + 4)
    assert state.snapshot(now=T0 + 4)["summary"]["sync_problems"] == 0
    # A first model installed from the shipped bundle (edge-sync adopt, with a channel) is no problem.
    state.handle("line-1", MessageKind.SYNC, sync_state("1.0.0", None, "adopted", reason="from /usr/share/bundle",
                                                        channel="stable"), now=T0 + 5)
    sync = state.line("line-1", now=T0 + 5)["sync"]
    assert sync["last_result"]["outcome"] == "adopted" and sync["problem"] is None


def test_an_agent_on_another_version_than_the_active_one_is_a_mismatch_after_two_health_periods():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    up_line(state, "line-1", "1.0.0", T0, period=2.0)
    state.handle("line-1", MessageKind.SYNC, sync_state("1.1.0", "1.0.0"), now=T0 + 1)
    # Within the grace period (2 x 2 s) the agent is switching, not failing.
    assert state.line("line-1", now=T0 + 4)["model"]["rollout"] == Rollout.SWITCHING.value
    state.handle("line-1", MessageKind.HEALTH, health(T0 + 4, model_version="1.0.0"), now=T0 + 4)
    view = state.line("line-1", now=T0 + 5.5)
    assert view["model"]["rollout"] == "mismatch" and view["model"]["mismatch"] is True
    assert view["model"]["mismatch_for_s"] == 4.5
    assert view["model"]["mismatch_reason"] == "agent runs 1.0.0, sync's active version is 1.1.0 (for 4 s)"
    assert state.snapshot(now=T0 + 5.5)["summary"]["model_mismatches"] == 1
    # The agent's model event says it switched: in sync at once, without waiting for health.
    assert state.handle("line-1", MessageKind.MODEL_EVENT,
                        json.dumps({"from": "1.0.0", "to": "1.1.0", "bundle": "/m/versions/1.1.0"}).encode(),
                        now=T0 + 6)
    view = state.line("line-1", now=T0 + 6)
    assert view["model"]["rollout"] == "in_sync" and view["model_version"] == "1.1.0"
    assert view["sync_events"][0] == {"source": "agent", "event": "switched", "at": T0 + 6, "version": "1.1.0",
                                      "from": "1.0.0", "to": "1.1.0", "channel": None, "reason": None}
    # A retained status on the old version (a rollback) starts the clock again.
    state.handle("line-1", MessageKind.STATUS, json.dumps({"state": "online", "at": T0 + 7, "ttl_s": 30,
                                                           "model_version": "1.0.0"}).encode(), now=T0 + 7)
    assert state.line("line-1", now=T0 + 7)["model"]["rollout"] == "switching"


def test_no_mismatch_without_a_sync_state_a_version_or_a_running_agent():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    up_line(state, "line-1", "1.0.0", T0)
    assert state.line("line-1", now=T0 + 60)["model"]["rollout"] == Rollout.UNKNOWN.value  # no sync heard
    state.handle("line-1", MessageKind.SYNC, sync_state("1.1.0"), now=T0)
    state.handle("line-1", MessageKind.STATUS, status_offline("stopped"), now=T0 + 1)
    view = state.line("line-1", now=T0 + 60)
    assert view["status"] == "down" and view["model"]["rollout"] == "unknown" and not view["model"]["mismatch"]
    # Only sync has spoken for line-2: its version is the active one, nothing to compare with.
    state.handle("line-2", MessageKind.SYNC, sync_state("1.1.0"), now=T0)
    view = state.line("line-2", now=T0 + 60)
    assert view["model_version"] == "1.1.0" and view["model"]["running"] is None
    assert view["model"]["rollout"] == "unknown"


def test_a_line_on_a_canary_channel_or_on_another_version_than_most_is_a_canary():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    for line in ("line-1", "line-2", "line-3"):
        up_line(state, line, "1.0.0", T0)
    snap = state.snapshot(now=T0)
    assert snap["summary"]["canary_lines"] == 0 and snap["summary"]["model_versions"] == {"1.0.0": 3}
    # line-3 pulls from the canary channel (named in the pull's first step) and runs 1.1.0.
    state.handle("line-3", MessageKind.SYNC_EVENT, sync_event("check", active="1.0.0", channel="canary", pin=None),
                 now=T0 + 1)
    state.handle("line-3", MessageKind.HEALTH, health(T0 + 2, model_version="1.1.0"), now=T0 + 2)
    snap = state.snapshot(now=T0 + 2)
    assert snap["summary"]["model_versions"] == {"1.0.0": 2, "1.1.0": 1}
    assert snap["summary"]["model_majority"] == "1.0.0" and snap["summary"]["canary_lines"] == 1
    canary = snap["lines"][2]["model"]
    assert canary["canary"] and canary["canary_reason"] == "channel canary" and canary["channel"] == "canary"
    # A line left behind on stable stands out too: its version differs from the site's majority.
    state.handle("line-3", MessageKind.SYNC_EVENT, sync_event("check", active="1.1.0", channel="stable"), now=T0 + 3)
    for line in ("line-1", "line-2"):
        state.handle(line, MessageKind.HEALTH, health(T0 + 3, model_version="1.2.0"), now=T0 + 3)
    lines = state.snapshot(now=T0 + 3)["lines"]
    assert [v["model"]["canary"] for v in lines] == [False, False, True]
    assert lines[2]["model"]["canary_reason"] == "runs 1.1.0; most lines run 1.2.0"
    # Two lines on two versions: no majority, nobody is singled out.
    two = SiteState(SITE)
    up_line(two, "a", "1.0.0", T0)
    up_line(two, "b", "1.1.0", T0)
    snap = two.snapshot(now=T0)
    assert snap["summary"]["model_majority"] is None and snap["summary"]["canary_lines"] == 0


def test_sync_steps_are_listed_newest_first_and_bounded():
    state = SiteState(SITE)
    steps = [sync_event("check", T0, active="1.0.0", channel="stable", pin=None),
             sync_event("download", T0 + 1, version="1.1.0", bytes=120_000),
             sync_event("activated", T0 + 2, version="1.1.0", previous="1.0.0", pruned=[]),
             sync_event("rolled_back", T0 + 3, version="1.1.0", to="1.0.0", reason="unhealthy: no reads")]
    for n, step in enumerate(steps):
        assert state.handle("line-1", MessageKind.SYNC_EVENT, step, now=T0 + n)
    events = state.line("line-1", now=T0 + 5)["sync_events"]
    assert [e["event"] for e in events] == ["rolled_back", "activated", "download", "check"]
    assert events[0] == {"source": "sync", "event": "rolled_back", "at": T0 + 3, "version": "1.1.0", "from": None,
                         "to": "1.0.0", "channel": None, "reason": "unhealthy: no reads"}
    assert events[1]["from"] == "1.0.0" and events[3]["channel"] == "stable"
    for n in range(MAX_SYNC_EVENTS + 15):
        state.handle("line-1", MessageKind.SYNC_EVENT, sync_event("up_to_date", T0 + 10 + n, version="1.0.0"),
                     now=T0 + 10 + n)
        state.handle("line-1", MessageKind.MODEL_EVENT, json.dumps({"from": "1.0.0", "to": "1.1.0"}).encode(),
                     now=T0 + 10 + n)
    events = state.line("line-1", now=T0 + 60)["sync_events"]
    assert len(events) == MAX_SYNC_EVENTS and events[0]["source"] == "agent"
    assert events[1]["at"] == T0 + 10 + MAX_SYNC_EVENTS + 14


def test_bad_sync_and_model_messages_are_counted_or_come_out_unknown():
    state = SiteState(SITE)
    state.broker_connected(now=T0)
    for kind in (MessageKind.SYNC, MessageKind.SYNC_EVENT, MessageKind.MODEL_EVENT):
        assert not state.handle("line-1", kind, b"not json", now=T0)
        assert not state.handle("line-1", kind, b'["a list"]', now=T0)
    # Events that name no step, or a model event that names no version switched to.
    assert not state.handle("line-1", MessageKind.SYNC_EVENT, b'{"version": "1.0.0"}', now=T0)
    assert not state.handle("line-1", MessageKind.SYNC_EVENT, b'{"event": "<img src=x onerror=alert(1)>"}', now=T0)
    assert not state.handle("line-1", MessageKind.MODEL_EVENT, b'{"from": "1.0.0", "to": {"v": 2}}', now=T0)
    assert state.snapshot(now=T0)["summary"]["ignored_messages"] == 9
    # Wrong types inside a sync state: every field unknown, nothing raised.
    assert state.handle("line-1", MessageKind.SYNC, json.dumps({
        "active": ["1.1.0"], "previous": "../../etc/passwd", "last_result": {"outcome": 3, "at": "yesterday"},
        "last_error": {"deep": True}, "at": "soon", "channel": None}).encode(), now=T0)
    view = state.line("line-1", now=T0)
    assert view["sync"]["last_result"] is None and view["sync"]["last_error"] is None
    assert view["sync"]["at"] == T0 and view["model"]["active"] is None and view["model"]["previous"] is None
    assert view["model_version"] is None and view["model"]["rollout"] == "unknown"
    # A last_result with a good outcome but junk beside it keeps the outcome; a local time has no zone.
    state.handle("line-1", MessageKind.SYNC, json.dumps({"active": "1.1.0", "last_result": {
        "outcome": "updated", "version": 1.1, "reason": None, "at": "2027-01-01T10:00:00"}}).encode(), now=T0)
    assert state.line("line-1", now=T0)["sync"]["last_result"] == {"outcome": "updated", "version": None,
                                                                   "reason": None, "at": None, "age_s": None}
    # An event stamped far in the future is listed at its arrival; a huge version is no version.
    state.handle("line-1", MessageKind.SYNC_EVENT, sync_event("check", T0 + 10**6, active="9" * 100), now=T0 + 1)
    event = state.line("line-1", now=T0 + 1)["sync_events"][0]
    assert event["at"] == T0 + 1 and event["from"] is None
    json.dumps(state.snapshot(now=T0 + 1), allow_nan=False)  # still plain JSON


# -- the Flask app ---------------------------------------------------------------------------

class BrokenState:
    site = SITE

    def snapshot(self, minutes: int = 30) -> dict[str, Any]:
        raise RuntimeError("secret internal detail at /var/lib/edge")

    def line(self, line_id: str, minutes: int = 30) -> dict[str, Any] | None:
        raise RuntimeError("secret internal detail at /var/lib/edge")


@pytest.fixture
def app():
    return create_app(fed_state(), {"TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def test_api_site_is_a_snapshot_of_every_line(client):
    response = client.get("/api/site")
    assert response.status_code == 200 and response.is_json
    body = response.get_json()
    assert body["site"] == SITE and body["broker"]["connected"] is True
    assert [line["line"] for line in body["lines"]] == ["line-1", "line-2"]
    assert [line["status"] for line in body["lines"]] == ["up", "down"]
    assert body["summary"] == {"lines": 2, "up": 1, "down": 1, "drift_alarms": 0, "model_versions": {"1.0.0": 1},
                               "model_majority": "1.0.0", "model_mismatches": 0, "canary_lines": 0,
                               "sync_problems": 0, "ignored_messages": 0}
    assert body["lines"][0]["sync"]["heard"] is False and body["lines"][0]["sync_events"] == []
    assert response.headers["Cache-Control"] == "no-store"


def test_api_line_and_its_errors(client):
    assert client.get("/api/line/line-1?minutes=5").get_json()["line"] == "line-1"
    missing = client.get("/api/line/line-99")
    assert missing.status_code == 404 and missing.get_json() == {
        "error": "no line 'line-99' has been heard from on this site"}
    for bad in ("bad%20line", "x" * 65, "%3Cscript%3E"):
        response = client.get(f"/api/line/{bad}")
        assert response.status_code == 400 and "line id" in response.get_json()["error"]


@pytest.mark.parametrize("query, message", [
    ("minutes=0", "from 1 to 240, got 0"),
    ("minutes=241", "from 1 to 240, got 241"),
    ("minutes=abc", "whole number"),
    ("minutes=-5", "whole number"),
    ("minutes=1e3", "whole number"),
    ("minutes=" + "9" * 40, "whole number"),
    ("minutes=%EF%BC%91", "whole number"),  # a full-width digit is not ASCII
    ("minutes=5&minutes=6", "more than once"),
    ("limit=5", "unknown query parameter 'limit'"),
    ("minutes=5&" + "x" * 300, "query string longer than"),
])
def test_bad_query_parameters_are_400_with_a_clear_message(client, query, message):
    for path in ("/api/site", "/api/line/line-1"):
        response = client.get(f"{path}?{query}")
        assert response.status_code == 400, (path, query)
        assert message in response.get_json()["error"]


def test_security_headers_on_every_response(client):
    for path in ("/", "/api/site", "/api/line/line-1", "/api/line/nope", "/healthz", "/nowhere",
                 "/static/dashboard.js", "/static/vendor/chart.umd.min.js"):
        response = client.get(path)
        headers = response.headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        if path.startswith("/api/"):
            assert headers["Cache-Control"] == "no-store"


def test_the_page_has_no_inline_script_and_loads_its_own_files(client):
    html = client.get("/").get_data(as_text=True)
    assert SITE in html
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert " style=" not in html and "<style" not in html and "http://" not in html and "https://" not in html
    for path in ("/static/dashboard.js", "/static/dashboard.css", "/static/vendor/chart.umd.min.js",
                 "/static/favicon.svg"):
        assert client.get(path).status_code == 200, path


def test_a_broken_state_source_is_503_without_a_traceback():
    client = create_app(BrokenState(), {"TESTING": True}).test_client()
    for path in ("/api/site", "/api/line/line-1"):
        response = client.get(path)
        assert response.status_code == 503 and response.is_json
        text = response.get_data(as_text=True)
        assert "Traceback" not in text and "secret" not in text and "/var/lib" not in text
        assert "unavailable" in response.get_json()["error"]
    assert client.get("/healthz").status_code == 200  # the process itself is alive


def test_read_only_and_unknown_paths_answer_json(client):
    for method in ("post", "put", "delete"):
        response = getattr(client, method)("/api/site")
        assert response.status_code == 405 and "error" in response.get_json()
    response = client.get("/nowhere")
    assert response.status_code == 404 and "error" in response.get_json()
    assert client.head("/api/site").status_code == 200


# -- the command line ----------------------------------------------------------------------------

def test_command_line_settings(tmp_path):
    config = config_from_args(build_parser().parse_args(["--site", SITE, "--broker", "broker.local:8883"]))
    assert (config.broker.host, config.broker.port, config.host, config.port) == ("broker.local", 8883,
                                                                                  "127.0.0.1", 8080)
    assert config.broker.topic_prefix == "postcode"
    assert parse_broker_address("[::1]:1884") == ("::1", 1884)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = config_from_args(build_parser().parse_args(
        ["--site", SITE, "--username", "web", "--password-file", str(secret)]))
    assert config.broker.password == "s3cret"
    for argv, message in ([["--site", "a/#"], "--site"], [["--site", SITE, "--broker", "x:99999"], "port"],
                          [["--site", SITE, "--broker", "a b"], "HOST:PORT"],
                          [["--site", SITE, "--topic-prefix", "post/+"], "--topic-prefix"],
                          [["--site", SITE, "--password-file", str(secret)], "needs --username"],
                          [["--site", SITE, "--port", "0"], "--port"]):
        with pytest.raises(WebConfigError, match=re.escape(message)):
            config_from_args(build_parser().parse_args(argv))


# -- against a real broker -----------------------------------------------------------------------

def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(check, timeout_s: float, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    return check()


def publisher(port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-agent", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_dashboard_follows_the_broker_and_survives_its_loss(mqtt_broker):
    state = SiteState(SITE, broker=f"127.0.0.1:{mqtt_broker.port}")
    source = MqttSource(state, BrokerSettings(port=mqtt_broker.port, site=SITE, keepalive_s=2))
    server = DashboardServer(create_app(state), port=0).start()
    source.start()
    agent = publisher(mqtt_broker.port)
    base = f"postcode/{SITE}/line-1"
    try:
        assert wait_until(lambda: get_json(f"{server.url}/api/site")[1]["broker"]["connected"], 10)
        now = time.time()
        agent.publish(f"{base}/status", status_online(now), qos=1, retain=True).wait_for_publish(5)
        agent.publish(f"{base}/events/health", health(now), qos=0)
        agent.publish(f"{base}/events/read", read(1), qos=0)
        agent.publish(f"postcode/other-site/line-1/status", status_online(now), qos=1, retain=True)

        def line_seen():
            _, body = get_json(f"{server.url}/api/site")
            lines = body["lines"]
            return lines if lines and lines[0]["reads"] and lines[0]["model_version"] else None

        lines = wait_until(line_seen, 10)
        assert [line["line"] for line in lines] == ["line-1"]  # only this site's lines
        assert lines[0]["status"] == "up" and lines[0]["rates"]["auto_sort_pct"] == 70.0
        assert lines[0]["reads"][0]["crops_png"] == PNG
        status, body = get_json(f"{server.url}/api/line/line-1")
        assert status == 200 and body["series"]["p50_ms"] == [12.5]

        mqtt_broker.kill()
        assert wait_until(lambda: get_json(f"{server.url}/api/site")[1]["broker"]["state"] == "unreachable", 10)
        status, body = get_json(f"{server.url}/api/site")
        assert status == 200 and body["lines"][0]["status"] == "unknown"
        assert body["lines"][0]["model_version"] == "1.0.0"  # the last known state is still served
        with urllib.request.urlopen(f"{server.url}/", timeout=5) as response:
            assert response.status == 200
        mqtt_broker.start()
        assert wait_until(lambda: get_json(f"{server.url}/api/site")[1]["broker"]["connected"], 15)
    finally:
        agent.loop_stop()
        source.stop()
        server.stop()


def test_edge_syncs_own_messages_reach_the_dashboard_through_mosquitto(mqtt_broker):
    """The publisher is edge-sync's real MQTT reporter, so a change of its topics or fields shows here."""
    from sync.mqtt_report import SyncMqtt

    base = f"postcode/{SITE}/line-1"
    reporter = SyncMqtt("127.0.0.1", mqtt_broker.port, SITE, "line-1")
    assert reporter.connect()
    agent = publisher(mqtt_broker.port)
    state = SiteState(SITE, broker=f"127.0.0.1:{mqtt_broker.port}")
    source = MqttSource(state, BrokerSettings(port=mqtt_broker.port, site=SITE, keepalive_s=2))
    try:
        # Retained before edge-web starts: the state is there as soon as it subscribes.
        reporter.state({"active": "1.0.0", "previous": "1.1.0", "last_error": "unhealthy: no reads",
                        "last_result": {"outcome": "rolled_back", "version": "1.1.0", "reason": "unhealthy: no reads",
                                        "at": iso(time.time())}})
        agent.publish(f"{base}/status", json.dumps({"state": "online", "at": time.time(), "ttl_s": 30,
                                                    "model_version": "1.0.0"}), qos=1, retain=True).wait_for_publish(5)
        source.start()
        assert wait_until(lambda: (state.line("line-1") or {}).get("sync", {}).get("heard"), 10)
        view = state.line("line-1")
        assert view["model"]["active"] == "1.0.0" and view["model"]["previous"] == "1.1.0"
        assert view["sync"]["problem"] == {"outcome": "rolled_back", "version": "1.1.0",
                                           "reason": "unhealthy: no reads"}
        assert abs(view["sync"]["at"] - time.time()) < 10
        # Live steps of the next pull and the agent's switch.
        reporter.event({"event": "check", "active": "1.0.0", "channel": "canary", "pin": None})
        reporter.event({"event": "activated", "version": "1.2.0", "previous": "1.0.0", "pruned": []})
        agent.publish(f"{base}/events/model", json.dumps({"from": "1.0.0", "to": "1.2.0", "bundle": "/m/1.2.0"}))
        assert wait_until(lambda: len(state.line("line-1")["sync_events"]) == 3, 10)
        view = state.line("line-1")
        events = [e["event"] for e in view["sync_events"]]  # newest first
        # Two clients publish: MQTT orders each one's messages, not the two against each other.
        assert sorted(events) == ["activated", "check", "switched"]
        assert events.index("activated") < events.index("check")
        assert view["model"]["channel"] == "canary" and view["model"]["canary"]
        assert view["model_version"] == "1.2.0"
        assert state.snapshot()["summary"]["ignored_messages"] == 0
    finally:
        reporter.close()
        agent.loop_stop()
        source.stop()


def test_edge_web_process_serves_stays_small_and_stops_on_sigterm(mqtt_broker, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "web.cli", "--broker", f"127.0.0.1:{mqtt_broker.port}",
                             "--site", SITE, "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        assert wait_for_port("127.0.0.1", port, 20, proc)
        for _ in range(20):
            assert get_json(f"http://127.0.0.1:{port}/api/site")[0] == 200
        rss_mb = _rss_mb(proc.pid)
        print(f"\nedge-web RSS after start and 20 requests: {rss_mb:.1f} MB")
        assert rss_mb < 120
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # Logs are JSON lines, like the agent's.
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert any("edge-web serving site" in line["msg"] for line in lines)
    assert not err.strip(), err


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_demo_run_starts_the_dashboard_prints_its_urls_and_ends_by_itself(tmp_path, mosquitto_executable):
    web_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "demo-run", "--workdir", str(tmp_path / "demo"),
                             "--items", "2", "--burst", "20", "--duration", "0", "--broker", "mosquitto",
                             "--web-port", str(web_port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    seen_by_dashboard = None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("3/5"):  # the agent is online: the page must know its line
                seen_by_dashboard = wait_until(
                    lambda: [l["line"] for l in get_json(f"http://127.0.0.1:{web_port}/api/site")[1]["lines"]], 10)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "\n".join(lines)
    assert proc.returncode == 0, output
    assert f"dashboard: http://127.0.0.1:{web_port}/" in output
    assert re.search(r"its metrics: http://127\.0\.0\.1:\d+/metrics", output)
    assert seen_by_dashboard == ["line-1"]
    assert "stopped cleanly" in lines[-1]
    # Only the demo's own lines (and the agent's JSON log records), no library noise.
    assert all(re.match(r"(\d/5 |   |\{\"ts\"|$)", line) for line in lines), output
    with pytest.raises(OSError):  # edge-web stopped with the demo
        urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=2)


def test_demo_run_options_are_checked():
    from edge_agent.cli import build_parser as agent_parser

    args = agent_parser().parse_args(["demo-run", "--duration", "90", "--web-port", "8081"])
    assert (args.duration, args.web_port) == (90.0, 8081)
    assert agent_parser().parse_args(["demo-run"]).duration is None  # until Ctrl-C
    for bad in (["--duration", "-1"], ["--duration", "soon"], ["--web-port", "0"], ["--web-port", "http"]):
        with pytest.raises(SystemExit):
            agent_parser().parse_args(["demo-run", *bad])
