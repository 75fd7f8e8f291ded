"""The agent's typed config: defaults, one clear line per mistake, secrets from env or file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edge_agent.config import (AgentConfig, ConfigError, load_config, mqtt_password, parse_config,
                               security_warnings, state_path_errors)
from tests.paths import SHIPPED_BUNDLE

BUNDLE_THRESHOLD = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["acceptance_threshold"]


def config_errors(table: dict) -> list[str]:
    """The error lines of an invalid table (an empty list if it is valid)."""
    try:
        parse_config(table)
    except ConfigError as exc:
        return exc.errors
    return []


def test_empty_config_is_valid_with_defaults():
    config = parse_config({})
    assert config == AgentConfig()
    assert config.topic("result") == "postcode/site-1/line-1/result"
    assert config.client_id == "edge-site-1-line-1"
    assert config.reader.postcode_lengths == (5,)


def test_every_mistake_is_reported_with_its_location():
    with pytest.raises(ConfigError) as err:
        parse_config({
            "mqtt": {"port": "1883", "colour": "red", "protocol": "4"},
            "trigger": {"mode": "sometimes"},
            "reader": {"postcode_lengths": [5, "six"]},
            "camrea": {},
        })
    errors = err.value.errors
    assert "mqtt.port: expected int, got str '1883'" in errors
    assert any(e.startswith("mqtt.colour: unknown key") for e in errors)
    assert any(e.startswith("camrea: unknown key") for e in errors)
    assert "reader.postcode_lengths[1]: expected int, got str 'six'" in errors
    # Value checks run alongside the type checks, so one run shows every mistake.
    assert "mqtt.protocol: '4' is not one of auto, 5, 3.1.1" in errors
    assert "trigger.mode: 'sometimes' is not one of mqtt, interval, change" in errors
    assert len(errors) == 6


def test_value_checks():
    with pytest.raises(ConfigError) as err:
        parse_config({"trigger": {"mode": "sometimes", "interval_ms": 0},
                      "model": {"bundle": "/nonexistent", "acceptance_threshold": 1.5},
                      "reader": {"roi": [0, 0, -5, 10]},
                      "mqtt": {"cert_file": "/etc/hostname"}})
    errors = err.value.errors
    assert "trigger.mode: 'sometimes' is not one of mqtt, interval, change" in errors
    assert "trigger.interval_ms: must be positive, got 0" in errors
    assert "model.acceptance_threshold: must be in (0, 1]" in errors
    assert any(e.startswith("model.bundle: no model bundle at /nonexistent") for e in errors)
    assert any(e.startswith("reader.roi:") for e in errors)
    assert any(e.startswith("mqtt.cert_file and mqtt.key_file") for e in errors)


def test_unreachable_camera_is_not_a_config_error():
    config = parse_config({"camera": {"source": "/dev/video9"}})
    assert config.camera.source == "/dev/video9"


def test_relative_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[outbox]\npath = "state/outbox.sqlite"\n[site]\nsite_id = "leeds"\n')
    config = load_config(path)
    assert config.outbox.path == tmp_path / "state" / "outbox.sqlite"
    assert config.topic("trigger") == "postcode/leeds/line-1/trigger"


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml")


def test_password_from_file_or_environment(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert mqtt_password(parse_config({"mqtt": {"password_file": str(secret)}}).mqtt) == "s3cret"
    config = parse_config({"mqtt": {"password_env": "SITE_PW"}}).mqtt
    assert mqtt_password(config, {"SITE_PW": "from-env"}) == "from-env"
    assert mqtt_password(config, {}) is None


def test_shipped_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
    load_config(example)


# --- model.acceptance_threshold: a site may only be stricter than the bundle -------------------

def test_looser_acceptance_threshold_than_the_bundle_is_an_error_naming_both():
    errors = config_errors({"model": {"bundle": str(SHIPPED_BUNDLE), "acceptance_threshold": 0.01}})
    assert len(errors) == 1
    assert errors[0].startswith("model.acceptance_threshold: 0.01 is looser than the bundle's own ")
    assert str(BUNDLE_THRESHOLD) in errors[0]


def test_equal_or_stricter_acceptance_threshold_is_accepted():
    for threshold in (BUNDLE_THRESHOLD, 0.9999, 1.0):
        config = parse_config({"model": {"bundle": str(SHIPPED_BUNDLE), "acceptance_threshold": threshold}})
        assert config.model.acceptance_threshold == threshold


def test_unreadable_manifest_is_reported_when_a_threshold_is_set(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    (bundle / "manifest.json").write_text("{not json")
    errors = config_errors({"model": {"bundle": str(bundle), "acceptance_threshold": 0.999}})
    assert len(errors) == 1
    assert errors[0].startswith("model.acceptance_threshold: cannot compare 0.999 with the bundle's own")
    assert "not valid JSON" in errors[0]


# --- every mistake in one run -------------------------------------------------------------------

def test_type_and_value_mistakes_are_reported_together():
    errors = config_errors({
        "mqtt": {"port": 99999, "keepalive_s": "30"},
        "reader": {"postcode_lengths": [5, "six", 0], "roi": [0, "top", 10, 10]},
        "outbox": {"retention_days": -1},
    })
    assert sorted(errors) == sorted([
        "mqtt.keepalive_s: expected int, got str '30'",
        "mqtt.port: must be between 1 and 65535, got 99999",
        "reader.postcode_lengths[1]: expected int, got str 'six'",
        "reader.postcode_lengths: give one or more lengths between 1 and 12",
        "reader.roi[1]: expected int, got str 'top'",
        "outbox.retention_days: must not be negative, got -1",
    ])


def test_a_wrong_typed_value_is_not_blamed_again_through_its_default():
    # frame_wait_ms falls back to its default 500, which is above this budget: only the type is wrong.
    errors = config_errors({"camera": {"frame_wait_ms": "300"}, "trigger": {"decision_budget_ms": 400}})
    assert errors == ["camera.frame_wait_ms: expected int, got str '300'"]
    errors = config_errors({"model": {"bundle": 7, "acceptance_threshold": 0.5}})
    assert errors == ["model.bundle: expected a path string, got int"]


# --- value ranges -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value, line", [
    ("mqtt", "port", 99999, "mqtt.port: must be between 1 and 65535, got 99999"),
    ("mqtt", "port", 0, "mqtt.port: must be between 1 and 65535, got 0"),
    ("mqtt", "keepalive_s", 2, "mqtt.keepalive_s: must be between 5 and 65535, got 2"),
    ("mqtt", "session_expiry_s", 0, "mqtt.session_expiry_s: must be between 1 and 4294967295, got 0"),
    ("mqtt", "max_inflight", 70000, "mqtt.max_inflight: must be between 1 and 65535, got 70000"),
    ("camera", "fps", 0.0, "camera.fps: must be positive, got 0"),
    ("camera", "fps", 3000.0, "camera.fps: must be at most 1000, got 3000"),
    ("camera", "reopen_backoff_min_s", 0.0, "camera.reopen_backoff_min_s: must be positive, got 0"),
    ("trigger", "reconnect_guard_ms", -1, "trigger.reconnect_guard_ms: must not be negative, got -1"),
    ("trigger", "dedup_window_s", 0.0, "trigger.dedup_window_s: must be positive, got 0"),
    ("trigger", "settle_ms", -5, "trigger.settle_ms: must not be negative, got -5"),
    ("reader", "workers", 0, "reader.workers: must be between 1 and 16, got 0"),
    ("reader", "workers", 17, "reader.workers: must be between 1 and 16, got 17"),
    ("observability", "min_digit_height_px", -1.0, "observability.min_digit_height_px: must be between 0 and 1000, got -1"),
    ("model", "num_threads", 65, "model.num_threads: must be between 1 and 64, got 65"),
    ("outbox", "retention_days", -0.5, "outbox.retention_days: must not be negative, got -0.5"),
    ("outbox", "max_pending", 0, "outbox.max_pending: must be positive, got 0"),
])
def test_out_of_range_value_is_one_line_naming_the_key(section, key, value, line):
    assert config_errors({section: {key: value}}) == [line]


@pytest.mark.parametrize("section, key, value", [
    ("mqtt", "port", 65535), ("mqtt", "port", 1), ("mqtt", "keepalive_s", 5),
    ("reader", "workers", 16), ("model", "num_threads", 64), ("outbox", "retention_days", 0),
    ("trigger", "reconnect_guard_ms", 0), ("camera", "fps", 0.5),
])
def test_values_at_the_edge_of_their_range_are_valid(section, key, value):
    assert config_errors({section: {key: value}}) == []


def test_frame_wait_must_end_before_the_decision_budget():
    errors = config_errors({"camera": {"frame_wait_ms": 1500}, "trigger": {"decision_budget_ms": 1500}})
    assert len(errors) == 1
    assert errors[0].startswith("camera.frame_wait_ms: 1500 must be less than trigger.decision_budget_ms (1500)")
    assert config_errors({"camera": {"frame_wait_ms": 1499}, "trigger": {"decision_budget_ms": 1500}}) == []


@pytest.mark.parametrize("section, key, value", [
    ("mqtt", "response_topic_prefix", "sorter/+/replies"),
    ("mqtt", "response_topic_prefix", "sorter/#"),
    ("mqtt", "topic_prefix", "postcode/#"),
    ("site", "site_id", "+"),
    ("site", "line_id", "line/2"),
    ("site", "site_id", ""),
])
def test_topic_parts_cannot_hold_wildcards_or_extra_levels(section, key, value):
    errors = config_errors({section: {key: value}})
    assert len(errors) == 1 and errors[0].startswith(f"{section}.{key}: {value!r} must")


def test_empty_broker_host_is_an_error():
    assert config_errors({"mqtt": {"host": ""}}) == [
        "mqtt.host: must name the broker (a host name or an IP address)"]


# --- state folders ------------------------------------------------------------------------------

def state_config(outbox: Path, review: Path) -> AgentConfig:
    return parse_config({"outbox": {"path": str(outbox)}, "review": {"crops_dir": str(review)}})


def test_creatable_state_folders_pass_and_nothing_is_created(tmp_path):
    config = state_config(tmp_path / "a" / "b" / "outbox.sqlite", tmp_path / "c" / "review")
    assert state_path_errors(config) == []
    assert list(tmp_path.iterdir()) == []


def test_existing_state_folders_pass(tmp_path):
    (tmp_path / "review").mkdir()
    (tmp_path / "outbox.sqlite").write_bytes(b"")
    assert state_path_errors(state_config(tmp_path / "outbox.sqlite", tmp_path / "review")) == []


def test_outbox_path_that_is_a_folder_is_an_error(tmp_path):
    (tmp_path / "outbox").mkdir()
    errors = state_path_errors(state_config(tmp_path / "outbox", tmp_path / "review"))
    assert errors == [f"outbox.path: {tmp_path / 'outbox'} is a folder; give the path of the outbox file, "
                      f"e.g. {tmp_path / 'outbox' / 'outbox.sqlite'}"]


def test_state_folder_below_a_file_cannot_be_created(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    errors = state_path_errors(state_config(tmp_path / "data" / "state" / "outbox.sqlite",
                                            tmp_path / "data"))
    assert errors == [
        f"outbox.path: cannot create {tmp_path / 'data' / 'state'}: {tmp_path / 'data'} is a file, not a folder",
        f"review.crops_dir: {tmp_path / 'data'} is a file, not a folder",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder; run as the service user")
def test_state_folder_in_a_read_only_folder_cannot_be_created(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        errors = state_path_errors(state_config(locked / "state" / "outbox.sqlite", locked))
    finally:
        locked.chmod(0o700)
    assert len(errors) == 2
    assert errors[0].startswith(f"outbox.path: cannot create {locked / 'state'}: {locked} is not writable")
    assert errors[1].startswith(f"review.crops_dir: {locked} is not writable")


# --- security warnings --------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"])
def test_no_security_warning_for_a_broker_on_this_machine(host):
    assert security_warnings(parse_config({"mqtt": {"host": host}})) == []


def test_anonymous_plain_text_broker_on_the_network_warns_twice():
    warnings = security_warnings(parse_config({"mqtt": {"host": "broker.site.lan"}}))
    assert len(warnings) == 2
    assert warnings[0].startswith("mqtt.username: empty, so the agent connects to broker.site.lan anonymously")
    assert warnings[1].startswith("mqtt.tls: false, so triggers and results cross the network to broker.site.lan")


def test_authenticated_tls_broker_on_the_network_does_not_warn():
    config = parse_config({"mqtt": {"host": "10.0.0.5", "username": "agent", "tls": True}})
    assert security_warnings(config) == []
    plain = parse_config({"mqtt": {"host": "10.0.0.5", "username": "agent"}})
    assert security_warnings(plain) == [
        "mqtt.tls: false, so triggers, results and the password cross the network to 10.0.0.5 in plain text: "
        "set mqtt.tls = true (and mqtt.ca_file for the site's own CA)"]


def test_sort_plan_acceptance_and_spent_window_are_checked():
    assert parse_config({}).sort_plan.acceptance == "auto"
    for acceptance in ("spent", "per_item"):
        assert parse_config({"sort_plan": {"acceptance": acceptance}}).sort_plan.acceptance == acceptance
    errors = config_errors({"sort_plan": {"acceptance": "loose", "spent_window": 10}})
    assert any(e.startswith("sort_plan.acceptance:") and "spent" in e for e in errors), errors
    assert any(e.startswith("sort_plan.spent_window:") for e in errors), errors
