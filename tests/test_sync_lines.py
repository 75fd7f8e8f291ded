"""edge-sync driven by the agents' own line configs: `pull --config DIR`, `adopt`, a canary line.

Real files, a real HTTP registry on loopback, the real `edge-sync` command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_config
from sync.registry import publish
from sync.selftest import add_selftest
from tests.paths import ROOT, SHIPPED_BUNDLE
from tests.test_sync import DEMO_DIGITS, Keys, RegistryServer, bundle_version


def edge_sync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sync.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def line_config(folder: Path, line: str, registry: str = "", keys: list[Path] = (), channel: str = "stable",
                **extra: str) -> Path:
    models = folder / "state" / line / "models"
    lines = [
        "[site]", 'site_id = "site-9"', f'line_id = "{line}"',
        "[model]", f'bundle = "{models / "active"}"',
        "[outbox]", f'path = "{folder / "state" / line / "outbox.sqlite"}"',
        "[sync]", f'registry = "{registry}"', f"public_keys = {json.dumps([str(k) for k in keys])}",
        f'channel = "{channel}"', *(f"{key} = {value}" for key, value in extra.items()),
    ]
    path = folder / "lines" / f"{line}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def active_version(config: Path) -> str | None:
    link = load_config_lenient(config).model.bundle
    return Path(os.readlink(link)).name if link.is_symlink() else None


def load_config_lenient(config: Path):
    from sync.lines import load_line

    return load_line(config)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return Keys(root, "a"), Keys(root, "b")


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """1.0.0 (the shipped bundle with its self-test), 1.1.0 and 1.2.0 (same model, newer versions)."""
    root = tmp_path_factory.mktemp("versions")
    base = root / "1.0.0"
    shutil.copytree(SHIPPED_BUNDLE, base)
    add_selftest(base, DEMO_DIGITS)
    return {"1.0.0": base, "1.1.0": bundle_version(base, root / "1.1.0", "1.1.0"),
            "1.2.0": bundle_version(base, root / "1.2.0", "1.2.0")}


def test_the_shipped_bundle_carries_a_self_test_that_passes():
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    assert manifest["selftest"]["n"] >= 200 and manifest["selftest"]["accuracy"] >= 0.98
    assert (SHIPPED_BUNDLE / manifest["selftest"]["file"]).is_file()


def test_adopt_installs_the_shipped_bundle_once_and_never_replaces_a_synced_one(tmp_path):
    config = line_config(tmp_path, "line-1")
    assert active_version(config) is None
    first = edge_sync("adopt", "--config", str(config.parent))
    assert first.returncode == 0, first.stderr
    shipped = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["version"]
    assert "adopted" in first.stdout and active_version(config) == shipped
    # Now the agent's config is complete: its bundle exists.
    assert load_config(config).model.bundle.resolve().name == shipped
    again = edge_sync("adopt", "--config", str(config))
    assert again.returncode == 0 and "already active" in again.stdout
    status = json.loads(edge_sync("status", "--models-dir", str(config.parent.parent / "state/line-1/models")).stdout)
    assert status["active"] == shipped and status["high_water"] == shipped
    assert status["last_result"]["outcome"] == "adopted"


def test_adopt_refuses_a_broken_bundle_and_activates_nothing(tmp_path, versions):
    broken = tmp_path / "broken"
    shutil.copytree(versions["1.0.0"], broken)
    (broken / "model.tflite").write_bytes(b"not a model")
    config = line_config(tmp_path, "line-1")
    result = edge_sync("adopt", str(broken), "--config", str(config))
    assert result.returncode == 1 and result.stderr.startswith("refused: ")
    assert active_version(config) is None


def test_pull_from_line_configs_gives_the_canary_line_the_canary_version(tmp_path, keys, versions):
    """Two lines of one site: line-1 is the canary. One `pull --config DIR` serves both."""
    with RegistryServer(tmp_path / "registry") as server:
        server.root.mkdir()
        publish(versions["1.1.0"], server.root, "stable", keys[0].private)
        publish(versions["1.2.0"], server.root, "canary", keys[0].private)
        key = [keys[0].public_path]
        canary = line_config(tmp_path, "line-1", server.url, key, channel="canary", health_timeout_s=5)
        stable = line_config(tmp_path, "line-2", server.url, key, channel="stable", health_timeout_s=5)
        line_config(tmp_path, "line-3")  # does not sync: skipped, not an error
        result = edge_sync("pull", "--config", str(canary.parent))
        assert result.returncode == 0, result.stdout + result.stderr
        assert active_version(canary) == "1.2.0"
        assert active_version(stable) == "1.1.0"
        assert "site-9/line-1: updated: 1.2.0" in result.stdout
        assert "site-9/line-2: updated: 1.1.0" in result.stdout
        # Promote 1.2.0 to stable: the second line follows, the canary is up to date.
        publish(versions["1.2.0"], server.root, "stable", keys[0].private)
        result = edge_sync("pull", "--config", str(canary.parent))
        assert result.returncode == 0, result.stderr
        assert active_version(stable) == "1.2.0"
        assert "site-9/line-1: up_to_date: 1.2.0" in result.stdout


def test_a_line_whose_key_does_not_match_is_refused_and_the_other_still_updates(tmp_path, keys, versions):
    with RegistryServer(tmp_path / "registry") as server:
        server.root.mkdir()
        publish(versions["1.1.0"], server.root, "stable", keys[0].private)
        good = line_config(tmp_path, "line-1", server.url, [keys[0].public_path])
        wrong = line_config(tmp_path, "line-2", server.url, [keys[1].public_path])
        result = edge_sync("pull", "--config", str(good.parent))
        assert result.returncode == 1
        assert active_version(good) == "1.1.0" and active_version(wrong) is None
        refusal = [line for line in result.stderr.splitlines() if line.startswith("site-9/line-2: refused: ")]
        assert len(refusal) == 1 and "signature" in refusal[0]


def test_a_config_mistake_is_one_clear_line(tmp_path):
    config = line_config(tmp_path, "line-1", "ftp://models.example.org", [tmp_path / "missing.pub"])
    result = edge_sync("pull", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("refused: ")
    assert "sync.registry" in result.stderr and "sync.public_keys" in result.stderr


def test_pull_without_config_or_flags_names_what_is_missing():
    result = edge_sync("pull")
    assert result.returncode == 1 and "--config" in result.stderr and "--registry" in result.stderr
