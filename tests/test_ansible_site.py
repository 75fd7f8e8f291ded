"""site.yml and rollback.yml for real: ansible-playbook against this machine, into a staged root.

One module-wide deployment (two lines, systemd not running) is made from a wheel built from a
copy of the repository; the later tests upgrade it to a second build, fail an upgrade on
purpose and roll back. Each playbook run is a real `ansible-playbook` subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.paths import ROOT

ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = BIN / "ansible-playbook"
LINT = BIN / "ansible-lint"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNITS = ["edge-agent@.service", "edge-web.service", "edge-sync.service", "edge-sync.timer"]
LINES = ["line-1", "line-2"]
SECOND_VERSION = "0.1.0+test2"
# What setup.py packages (the wheel is built from a copy holding only these).
BUILD_INPUTS = ["setup.py", "edge_agent", "training", "quantize", "sync", "web", "models/mnist-int8"]


def _skip_reason() -> str | None:
    if not PLAYBOOK.is_file():
        return f"ansible-playbook is not installed next to {sys.executable} (pip install -e '.[dev]')"
    if SYSTEMD_ANALYZE is None:
        return "systemd-analyze is not installed (Debian package systemd); the role verifies units with it"
    if os.geteuid() != 0:
        return "the roles create the postcode-edge user and chown files: run as root"
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()) or not shutil.which("mosquitto_passwd"):
        return "mosquitto is not installed (apt-get install mosquitto); site.yml sets up the site broker first"
    return None


SKIP_REASON = _skip_reason()
if SKIP_REASON:
    print(f"\ntest_ansible_site: skipped: {SKIP_REASON}", file=sys.stderr)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


@dataclass
class Run:
    """One ansible-playbook run: its exit status, output and PLAY RECAP counts."""

    returncode: int
    output: str

    @property
    def recap(self) -> dict[str, int]:
        match = re.search(r"^localhost\s+:\s+(.*)$", self.output, re.MULTILINE)
        assert match, f"no PLAY RECAP in:\n{self.tail}"
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}

    @property
    def tail(self) -> str:
        return self.output[-6000:]


def _ansible_env() -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_PIPELINING="1", ANSIBLE_RETRY_FILES_ENABLED="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_playbook(playbook: str, inventory: Path, *extra: str) -> Run:
    done = subprocess.run([str(PLAYBOOK), "-i", str(inventory), str(ANSIBLE_DIR / playbook), *extra],
                          cwd=ANSIBLE_DIR, env=_ansible_env(), capture_output=True, text=True, timeout=600)
    return Run(done.returncode, done.stdout + done.stderr)


def _venv_python() -> str:
    """A python3.11 that can make a virtualenv (with pip) for the release."""
    for candidate in ("/usr/bin/python3.11", str(Path(sys.base_prefix) / "bin" / "python3.11")):
        if Path(candidate).is_file() and subprocess.run([candidate, "-c", "import venv, ensurepip"],
                                                        capture_output=True).returncode == 0:
            return candidate
    pytest.skip("no python3.11 with the venv module and ensurepip (Debian: python3-venv)")


def _build_wheel(work: Path, out: Path, version: str | None = None) -> Path:
    """Build the wheel from a copy of the repository (with another version if given)."""
    source = work / "src"
    for name in BUILD_INPUTS:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    if version:
        setup = source / "setup.py"
        text, count = re.subn(r'version="[^"]*"', f'version="{version}"', setup.read_text())
        assert count == 1, "setup.py has no version= to change"
        setup.write_text(text)
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("postcode_edge-*.whl")
    return wheel


@dataclass
class Site:
    """The staged root, the inventory writer and the runs made so far."""

    base: Path
    root: Path
    wheel: Path
    version: str
    python: str
    first: Run | None = field(default=None)
    second: Run | None = field(default=None)

    def inventory(self, name: str, version: str, wheel: Path, **overrides) -> Path:
        host = {
            "ansible_connection": "local",
            # Debian's python3 starts modules about twice as fast as this virtualenv's.
            "ansible_python_interpreter": "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable,
            "ansible_become": False,
            "edge_root": str(self.root),
            "edge_systemd_running": False,
            "edge_site_id": "test-site",
            "edge_lines": [
                {"id": "line-1", "camera": "0", "agent_password": "line-1-secret", "sync_channel": "canary"},
                {"id": "line-2", "camera": "/dev/video2", "agent_password": "line-2-secret"},
            ],
            "postcode_edge_version": version,
            "postcode_edge_wheel": str(wheel),
            "postcode_edge_python": self.python,
            # The machine's pip configuration (its index and wheelhouse) is what the install uses;
            # no .pyc compiling saves a few seconds per release (in production they are wanted).
            "postcode_edge_pip_extra_args": "--no-compile",
            "mosquitto_install_package": False,
            "mosquitto_dashboard_password": "dashboard-secret",
            "sync_registry": "file:///srv/registry",
            "sync_public_keys": [{"name": "registry-test", "content": TEST_PUBLIC_KEY}],
            **overrides,
        }
        path = self.base / f"{name}.json"  # JSON is YAML: the yaml inventory plugin reads it
        path.write_text(json.dumps({"edge_sites": {"hosts": {"localhost": host}}}, indent=2))
        return path

    @property
    def opt(self) -> Path:
        return self.root / "opt/postcode-edge"

    @property
    def etc(self) -> Path:
        return self.root / "etc/postcode-edge"

    def release_of(self, link: str) -> str:
        return os.readlink(self.opt / link).removeprefix("releases/")


TEST_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA4Sq3MMm1WD6ckkSOutFSzNu+e1ivN43qKE8Ryh2L1lE=
-----END PUBLIC KEY-----
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """site.yml run twice on a fresh staged root."""
    base = tmp_path_factory.mktemp("ansible-site")
    wheel = _build_wheel(base / "build-1", base / "wheels-1")
    version = wheel.name.split("-")[1]
    root = base / "root"
    # A staged root must look like a system: systemd-analyze verify needs systemd's own units.
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    staged = Site(base, root, wheel, version, _venv_python())
    inventory = staged.inventory("first", version, wheel)
    staged.first = run_playbook("site.yml", inventory)
    assert staged.first.returncode == 0, staged.first.tail
    staged.second = run_playbook("site.yml", inventory)
    assert staged.second.returncode == 0, staged.second.tail
    return staged


@pytest.fixture(scope="module")
def second_wheel(site: Site) -> Path:
    """A second build, version SECOND_VERSION (one wheel: a version is never rebuilt)."""
    return _build_wheel(site.base / "build-2", site.base / "wheels-2", SECOND_VERSION)


def test_first_run_deploys_and_second_changes_nothing(site: Site):
    assert site.first.recap["failed"] == 0 and site.first.recap["changed"] > 0
    assert site.second.recap["changed"] == 0, site.second.tail
    assert site.second.recap["failed"] == 0
    assert site.release_of("current") == site.version
    assert (site.opt / "releases" / site.version / ".postcode-edge-installed").is_file()
    assert (site.opt / "wheels" / site.wheel.name).read_bytes() == site.wheel.read_bytes()
    assert "systemd is not PID 1 on localhost" in site.first.output


def test_release_reads_postcodes_from_its_own_virtualenv(site: Site, tmp_path: Path):
    agent = site.opt / "current/bin/edge-agent"
    frames = tmp_path / "frames"
    done = subprocess.run([str(agent), "demo", "--frames", "3", "--out", str(frames)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([str(agent), "predict", str(frames)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reads = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reads) == 3
    assert all(re.fullmatch(r"\d{5}", read["postcode"]) for read in reads), reads
    # It runs from the release's virtualenv, with the bundle shipped in the wheel.
    shebang = agent.read_text().splitlines()[0]
    assert shebang == f"#!{site.opt / 'releases' / site.version / 'bin' / 'python'}"
    assert (site.opt / "current/share/postcode-edge/models/mnist-int8/manifest.json").is_file()


def test_line_configs_have_every_setting_and_pass_the_release_validator(site: Site):
    for index, line in enumerate(LINES):
        path = site.etc / "lines" / f"{line}.toml"
        config = tomllib.loads(path.read_text())
        assert config["site"] == {"site_id": "test-site", "line_id": line}
        assert config["model"]["bundle"] == f"/var/lib/postcode-edge/{line}/models/active"
        assert config["mqtt"]["username"] == f"agent-{line}"
        assert config["mqtt"]["password_file"] == f"/etc/postcode-edge/secrets/{line}.mqtt"
        assert config["outbox"]["path"] == f"/var/lib/postcode-edge/{line}/outbox.sqlite"
        assert config["review"]["crops_dir"] == f"/var/lib/postcode-edge/{line}/review"
        assert config["http"]["port"] == 9400 + index
        assert config["sync"]["registry"] == "file:///srv/registry"
        assert config["sync"]["public_keys"] == ["/etc/postcode-edge/keys/registry-test.pub"]
        assert config["sync"]["channel"] == ("canary" if line == "line-1" else "stable")
        assert config["logging"]["json"] is True
        assert (site.etc / "secrets" / f"{line}.mqtt").read_text() == f"{line}-secret\n"
        # The release's own `edge-agent run --validate-config`, paths looked up under the root.
        done = subprocess.run([str(site.opt / "current/bin/python"),
                               str(site.root / "usr/local/lib/postcode-edge/check_line_config.py"),
                               "--root", str(site.root), str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ": ok" in done.stdout
    web_env = (site.etc / "web.env").read_text()
    assert ("EDGE_WEB_ARGS=--broker 127.0.0.1:1883 --site test-site --topic-prefix postcode --host 127.0.0.1 "
            "--port 8080 --username dashboard --password-file /etc/postcode-edge/secrets/web.mqtt") in web_env
    assert (site.etc / "keys/registry-test.pub").read_text() == TEST_PUBLIC_KEY


def test_files_have_their_owners_and_modes(site: Site):
    import grp

    group = grp.getgrnam("postcode-edge").gr_gid
    expected = {
        site.etc / "lines": 0o750, site.etc / "secrets": 0o750, site.etc / "lines/line-1.toml": 0o640,
        site.etc / "secrets/line-1.mqtt": 0o640, site.etc / "secrets/web.mqtt": 0o640,
        site.etc / "web.env": 0o640, site.etc / "keys/registry-test.pub": 0o644,
    }
    for path, mode in expected.items():
        stat = path.stat()
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o7777) == (0, group, mode), path


def test_units_are_installed_from_the_repository_and_verify(site: Site):
    for unit in UNITS:
        assert (site.root / "etc/systemd/system" / unit).read_bytes() == (ROOT / "systemd" / unit).read_bytes()
    assert ("systemd-analyze verify passed for edge-agent@line-1.service, edge-agent@line-2.service, "
            "edge-web.service, edge-sync.service, edge-sync.timer") in site.first.output
    schedule = (site.root / "etc/systemd/system/edge-sync.timer.d/schedule.conf").read_text()
    assert "OnUnitActiveSec=1h" in schedule and "RandomizedDelaySec=15min" in schedule
    for unit in ["edge-agent@line-1.service", "edge-web.service", "edge-sync.service", "edge-sync.timer"]:
        done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--recursive-errors=yes", f"--root={site.root}",
                               f"/etc/systemd/system/{unit}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{unit}: {done.stderr}"


def test_a_failed_upgrade_puts_back_what_ran_and_stops(site: Site, second_wheel: Path):
    before = {line: (site.etc / "lines" / f"{line}.toml").read_text() for line in LINES}
    wheel = second_wheel
    # line-1's new config is valid and written; line-2's has a key the agent does not know,
    # so the release's validator refuses it and the host goes back.
    lines = [
        {"id": "line-1", "camera": "1", "agent_password": "line-1-secret"},
        {"id": "line-2", "camera": "/dev/video2", "agent_password": "line-2-secret",
         "settings": {"reader": {"no_such_key": 1}}},
    ]
    run = run_playbook("site.yml", site.inventory("broken", SECOND_VERSION, wheel, edge_lines=lines))
    assert run.returncode != 0
    assert run.recap["rescued"] == 1 and run.recap["failed"] == 1, run.tail
    assert "reader.no_such_key" in run.output
    assert f"Rollout of {SECOND_VERSION} failed on localhost" in run.output
    assert site.release_of("current") == site.version
    after = {line: (site.etc / "lines" / f"{line}.toml").read_text() for line in LINES}
    assert after == before


def test_upgrade_then_rollback(site: Site, second_wheel: Path):
    wheel = second_wheel
    v1_config = (site.etc / "lines/line-1.toml").read_text()
    lines = [
        {"id": "line-1", "camera": "1", "agent_password": "line-1-secret"},
        {"id": "line-2", "camera": "/dev/video2", "agent_password": "line-2-secret"},
    ]
    upgrade = run_playbook("site.yml", site.inventory("upgrade", SECOND_VERSION, wheel, edge_lines=lines))
    assert upgrade.returncode == 0, upgrade.tail
    assert site.release_of("current") == SECOND_VERSION
    assert site.release_of("previous") == site.version
    assert tomllib.loads((site.etc / "lines/line-1.toml").read_text())["camera"]["source"] == "1"
    done = subprocess.run([str(site.opt / "current/bin/python"), "-c",
                           "import importlib.metadata as m; print(m.version('postcode-edge'))"],
                          capture_output=True, text=True, timeout=60, cwd=site.base)  # not the repo's egg-info
    assert done.stdout.strip() == SECOND_VERSION

    inventory = site.inventory("rollback", SECOND_VERSION, wheel, edge_lines=lines)
    back = run_playbook("rollback.yml", inventory)
    assert back.returncode == 0, back.tail
    assert site.release_of("current") == site.version
    assert (site.etc / "lines/line-1.toml").read_text() == v1_config
    again = run_playbook("rollback.yml", inventory)
    assert again.returncode == 0, again.tail
    assert again.recap["changed"] == 0, again.tail
    assert site.release_of("current") == site.version


def test_playbooks_pass_the_syntax_check_with_the_example_inventory():
    done = subprocess.run([str(PLAYBOOK), "--syntax-check", "-i", "inventory/example/hosts.yml",
                           "site.yml", "rollback.yml"], cwd=ANSIBLE_DIR, env=_ansible_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_lint_production_profile_passes():
    if not LINT.is_file():
        pytest.skip(f"ansible-lint is not installed next to {sys.executable}")
    done = subprocess.run([str(LINT), "--offline", "--profile", "production", "--nocolor"], cwd=ANSIBLE_DIR,
                          env=_ansible_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
