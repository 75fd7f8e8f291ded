"""The agent's typed config: defaults, one clear line per mistake, secrets from env or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main as cli_main
from edge_agent.config import AgentConfig, ConfigError, load_config, mqtt_password, parse_config


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
    assert len(errors) == 4  # value checks run once the types are right


def test_value_checks():
    with pytest.raises(ConfigError) as err:
        parse_config({"trigger": {"mode": "sometimes", "interval_ms": 0},
                      "model": {"bundle": "/nonexistent", "acceptance_threshold": 1.5},
                      "reader": {"roi": [0, 0, -5, 10]},
                      "mqtt": {"cert_file": "/etc/hostname"}})
    errors = err.value.errors
    assert "trigger.mode: 'sometimes' is not one of mqtt, interval, change" in errors
    assert "trigger.interval_ms: must be positive" in errors
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


def test_validate_config_cli(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[trigger]\nmode = "interval"\n')
    assert cli_main(["run", "--config", str(good), "--validate-config"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[trigger]\nmode = 3\n')
    assert cli_main(["run", "--config", str(bad), "--validate-config"]) == 2
    assert "config error: trigger.mode: expected str, got int 3" in capsys.readouterr().err


def test_shipped_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
    load_config(example)
