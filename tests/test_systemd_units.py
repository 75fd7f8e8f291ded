"""The systemd units in systemd/: real `systemd-analyze verify` (no warnings at all) and
`systemd-analyze security --offline` (every unit at or under 3.0), on a staged root laid out
as the Ansible role installs it; and the hardening's one risky setting checked for real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

UNITS_DIR = ROOT / "systemd"
SERVICES = ["edge-agent@.service", "edge-web.service", "edge-sync.service"]
ALL_UNITS = SERVICES + ["edge-sync.timer"]
MAX_EXPOSURE = 3.0
SYSTEM_UNITS = Path("/lib/systemd/system")

analyze = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed (Debian package systemd)")


@pytest.fixture(scope="module")
def staged_root(tmp_path_factory) -> Path:
    """A root with systemd's own units (targets), our units, and the executables they name."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in ALL_UNITS:
        shutil.copy(UNITS_DIR / unit, unit_dir / unit)
    bin_dir = root / "opt/postcode-edge/current/bin"
    bin_dir.mkdir(parents=True)
    for tool in ("edge-agent", "edge-web", "edge-sync"):
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", "--recursive-errors=yes", f"--root={root}",
                           f"/etc/systemd/system/{unit}"], capture_output=True, text=True, timeout=60)


def test_every_unit_file_is_there():
    assert sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".timer")) == sorted(ALL_UNITS)


@pytest.mark.parametrize("unit", ["edge-agent@line-1.service", "edge-web.service", "edge-sync.service",
                                  "edge-sync.timer"])
def test_unit_verifies_without_a_single_warning(staged_root, unit):
    if "@" in unit:  # an instance of the template, as systemctl would start it
        template = unit.split("@")[0] + "@.service"
        link = staged_root / "etc/systemd/system" / unit
        if not link.exists():
            link.symlink_to(template)
    result = _verify(staged_root, unit)
    # `verify` exits 0 on a misspelt key, so its output must be empty as well.
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr


def test_verify_catches_a_misspelt_key_and_a_missing_executable(staged_root, tmp_path):
    """The check above can fail: a typo and a wrong path are both reported."""
    unit_dir = staged_root / "etc/systemd/system"
    broken = (UNITS_DIR / "edge-web.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
    (unit_dir / "broken-web.service").write_text(broken)
    result = _verify(staged_root, "broken-web.service")
    assert "Unknown key" in result.stderr
    moved = (UNITS_DIR / "edge-web.service").read_text().replace("current/bin/edge-web", "current/bin/nope")
    (unit_dir / "moved-web.service").write_text(moved)
    result = _verify(staged_root, "moved-web.service")
    assert result.returncode != 0 and "is not executable" in result.stderr


def _exposure(unit_path: Path) -> tuple[float, str]:
    result = subprocess.run([analyze, "security", "--offline=true", str(unit_path)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_at_most_3(unit):
    score, report = _exposure(UNITS_DIR / unit)
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, report


def test_only_the_agent_may_reach_a_camera():
    agent = (UNITS_DIR / "edge-agent@.service").read_text()
    assert "DeviceAllow=char-video4linux rw" in agent and "DevicePolicy=closed" in agent
    assert "SupplementaryGroups=video" in agent
    for unit in ("edge-web.service", "edge-sync.service"):
        text = (UNITS_DIR / unit).read_text()
        assert "PrivateDevices=yes" in text and "video" not in text


def test_agent_unit_is_a_notify_service_with_a_watchdog_and_restarts():
    text = (UNITS_DIR / "edge-agent@.service").read_text()
    for line in ("Type=notify", "Restart=always", "NotifyAccess=main"):
        assert line in text
    watchdog_s = int(re.search(r"^WatchdogSec=(\d+)$", text, re.M).group(1))
    restart_s = int(re.search(r"^RestartSec=(\d+)$", text, re.M).group(1))
    # The agent pings at half the watchdog period at most every 2 s; a restart must come quickly.
    assert 10 <= watchdog_s <= 60 and restart_s <= 5


MDWE_PROBE = """
import ctypes, mmap, sys
import numpy as np
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    print("no-mdwe"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not-enforced"); sys.exit(0)
except OSError:
    pass
from edge_agent.config import DEFAULT_BUNDLE
from edge_agent.loader import load_bundle
from edge_agent.demo import render_demo_camera
import cv2, tempfile, pathlib
model = load_bundle(DEFAULT_BUNDLE)
labels = model.classifier.classify(np.zeros((5, 28, 28), np.uint8)).labels
folder = render_demo_camera(pathlib.Path(tempfile.mkdtemp()) / "cam", 1, seed=3)
image = cv2.imread(str(sorted(folder.iterdir())[0]), cv2.IMREAD_GRAYSCALE)
import paho.mqtt.client, waitress, flask, cryptography.hazmat.primitives.asymmetric.ed25519
print("ok", len(labels), image.shape)
"""


def test_memory_deny_write_execute_does_not_break_litert_or_opencv():
    """The units set MemoryDenyWriteExecute=yes: the model, OpenCV and the libraries still work.

    The same kernel rule (PR_SET_MDWE) is applied to a child process, which then loads the int8
    bundle, classifies, decodes a frame and imports the MQTT, web and crypto libraries.
    """
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    if result.stdout.startswith(("no-mdwe", "not-enforced")):
        pytest.skip(f"this kernel cannot enforce MDWE per process ({result.stdout.strip()})")
    assert result.returncode == 0 and result.stdout.startswith("ok 5"), result.stdout + result.stderr
