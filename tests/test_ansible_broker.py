"""The Ansible role `mosquitto` (ansible/roles/mosquitto), run for real and its broker tested for real.

One module-wide site: a "central" mosquitto first (it needs a port before the role can
point a bridge at it), then `ansible-playbook` applies the role twice to localhost with
`edge_root` in a scratch folder (the second run must change nothing), then the broker is
started from the generated mosquitto.conf exactly as systemd would (`mosquitto -c`; as
root it drops to the `mosquitto` user and must read its files through the group). MQTT
clients (paho, MQTT v5 so a refused publish comes back as PUBACK reason 0x87) then
check logins, every user's ACL, the bridge (also while the central broker is down) and,
last, the pre-start check against corrupted persistence files, run as the generated
systemd drop-in would run it.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import pwd
import queue
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.broker import MosquittoBroker, find_mosquitto, free_port, wait_for_port
from tests.paths import ROOT

paho = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

ROLE = ROOT / "ansible" / "roles" / "mosquitto"
VENV_BIN = Path(sys.executable).parent
SITE = "site-t"
PREFIX = "postcode"
NOT_AUTHORIZED = 0x87
PASSWORDS = {
    "agent-line-1": "agent-1-secret", "plc-line-1": "plc-1-secret",
    "agent-line-2": "agent-2-secret", "plc-line-2": "plc-2-secret",
    "dashboard": "dash-secret", "audit": "audit-secret",
}
BRIDGE_USER, BRIDGE_PASSWORD = "bridge-site-t", "bridge-secret"


def _tool(name: str) -> str | None:
    """An Ansible tool next to this interpreter (the test venv), else on PATH."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


MOSQUITTO = find_mosquitto()
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
ANSIBLE_PLAYBOOK = _tool("ansible-playbook")
ANSIBLE_LINT = _tool("ansible-lint")

_missing = [what for what, path in (("mosquitto (apt-get install mosquitto)", MOSQUITTO),
                                    ("mosquitto_passwd (apt-get install mosquitto)", MOSQUITTO_PASSWD),
                                    ("ansible-playbook (pip install -e '.[dev]')", ANSIBLE_PLAYBOOK))
            if path is None]
SKIP_REASON = f"needs {', '.join(_missing)}" if _missing else ""
if _missing:
    print(f"test_ansible_broker: the role and broker tests are skipped: {SKIP_REASON}")

RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def topic(line: str, kind: str) -> str:
    return f"{PREFIX}/{SITE}/{line}/{kind}"


# --------------------------------------------------------------------------- MQTT client
class Client:
    """A paho client driven synchronously: connect, publish (-> PUBACK reason), subscribe (-> SUBACK reasons)."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None, *,
                 client_id: str | None = None, v5: bool = True, clean: bool = True,
                 tls_ca: Path | None = None) -> None:
        self.port = port
        self.tls = tls_ca is not None
        self.v5 = v5
        self.clean = clean
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:8]}"
        self._c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                              protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                              **({} if v5 else {"clean_session": clean}))
        if username is not None:
            self._c.username_pw_set(username, password)
        if tls_ca is not None:
            self._c.tls_set(ca_certs=str(tls_ca))
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: int | None = None
        self._connack = threading.Event()
        self._acks: dict[int, object] = {}
        self._acked = threading.Condition()
        self._c.on_connect = self._on_connect
        self.seen: list[str] = []  # every topic a message came in on, in order
        self._c.on_message = self._on_message
        self._c.on_publish = lambda c, u, mid, rc, props: self._ack(mid, rc)
        self._c.on_subscribe = lambda c, u, mid, rcs, props: self._ack(mid, rcs)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code.value
        self._connack.set()

    def _on_message(self, client, userdata, message) -> None:
        self.seen.append(message.topic)
        self.messages.put((message.topic, bytes(message.payload), bool(message.retain)))

    def _ack(self, mid: int, value: object) -> None:
        with self._acked:
            self._acks[mid] = value
            self._acked.notify_all()

    def _wait_ack(self, mid: int, timeout_s: float) -> object:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, timeout_s), f"no ack for mid {mid}"
            return self._acks.pop(mid)

    def connect(self, timeout_s: float = 5.0) -> int:
        """The CONNACK reason code (0: accepted); a refused client is stopped, not left retrying."""
        kwargs = {"clean_start": self.clean} if self.v5 else {}
        if self.v5 and not self.clean:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs["properties"] = props
        self._c.connect("localhost" if self.tls else "127.0.0.1", self.port, keepalive=30, **kwargs)
        self._c.loop_start()
        assert self._connack.wait(timeout_s), "no CONNACK"
        if self.connack:
            self.close()
        return int(self.connack)

    def publish(self, topic_name: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                timeout_s: float = 5.0) -> int:
        """The PUBACK reason code of a QoS 1 publish (0: accepted, 0x87: not authorized)."""
        info = self._c.publish(topic_name, payload, qos=qos, retain=retain)
        value = self._wait_ack(info.mid, timeout_s)
        return int(getattr(value, "value", 0))

    def subscribe(self, *filters: str, qos: int = 1, timeout_s: float = 5.0) -> list[int]:
        """SUBACK reason codes, one per filter (0/1/2: granted QoS, 0x80 and up: refused)."""
        result, mid = self._c.subscribe([(f, qos) for f in filters])
        assert result == paho.MQTT_ERR_SUCCESS
        return [int(rc.value) for rc in self._wait_ack(mid, timeout_s)]

    def expect(self, topic_name: str, timeout_s: float = 5.0, payload: bytes | None = None) -> bytes | None:
        """The payload of the next message on ``topic_name`` (and with ``payload``, if given)
        within the timeout, else None; other messages are passed over."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                got_topic, got, _retain = self.messages.get(timeout=left)
            except queue.Empty:
                return None
            if got_topic == topic_name and payload in (None, got):
                return got
        return None

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def clients() -> Iterator:
    """Make clients with ``clients(port, user, password, ...)``; all are closed afterwards."""
    made: list[Client] = []

    def make(port: int, username: str | None = None, password: str | None = None, **kwargs) -> Client:
        client = Client(port, username, password, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def login(make, port: int, user: str, **kwargs) -> Client:
    client = make(port, user, PASSWORDS[user], **kwargs)
    assert client.connect() == 0, f"{user} could not log in"
    return client


# --------------------------------------------------------------------------- the site
@dataclass
class SiteBroker:
    """The broker as the role configured it, started like systemd would (mosquitto -c mosquitto.conf)."""

    conf: Path
    port: int
    log: Path
    dropin: Path
    tls_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        if not all(wait_for_port("127.0.0.1", port, timeout_s, self.proc) for port in ports):
            output = self.stop()
            raise AssertionError(f"the site broker did not start: {output}\nlog:\n{self.log_text()}")

    def start_fails(self, timeout_s: float = 10.0) -> str:
        """Start, expecting mosquitto to exit by itself; its output."""
        proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("mosquitto kept running") from None
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        proc.stdout.close()
        return out + self.log_text()

    def stop(self) -> str:
        """Clean stop (SIGTERM: the database is saved); mosquitto's own output."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def pre_start_check(self) -> subprocess.CompletedProcess[str]:
        """Run the drop-in's ExecStartPre= exactly as written there (without systemd's '-' prefix)."""
        lines = [line for line in self.dropin.read_text().splitlines() if line.startswith("ExecStartPre=")]
        assert len(lines) == 1, self.dropin.read_text()
        command = lines[0].removeprefix("ExecStartPre=").lstrip("-")
        return subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)


@dataclass
class Site:
    root: Path
    work: Path
    playbook: Path
    env: dict[str, str]
    runs: list[subprocess.CompletedProcess[str]]
    broker: SiteBroker
    central: MosquittoBroker
    persistence: Path
    owners: dict[str, str] = field(default_factory=dict)
    tls_ca: Path | None = None


def _ownership() -> dict[str, str]:
    """Who owns what: the role's defaults as root (if the mosquitto user exists), else the test's user."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
            grp.getgrnam("mosquitto")
            return {"mosquitto_user": "mosquitto", "mosquitto_group": "mosquitto", "mosquitto_config_owner": "root"}
        except KeyError:
            pass
    me = getpass.getuser()
    return {"mosquitto_user": me, "mosquitto_group": grp.getgrgid(os.getgid()).gr_name,
            "mosquitto_config_owner": me}


def _certificates(folder: Path, owners: dict[str, str]) -> tuple[Path, Path, Path] | None:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1, or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    folder.mkdir(mode=0o755)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=Test site CA",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
                 ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", ext]):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    # As on site: the key readable by the broker's group only.
    os.chown(key, pwd.getpwnam(owners["mosquitto_config_owner"]).pw_uid, grp.getgrnam(owners["mosquitto_group"]).gr_gid)
    key.chmod(0o640)
    return ca, cert, key


def _role_vars(root: Path, port: int, central_port: int, owners: dict[str, str],
               tls: tuple[Path, Path, Path] | None) -> dict:
    tls_vars = {} if tls is None else {
        "mosquitto_tls_port": free_port(), "mosquitto_tls_address": "127.0.0.1", "mosquitto_tls_cafile": str(tls[0]),
        "mosquitto_tls_certfile": str(tls[1]), "mosquitto_tls_keyfile": str(tls[2])}
    return {
        **tls_vars,
        "edge_root": str(root),
        "edge_systemd_running": False,
        "ansible_python_interpreter": sys.executable,
        "mosquitto_install_package": True,  # installed already: the apt task is skipped, no network needed
        "mosquitto_install_clients": shutil.which("mosquitto_pub") is not None,
        "mosquitto_binary": MOSQUITTO,
        "mosquitto_passwd_binary": MOSQUITTO_PASSWD,
        "mosquitto_python": sys.executable,
        **owners,
        "mosquitto_site_id": SITE,
        "mosquitto_listener_port": port,
        "mosquitto_listener_address": "127.0.0.1",
        "mosquitto_lines": [
            {"id": "line-1", "agent_password": PASSWORDS["agent-line-1"], "plc_password": PASSWORDS["plc-line-1"]},
            {"id": "line-2", "agent_password": PASSWORDS["agent-line-2"], "plc_password": PASSWORDS["plc-line-2"],
             "response_topic_prefix": "replies/line-2"},
        ],
        "mosquitto_dashboard_password": PASSWORDS["dashboard"],
        "mosquitto_extra_users": [{"name": "audit", "password": PASSWORDS["audit"],
                                   "read": [f"{PREFIX}/{SITE}/+/result"]}],
        "mosquitto_bridge": {"address": "127.0.0.1", "port": central_port, "remote_username": BRIDGE_USER,
                             "remote_password": BRIDGE_PASSWORD, "restart_timeout": "1 2",
                             "keepalive_interval": 5},
    }


def _playbook(path: Path, role_vars: dict, gather_facts: bool = True) -> None:
    # Facts on, as site.yml has them, but only the one the role reads: the full set takes
    # ~15 s in a container.
    play = [{"name": "Site broker under test", "hosts": "localhost", "connection": "local",
             "gather_facts": gather_facts, "gather_subset": ["!all", "!min", "service_mgr"],
             "vars": role_vars, "roles": [{"role": str(ROLE)}]}]
    path.write_text(json.dumps(play, indent=2) + "\n")  # JSON is YAML


def _run_playbook(site_work: Path, playbook: Path, env: dict[str, str], *extra: str
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ANSIBLE_PLAYBOOK, "-i", "localhost,", str(playbook), *extra], cwd=site_work, env=env,
                          capture_output=True, text=True, timeout=180)


def _recap(run: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = RECAP.search(run.stdout)
    assert match, f"no PLAY RECAP:\n{run.stdout}\n{run.stderr}"
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups())))


def _ansible_env(work: Path) -> dict[str, str]:
    """Ansible writes its temp files, caches and settings into the scratch folder only."""
    cfg = work / "ansible.cfg"
    cfg.write_text("[defaults]\nretry_files_enabled = False\nnocolor = True\n"
                   f"interpreter_python = {sys.executable}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOME=str(work / "ansible-home"),
               ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"), ANSIBLE_REMOTE_TEMP=str(work / "ansible-tmp"),
               XDG_CACHE_HOME=str(work / "cache"), ANSIBLE_NOCOLOR="1", NO_COLOR="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def lint_run() -> Iterator[subprocess.Popen[str] | None]:
    """ansible-lint started early, in the background: it takes seconds and needs nothing else."""
    if ANSIBLE_LINT is None or SKIP_REASON:
        yield None
        return
    cache = Path(tempfile.mkdtemp(prefix="postcode-lint-"))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "ANSIBLE_HOME": str(cache / "ansible"), "NO_COLOR": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # From ansible/, so the project's ansible/.ansible-lint applies too (where it exists).
    proc = subprocess.Popen([ANSIBLE_LINT, "--offline", "--profile", "production", "--nocolor",
                             str(ROLE.relative_to(ROOT / "ansible"))], cwd=ROOT / "ansible", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def site(lint_run) -> Iterator[Site]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    # Not pytest's tmp_path: its folders are 0700, and the broker, dropped to the mosquitto
    # user, must reach its files as it would under / (0755 folders, 0640 files by group).
    work = Path(tempfile.mkdtemp(prefix="postcode-broker-"))
    work.chmod(0o755)
    root = work / "root"
    root.mkdir(mode=0o755)
    central_pw = work / "central.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(central_pw), BRIDGE_USER, BRIDGE_PASSWORD], check=True,
                   capture_output=True)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(central_pw), "operator", "operator-secret"], check=True,
                   capture_output=True)
    central = MosquittoBroker(work / "central", MOSQUITTO, persistence=True,
                              extra_config=["allow_anonymous false", f"password_file {central_pw}"])
    broker = None
    try:
        central.start()
        owners = _ownership()
        port = free_port()
        tls = _certificates(work / "certs", owners)
        playbook = work / "site.yml"
        role_vars = _role_vars(root, port, central.port, owners, tls)
        _playbook(playbook, role_vars)
        env = _ansible_env(work)
        runs = []
        for _ in range(2):
            runs.append(_run_playbook(work, playbook, env))
            assert runs[-1].returncode == 0, f"ansible-playbook failed:\n{runs[-1].stdout}\n{runs[-1].stderr}"
        broker = SiteBroker(conf=root / "etc/mosquitto/mosquitto.conf", port=port,
                            log=root / "var/log/mosquitto/mosquitto.log",
                            dropin=root / "etc/systemd/system/mosquitto.service.d/postcode-edge.conf",
                            tls_port=role_vars.get("mosquitto_tls_port"))
        broker.start()
        yield Site(root=root, work=work, playbook=playbook, env=env, runs=runs, broker=broker, central=central,
                   persistence=root / "var/lib/mosquitto/mosquitto.db", owners=owners,
                   tls_ca=tls[0] if tls else None)
    finally:
        if broker is not None:
            broker.stop()
        central.kill()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the role itself
def test_role_applies_and_a_second_run_changes_nothing(site):
    first, second = (_recap(run) for run in site.runs)
    print(f"first run {first}, second run {second}")
    assert first["failed"] == 0 and first["changed"] > 0
    assert second == {**second, "changed": 0, "failed": 0, "unreachable": 0}, site.runs[1].stdout
    # mosquitto is installed, so the package task is skipped: no apt run, no network, no "changed".
    package_task = site.runs[1].stdout.split("Install the broker packages]", 1)[1].split("TASK [", 1)[0]
    assert "skipping: [localhost]" in package_task, package_task


def test_readme_documents_every_default():
    defaults = re.findall(r"^([a-z_]+):", (ROLE / "defaults/main.yml").read_text(), re.M)
    readme = (ROLE / "README.md").read_text()
    assert len(defaults) > 30
    assert [name for name in defaults if f"`{name}`" not in readme] == []
    assert all(name.startswith("mosquitto_") or name.startswith("edge_") for name in defaults)


def test_bad_variables_stop_the_role_before_it_writes_anything(site):
    bad_root = site.work / "bad-root"
    bad_root.mkdir()
    bad_vars = {**json.loads(site.playbook.read_text())[0]["vars"], "edge_root": str(bad_root),
                "mosquitto_lines": [{"id": "line/1", "agent_password": "x"}]}
    playbook = site.work / "bad.yml"
    _playbook(playbook, bad_vars, gather_facts=False)
    run = _run_playbook(site.work, playbook, site.env)
    assert run.returncode != 0 and _recap(run)["failed"] == 1
    assert "one topic level" in run.stdout, run.stdout
    assert list(bad_root.iterdir()) == []


def test_playbook_syntax_check(site):
    run = _run_playbook(site.work, site.playbook, site.env, "--syntax-check")
    assert run.returncode == 0, run.stdout + run.stderr


def test_ansible_lint_production_profile(lint_run):
    if lint_run is None:
        pytest.skip(SKIP_REASON or "ansible-lint is not installed next to this Python (pip install -e '.[dev]')")
    output, _ = lint_run.communicate(timeout=120)
    print(output[-2000:])
    assert lint_run.returncode == 0, output


def test_generated_files_are_private_and_hold_no_plaintext_password(site):
    etc = site.root / "etc/mosquitto"
    owner, group = site.owners["mosquitto_config_owner"], site.owners["mosquitto_group"]
    for name in ("postcode-edge.passwd", "postcode-edge.acl", "conf.d/postcode-edge.conf"):
        st = (etc / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, name
        assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == (owner, group), name
    data = site.persistence.parent.stat()
    assert pwd.getpwuid(data.st_uid).pw_name == site.owners["mosquitto_user"]
    passwd = (etc / "postcode-edge.passwd").read_text()
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == sorted(PASSWORDS)
    assert all(secret not in passwd for secret in PASSWORDS.values())
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())
    conf = (etc / "conf.d/postcode-edge.conf").read_text()
    assert "allow_anonymous false" in conf and "autosave_interval 10" in conf
    assert "cleansession false" in conf and f"remote_clientid bridge-{SITE}" in conf
    assert "include_dir " + str(etc / "conf.d") in (etc / "mosquitto.conf").read_text()
    assert "ExecStartPre=-" in site.broker.dropin.read_text()


def test_password_file_is_rewritten_only_when_a_password_changes(site, clients):
    """Idempotence is not blindness: the role's helper (run as its task runs it) rewrites the file
    for one changed password, only that entry changes, and the broker takes it on reload (SIGHUP,
    the role's "Reload mosquitto" handler)."""
    passwd = site.root / "etc/mosquitto/postcode-edge.passwd"
    helper = site.root / "usr/local/lib/postcode-edge/mosquitto/passwd_sync.py"
    owners = site.owners

    def sync(users: dict[str, str]) -> dict:
        run = subprocess.run([sys.executable, str(helper), f"--file={passwd}",
                              f"--owner={owners['mosquitto_config_owner']}", f"--group={owners['mosquitto_group']}",
                              "--mode=0640", f"--mosquitto-passwd={MOSQUITTO_PASSWD}"],
                             input=json.dumps({"users": users}), capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stdout + run.stderr
        return json.loads(run.stdout)

    before = passwd.read_text()
    assert sync(PASSWORDS)["changed"] is False and passwd.read_text() == before
    rotated = {**PASSWORDS, "plc-line-2": "plc-2-rotated"}
    try:
        report = sync(rotated)
        assert report == {"changed": True, "failed": False, "msg": "new password: plc-line-2"}
        old = dict(line.split(":", 1) for line in before.splitlines())
        new = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
        assert [user for user in new if new[user] != old[user]] == ["plc-line-2"]  # the others keep their hash
        assert sync(rotated)["changed"] is False
        site.broker.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert clients(site.broker.port, "plc-line-2", "plc-2-rotated").connect() == 0
        assert clients(site.broker.port, "plc-line-2", PASSWORDS["plc-line-2"]).connect() != 0
    finally:
        sync(PASSWORDS)
        site.broker.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)


# --------------------------------------------------------------------------- logins and ACL
def test_anonymous_and_wrong_password_are_refused(site, clients):
    port = site.broker.port
    assert clients(port).connect() in (0x86, 0x87)  # v5: bad user name or password / not authorized
    assert clients(port, "agent-line-1", "wrong").connect() in (0x86, 0x87)
    # MQTT 3.1.1 return codes 4 and 5, which paho reports as the v5 codes 0x86 and 0x87.
    assert clients(port, v5=False).connect() in (0x86, 0x87)
    assert clients(port, "no-such-user", "x", v5=False).connect() in (0x86, 0x87)
    assert clients(port, "agent-line-1", PASSWORDS["agent-line-1"]).connect() == 0


def test_tls_listener_verifies_and_still_wants_a_login(site, clients):
    if site.tls_ca is None:
        pytest.skip("openssl is not installed: no test certificates, so no TLS listener")
    port = site.broker.tls_port
    agent = clients(port, "agent-line-1", PASSWORDS["agent-line-1"], tls_ca=site.tls_ca)
    assert agent.connect() == 0
    assert agent.publish(topic("line-1", "result"), b"over tls") == 0
    assert agent.publish(topic("line-2", "result"), b"forged") == NOT_AUTHORIZED
    assert clients(port, tls_ca=site.tls_ca).connect() in (0x86, 0x87)


def test_agent_publishes_only_under_its_own_line(site, clients):
    port = site.broker.port
    watcher = login(clients, port, "dashboard")
    assert watcher.subscribe(f"{PREFIX}/{SITE}/#") == [1]
    agent = login(clients, port, "agent-line-1")
    for kind in ("result", "review", "status", "events/health", "drift", "sync", "events/sync"):
        assert agent.publish(topic("line-1", kind), kind) == 0, kind
        assert watcher.expect(topic("line-1", kind)) == kind.encode(), kind
    assert agent.publish(topic("line-2", "result"), b"forged") == NOT_AUTHORIZED
    assert agent.publish(f"{PREFIX}/{SITE}/line-1-evil/result", b"forged") == NOT_AUTHORIZED
    assert agent.publish("elsewhere/result", b"forged") == NOT_AUTHORIZED
    assert watcher.expect(topic("line-2", "result"), 0.5) is None
    # Its trigger subscription, and the session marker it sends itself (edge_agent/mqtt.py).
    assert agent.subscribe(topic("line-1", "trigger"), topic("line-1", "session-marker")) == [1, 1]
    assert agent.publish(topic("line-1", "session-marker"), b"m-1") == 0
    assert agent.expect(topic("line-1", "session-marker")) == b"m-1"
    # Mosquitto 2.0 grants any subscription and applies the ACL to each message it would deliver.
    assert agent.subscribe(topic("line-2", "trigger"), f"{PREFIX}/{SITE}/#") == [1, 1]
    plc2 = login(clients, port, "plc-line-2")
    assert plc2.publish(topic("line-2", "trigger"), b"for line 2") == 0
    assert watcher.expect(topic("line-2", "trigger")) == b"for line 2"
    assert agent.expect(topic("line-2", "trigger"), 0.5) is None


def test_plc_triggers_its_line_and_reads_its_answers(site, clients):
    port = site.broker.port
    agent1 = login(clients, port, "agent-line-1")
    agent2 = login(clients, port, "agent-line-2")
    assert agent1.subscribe(topic("line-1", "trigger")) == [1]
    assert agent2.subscribe(topic("line-2", "trigger")) == [1]
    plc = login(clients, port, "plc-line-1")
    assert plc.subscribe(topic("line-1", "result"), topic("line-1", "review"), topic("line-1", "status")) == [1, 1, 1]
    assert plc.subscribe(topic("line-2", "result"), topic("line-1", "events/read")) == [1, 1]  # granted, filtered
    assert plc.publish(topic("line-1", "trigger"), b'{"item_id": 1}') == 0
    assert agent1.expect(topic("line-1", "trigger")) == b'{"item_id": 1}'
    assert plc.publish(topic("line-2", "trigger"), b'{"item_id": 2}') == NOT_AUTHORIZED
    assert plc.publish(topic("line-1", "result"), b"forged") == NOT_AUTHORIZED
    assert agent2.expect(topic("line-2", "trigger"), 0.5) is None
    assert agent2.publish(topic("line-2", "result"), b"not yours") == 0
    assert agent1.publish(topic("line-1", "events/read"), b"not yours") == 0
    assert agent1.publish(topic("line-1", "result"), b"answer") == 0
    assert plc.expect(topic("line-1", "result")) == b"answer"
    assert plc.seen == [topic("line-1", "result")]  # neither line 2's result nor line 1's read event
    # A line's MQTT v5 response topics: its agent may answer there, its PLC read, no one else.
    plc2 = login(clients, port, "plc-line-2")
    assert plc2.subscribe("replies/line-2/#") == [1]
    assert agent2.publish("replies/line-2/machine-7", b"reply") == 0
    assert plc2.expect("replies/line-2/machine-7") == b"reply"
    assert agent1.publish("replies/line-2/machine-7", b"forged") == NOT_AUTHORIZED
    assert plc.publish("replies/line-2/machine-7", b"forged") == NOT_AUTHORIZED


def test_dashboard_and_extra_users_only_read(site, clients):
    port = site.broker.port
    dashboard = login(clients, port, "dashboard")
    audit = login(clients, port, "audit")
    assert dashboard.subscribe(f"{PREFIX}/{SITE}/+/status") == [1]
    assert audit.subscribe(f"{PREFIX}/{SITE}/+/result") == [1]
    assert audit.subscribe(f"{PREFIX}/{SITE}/+/status") == [1]  # granted, but it gets no status
    assert dashboard.publish(topic("line-1", "trigger"), b"x") == NOT_AUTHORIZED
    assert audit.publish(topic("line-1", "result"), b"x") == NOT_AUTHORIZED
    agent = login(clients, port, "agent-line-2")
    assert agent.publish(topic("line-2", "status"), b"online", retain=True) == 0
    assert agent.publish(topic("line-2", "result"), b"r") == 0
    assert dashboard.expect(topic("line-2", "status")) == b"online"
    assert audit.expect(topic("line-2", "result")) == b"r"
    assert audit.seen == [topic("line-2", "result")]


# --------------------------------------------------------------------------- bridge
def test_bridge_forwards_the_site_to_the_central_broker_and_queues_while_it_is_down(site, clients):
    central = site.central
    operator = clients(central.port, "operator", "operator-secret", client_id="operator", v5=False, clean=False)
    assert operator.connect() == 0
    assert operator.subscribe(f"{PREFIX}/#") == [1]
    agent = login(clients, site.broker.port, "agent-line-1")
    # The site broker connects its bridge at start; give it a moment if it is not up yet.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert agent.publish(topic("line-1", "result"), b"bridged") == 0
        if operator.expect(topic("line-1", "result"), 1.0, b"bridged"):
            break
    else:
        pytest.fail(f"nothing arrived at the central broker:\n{site.broker.log_text()[-3000:]}")
    assert f"{PREFIX}/{SITE}/bridge/state" in operator.seen  # the bridge's notification ("1": connected)
    # Central broker down: the site broker still takes results and queues them for the
    # bridge (cleansession false), which delivers them once the central broker is back.
    operator.close()
    central.stop()
    assert agent.publish(topic("line-1", "result"), b"while-down") == 0
    central.restart()
    operator = clients(central.port, "operator", "operator-secret", client_id="operator", v5=False, clean=False)
    assert operator.connect() == 0
    assert operator.expect(topic("line-1", "result"), 20, b"while-down"), site.broker.log_text()[-3000:]


# --------------------------------------------------------------------------- corrupt persistence
def _restart_with_check(site: Site) -> str:
    result = site.broker.pre_start_check()
    assert result.returncode == 0, result.stderr
    site.broker.start()
    return result.stdout.strip() + "\n" + result.stderr


def test_a_sound_database_is_kept_and_retained_messages_survive(site, clients):
    agent = login(clients, site.broker.port, "agent-line-1")
    assert agent.publish(topic("line-1", "status"), b"kept", retain=True) == 0
    agent.close()
    site.broker.stop()
    assert site.persistence.stat().st_size > 0
    report = _restart_with_check(site)
    assert report.startswith("ok"), report
    dashboard = login(clients, site.broker.port, "dashboard")
    assert dashboard.subscribe(topic("line-1", "status")) == [1]
    assert dashboard.expect(topic("line-1", "status")) == b"kept"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_database_is_moved_aside_and_the_broker_starts(site, clients, damage):
    agent = login(clients, site.broker.port, "agent-line-1")
    for i in range(40):
        assert agent.publish(topic("line-1", f"events/n{i}"), f"retained {i} ".encode() * 8, retain=True) == 0
    agent.close()
    site.broker.stop()
    good = site.persistence.read_bytes()
    if damage == "garbage":
        site.persistence.write_bytes(os.urandom(len(good)))
    else:
        # A power cut mid-write; most cuts make mosquitto 2.0 refuse the file, some do not.
        for fraction in (0.6, 0.5, 0.7, 0.4, 0.8, 0.3):
            site.persistence.write_bytes(good[:int(len(good) * fraction)])
            if "Couldn't open database" in site.broker.start_fails(5):
                break
        else:
            pytest.fail("mosquitto accepted every truncated copy; no corrupt file to test with")
    # Without the check the broker would not come up (systemd would retry it forever).
    assert "Couldn't open database" in site.broker.start_fails()
    report = _restart_with_check(site)
    assert report.startswith("moved"), report
    moved = sorted(site.persistence.parent.glob("mosquitto.db.corrupt-*"))
    assert moved and moved[-1].stat().st_size > 0
    assert len(moved) <= 3
    assert not list(site.persistence.parent.glob(".db-check-*"))
    assert login(clients, site.broker.port, "agent-line-1").publish(topic("line-1", "result"), b"up") == 0
