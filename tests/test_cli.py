"""edge-agent run: --validate-config finds every problem run would meet; run never shows an operator a traceback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_agent.agent
from edge_agent.bundle import BundleError
from edge_agent.cli import build_parser
from edge_agent.cli import main as cli_main
from edge_agent.outbox import OutboxError
from tests.paths import SHIPPED_BUNDLE


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    """cmd_run sets the umask, the root logger and signal handlers for the whole process: put them back."""
    umask = os.umask(0o022)
    os.umask(umask)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        os.umask(umask)
        root.handlers[:] = handlers
        root.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)


@pytest.fixture
def fake_core(monkeypatch) -> dict:
    """run_agent replaced by a recorder; set ``raises`` to make it fail as the real one can."""
    seen: dict = {"calls": 0, "raises": None}

    def run_agent(config, stop, **options):
        seen["calls"] += 1
        seen["options"] = options
        umask = os.umask(0)
        os.umask(umask)
        seen["umask"] = umask
        if seen["raises"] is not None:
            raise seen["raises"]

    monkeypatch.setattr(edge_agent.agent, "run_agent", run_agent)
    return seen


def write_config(tmp_path: Path, text: str = "") -> Path:
    """A config whose state lives in tmp_path, plus ``text`` (more TOML)."""
    path = tmp_path / "agent.toml"
    path.write_text(f'[outbox]\npath = "state/outbox.sqlite"\n[review]\ncrops_dir = "state/review"\n{text}')
    return path


def copy_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    return bundle


# --- --validate-config --------------------------------------------------------------------------

def test_validate_config_cli(tmp_path, capsys):
    good = write_config(tmp_path, '[trigger]\nmode = "interval"\n')
    assert cli_main(["run", "--config", str(good), "--validate-config"]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('[trigger]\nmode = 3\n')
    assert cli_main(["run", "--config", str(bad), "--validate-config"]) == 2
    assert "config error: trigger.mode: expected str, got int 3" in capsys.readouterr().err


def test_validate_without_config_checks_the_defaults_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default state folders are relative: var/...
    assert cli_main(["run", "--validate-config"]) == 0
    assert capsys.readouterr().out == "built-in defaults: ok\n"
    assert list(tmp_path.iterdir()) == []


def test_validate_reports_every_problem_in_one_run(tmp_path, capsys):
    bundle = copy_bundle(tmp_path)
    with open(bundle / "model.tflite", "r+b") as model:  # one flipped byte deep in the weights
        model.seek(100_000)
        byte = model.read(1)
        model.seek(100_000)
        model.write(bytes([byte[0] ^ 0xFF]))
    (tmp_path / "data").write_text("a file where a folder should be")
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\nbundle = "{bundle}"\n[mqtt]\nport = 99999\nkeepalive_s = "30"\n'
                      '[outbox]\npath = "data/outbox.sqlite"\n[review]\ncrops_dir = "review"\n')
    assert cli_main(["run", "--config", str(config), "--validate-config"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("config error: ")]
    assert errors[:3] == [
        "config error: mqtt.keepalive_s: expected int, got str '30'",
        "config error: mqtt.port: must be between 1 and 65535, got 99999",
        f"config error: outbox.path: {tmp_path / 'data'} is a file, not a folder",
    ]
    assert errors[3].startswith("config error: model.bundle: ") and "tampered with" in errors[3]
    assert len(errors) == 4
    assert captured.out == "" and "Traceback" not in captured.err


def test_validate_builds_the_interpreter_as_run_does(tmp_path, capsys):
    # The sha256 matches, so only building the LiteRT interpreter can find this out.
    bundle = copy_bundle(tmp_path)
    garbage = b"not a flatbuffer" * 100
    (bundle / "model.tflite").write_bytes(garbage)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(garbage).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path, f'[model]\nbundle = "{bundle}"\n')
    assert cli_main(["run", "--config", str(config), "--validate-config"]) == 2
    err = capsys.readouterr().err
    assert "config error: model.bundle: " in err and "is not a loadable TFLite model" in err


def test_validate_refuses_a_looser_threshold_and_a_folder_as_outbox(tmp_path, capsys):
    (tmp_path / "state" / "outbox.sqlite").mkdir(parents=True)
    config = write_config(tmp_path, "[model]\nacceptance_threshold = 0.01\n")
    assert cli_main(["run", "--config", str(config), "--validate-config"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any(e.startswith("config error: model.acceptance_threshold: 0.01 is looser") for e in errors)
    assert any(e.startswith("config error: outbox.path: ") and "is a folder" in e for e in errors)


def test_validate_prints_security_warnings_but_passes(tmp_path, capsys):
    config = write_config(tmp_path, '[mqtt]\nhost = "broker.site.lan"\n')
    assert cli_main(["run", "--config", str(config), "--validate-config"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == ["mqtt.username", "mqtt.tls"]
    assert captured.out == f"{config}: ok\n"


# --- run ----------------------------------------------------------------------------------------

def test_start_fresh_flag_is_off_unless_given():
    assert build_parser().parse_args(["run"]).start_fresh is False
    assert build_parser().parse_args(["run", "--start-fresh"]).start_fresh is True


@pytest.mark.parametrize("argv, start_fresh", [([], False), (["--start-fresh"], True)])
def test_run_passes_start_fresh_to_the_agent(tmp_path, fake_core, argv, start_fresh):
    config = write_config(tmp_path)
    assert cli_main(["run", "--config", str(config), *argv]) == 0
    assert fake_core["options"] == {"start_fresh": start_fresh}


def test_run_makes_state_files_owner_only(tmp_path, fake_core):
    os.umask(0o022)
    assert cli_main(["run", "--config", str(write_config(tmp_path))]) == 0
    assert fake_core["umask"] == 0o077


def test_run_with_an_invalid_config_is_one_line_per_mistake(tmp_path, fake_core, capsys):
    config = write_config(tmp_path, "[mqtt]\nport = 99999\n")
    assert cli_main(["run", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "config error: mqtt.port: must be between 1 and 65535, got 99999\n"
    assert fake_core["calls"] == 0


def test_run_with_an_outbox_folder_that_cannot_be_created_stops_before_starting(tmp_path, fake_core, capsys):
    (tmp_path / "state").write_text("a file where the state folder should be")
    assert cli_main(["run", "--config", str(write_config(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"config error: outbox.path: {tmp_path / 'state'} is a file, not a folder",
        f"config error: review.crops_dir: cannot create {tmp_path / 'state' / 'review'}: "
        f"{tmp_path / 'state'} is a file, not a folder",
    ]
    assert "Traceback" not in captured.err + captured.out
    assert fake_core["calls"] == 0


@pytest.mark.parametrize("failure", [
    BundleError("model.tflite sha256 1234... does not match manifest abcd...; the model file is corrupt"),
    OutboxError("outbox database state/outbox.sqlite is corrupt or not an outbox (file is not a database)"),
    PermissionError(13, "Permission denied", "/var/lib/postcode-edge"),
    OSError(28, "No space left on device"),
], ids=["bad-bundle", "damaged-outbox", "permission", "disk-full"])
def test_run_turns_what_an_operator_can_fix_into_one_log_line(tmp_path, fake_core, capsys, failure):
    fake_core["raises"] = failure
    assert cli_main(["run", "--config", str(write_config(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    entries = [json.loads(line) for line in captured.out.splitlines()]
    assert [(e["level"], e["msg"]) for e in entries] == [("ERROR", f"cannot start: {failure}")]
    assert "exc" not in entries[0]


def test_run_keeps_the_traceback_of_a_bug(tmp_path, fake_core):
    fake_core["raises"] = KeyError("a programming error")
    with pytest.raises(KeyError):
        cli_main(["run", "--config", str(write_config(tmp_path))])


def test_run_with_a_damaged_outbox_is_one_line_with_the_real_agent(tmp_path, capsys):
    # The real core: the outbox is opened before any broker is needed.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "outbox.sqlite").write_bytes(b"this is not an SQLite database" * 200)
    assert cli_main(["run", "--config", str(write_config(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [e for e in map(json.loads, captured.out.splitlines()) if e["level"] == "ERROR"]
    assert len(errors) == 1 and errors[0]["msg"].startswith("cannot start: outbox database ")
