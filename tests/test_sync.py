"""edge-sync end to end: a signed registry served over real HTTP on loopback, real files, real LiteRT.

The registry server can misbehave (500, hang, HTML, endless, truncated, slow); every refusal must
leave ``active`` byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import read_bundle, sha256_file
from sync import activation
from sync.errors import SignatureError, SyncError
from sync.fetch import HttpSettings
from sync.pull import PullSettings, pull, status
from sync.registry import parse_index, publish, read_registry_index, write_index
from sync.selftest import add_selftest
from sync.signing import generate_keypair, load_private_key, load_public_key, sign, verify
from tests.paths import DEMO_DIGITS, ROOT, SHIPPED_BUNDLE

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse



class RegistryServer:
    """Serves a folder with ETag/304 and Range/206; ``misbehave[path or '*']`` picks a failure mode.

    Modes: "500", "hang", "html", "endless", "truncate" (half of what is asked), "slow".
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.misbehave: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                path = urlparse(self.path).path.lstrip("/")
                server.requests.append((path, dict(self.headers)))
                mode = server.misbehave.get(path) or server.misbehave.get("*")
                try:
                    self._serve(path, mode)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _serve(self, path, mode):
                if mode == "500":
                    self.send_error(500)
                    return
                if mode == "hang":
                    server.stopping.wait(10)
                    return
                if mode == "html":
                    body = b"<!DOCTYPE html><html><body>Welcome to nginx!</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                file = server.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                if mode == "endless":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(2000):  # 128 MB at most, should the client not stop reading
                        self.wfile.write(b"\0" * 65536)
                    return
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[6:-1])
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    return
                if mode == "slow":
                    for i in range(0, len(body), 16384):
                        self.wfile.write(body[i:i + 16384])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "RegistryServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


BASE_VERSION = "1.0.1"


def rewrite_manifest(bundle: Path, **changes) -> dict:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    (bundle / "manifest.json.sig").unlink(missing_ok=True)
    return manifest


def bundle_version(base: Path, dest: Path, version: str, **changes) -> Path:
    """A copy of ``base`` announced as ``version`` (same model bytes unless changed later)."""
    shutil.copytree(base, dest)
    rewrite_manifest(dest, version=version, **changes)
    return dest


def set_model(bundle: Path, data: bytes) -> None:
    (bundle / "model.tflite").write_bytes(data)
    rewrite_manifest(bundle, sha256=sha256_file(bundle / "model.tflite"))


def active_fingerprint(models_dir: Path) -> tuple[str, dict[str, str]]:
    """Where ``active`` points and the sha256 of every file there: equal before and after = untouched."""
    link = Path(models_dir) / "active"
    target = os.readlink(link)
    resolved = link.resolve()
    return target, {p.name: sha256_file(p) for p in sorted(resolved.iterdir())}


# ---------------------------------------------------------------- fixtures

class Keys:
    def __init__(self, directory: Path, name: str):
        self.private_path, self.public_path = generate_keypair(directory / name)
        self.private = load_private_key(self.private_path)
        self.public = load_public_key(self.public_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return Keys(root, "a"), Keys(root, "b")


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Path:
    """The shipped bundle announced as 1.0.1 (the version story below does not move with each
    model release) with a self-test made of the 300 demo digits."""
    bundle = tmp_path_factory.mktemp("base") / "mnist-int8"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    rewrite_manifest(bundle, version=BASE_VERSION)
    add_selftest(bundle, DEMO_DIGITS)
    return bundle


def test_a_self_test_written_twice_is_the_same_file_as_the_shipped_one(tmp_path: Path) -> None:
    """The shipped self-test is rebuilt at install, not committed: only bytes that depend on the
    digits alone can match the sha256 its manifest names."""
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    shipped = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["selftest"]
    first = add_selftest(bundle, DEMO_DIGITS)
    second = add_selftest(bundle, DEMO_DIGITS)
    assert first == second == shipped
    assert (bundle / "selftest.npz").read_bytes() == (SHIPPED_BUNDLE / "selftest.npz").read_bytes()


def test_the_model_card_names_the_self_test_digits_and_their_licence(tmp_path: Path, base_bundle: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(base_bundle, bundle)
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.count("## Self-test digits") == 1
    section = card.split("## Self-test digits")[1]
    assert "300 labelled digits, copied from `demo_digits.npz`" in section
    assert "CC BY-SA 3.0" in section and "LeCun" in section
    add_selftest(bundle, DEMO_DIGITS)  # again: the section is replaced, not repeated
    assert (bundle / "MODEL_CARD.md").read_text().count("## Self-test digits") == 1


@pytest.fixture
def server(tmp_path):
    with RegistryServer(tmp_path / "registry") as running:
        running.root.mkdir()
        yield running


def settings_for(server, site: Path, keys, **changes) -> PullSettings:
    http = changes.pop("http", HttpSettings(timeout=1.0, retries=1, backoff=0.01, max_bytes=8 << 20))
    return PullSettings(registry_url=server.url, public_keys=[keys[0].public], models_dir=site, http=http,
                        **changes)


def add_version(tmp_path, base, server, key, version, channel="stable", prepare=None, **publish_args):
    bundle = bundle_version(base, tmp_path / f"bundle-{version}-{time.monotonic_ns()}", version)
    if prepare:
        prepare(bundle)
    return publish(bundle, server.root, channel, key.private, **publish_args)


@pytest.fixture
def site_v1(tmp_path, base_bundle, server, keys) -> Path:
    """A site that pulled 1.0.1 from stable."""
    publish(base_bundle, server.root, "stable", keys[0].private)
    site = tmp_path / "site"
    result = pull(settings_for(server, site, keys))
    assert (result.outcome, result.version) == ("updated", "1.0.1"), result
    return site


# ---------------------------------------------------------------- happy path

def test_first_pull_update_not_modified_and_rollback(tmp_path, base_bundle, server, keys, site_v1):
    events = []
    assert activation.active_bundle(site_v1) == site_v1 / "versions" / "1.0.1"
    read_bundle(activation.active_bundle(site_v1))  # complete and its model matches its manifest

    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    result = pull(settings_for(server, site_v1, keys), report=events.append)
    assert (result.outcome, result.version) == ("updated", "2.0.0")
    assert [e["event"] for e in events] == ["check", "index_verified", "download", "downloaded", "verified",
                                           "validated", "activated"]
    assert all(json.dumps(e) for e in events)
    assert os.readlink(site_v1 / "active") == "versions/2.0.0"
    state = status(site_v1)
    assert (state["active"], state["previous"], state["high_water"]) == ("2.0.0", "1.0.1", "2.0.0")
    assert state["staged"] == [] and state["last_error"] is None

    events.clear()
    result = pull(settings_for(server, site_v1, keys), report=events.append)
    assert (result.outcome, result.version) == ("up_to_date", "2.0.0")
    assert "index_not_modified" in [e["event"] for e in events]
    assert server.requests[-1][0] == "index.json" and "If-None-Match" in server.requests[-1][1]

    assert activation.rollback(site_v1) == ("2.0.0", "1.0.1")
    assert activation.active_bundle(site_v1).name == "1.0.1"
    assert status(site_v1)["high_water"] == "2.0.0"
    # The rolled-back version is not installed again by the next pull.
    result = pull(settings_for(server, site_v1, keys))
    assert not result.ok and "2.0.0 failed before (rolled back)" in result.reason
    assert activation.active_bundle(site_v1).name == "1.0.1"


def test_cli_keygen_add_selftest_publish_pull_status_rollback(tmp_path, base_bundle, server):
    def run(*args, check=True):
        out = subprocess.run([sys.executable, "-m", "sync", *map(str, args)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    run("keygen", "--out", tmp_path / "keys")
    private = tmp_path / "keys" / "sync-signing.key"
    assert private.stat().st_mode & 0o777 == 0o600
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    rewrite_manifest(bundle, version=BASE_VERSION)
    assert "accuracy" in run("add-selftest", bundle, "--digits", DEMO_DIGITS).stdout
    assert json.loads((bundle / "manifest.json").read_text())["selftest"]["n"] == 300
    assert run("publish", bundle, "--registry", server.root, "--channel", "stable", "--key", private).stdout \
        .strip() == "published 1.0.1 on stable"
    site = tmp_path / "site"
    pull_args = ("pull", "--registry", server.url, "--public-key", tmp_path / "keys" / "sync-signing.pub",
                 "--models-dir", site, "--timeout", "2", "--retries", "0")
    out = run(*pull_args)
    *log_lines, last = out.stdout.strip().splitlines()
    assert last == "updated: 1.0.1"
    events = [json.loads(json.loads(line)["msg"])["event"] for line in log_lines
              if json.loads(line)["logger"] == "sync"]
    assert events == ["check", "index_verified", "download", "downloaded", "verified", "validated", "activated"]
    assert json.loads(run("status", "--models-dir", site).stdout)["active"] == "1.0.1"
    assert run(*pull_args).stdout.strip().splitlines()[-1] == "up_to_date: 1.0.1"
    # Republishing the same bytes is a no-op; the same version with other bytes is refused in one line.
    run("publish", bundle, "--registry", server.root, "--channel", "stable", "--key", private)
    rewrite_manifest(bundle, acceptance_threshold=0.5)
    out = run("publish", bundle, "--registry", server.root, "--channel", "stable", "--key", private, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("refused: version 1.0.1 is already published with different "
                                                   "bytes; bump the version (a published version is never rewritten)")
    server.misbehave["index.json"] = "500"
    out = run(*pull_args, check=False)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("refused: index.json: HTTP 500")
    out = run("rollback", "--models-dir", site, check=False)
    assert out.returncode == 1 and "no previous version" in out.stderr


# ---------------------------------------------------------------- refusals

def _flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _resign(server, key, mutate) -> None:
    index = read_registry_index(server.root)
    mutate(index)
    write_index(server.root, index, key.private)


def _shuffled_selftest(bundle: Path) -> None:
    with np.load(bundle / "selftest.npz") as data:
        images, labels = data["images"], data["labels"]
    np.savez_compressed(bundle / "selftest.npz", images=images, labels=np.roll(labels, 1))
    manifest = json.loads((bundle / "manifest.json").read_text())
    rewrite_manifest(bundle, selftest=dict(manifest["selftest"], sha256=sha256_file(bundle / "selftest.npz")))


def _nan_model(bundle: Path) -> None:
    """The shipped model with its output scale set to NaN in the flatbuffer: it loads and outputs NaN."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    scale = struct.pack("<f", manifest["output"]["scale"])
    data = (bundle / "model.tflite").read_bytes()
    assert data.count(scale) == 1
    set_model(bundle, data.replace(scale, struct.pack("<f", float("nan"))))
    rewrite_manifest(bundle, output=dict(manifest["output"], scale=float("nan")))


def _float_model(bundle: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input(shape=(28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    set_model(bundle, tf.lite.TFLiteConverter.from_keras_model(model).convert())


def case_tampered_model(ctx):
    ctx.add("2.0.0")
    _flip_byte(ctx.server.root / "bundles/2.0.0/model.tflite")
    return r"model\.tflite: sha256 .* does not match the signed index"


def case_tampered_manifest(ctx):
    ctx.add("2.0.0")
    path = ctx.server.root / "bundles/2.0.0/manifest.json"
    path.write_text(path.read_text().replace('"acceptance_threshold": 0.9', '"acceptance_threshold": 0.1'))
    return r"manifest\.json: sha256 .* does not match the signed index"


def case_tampered_manifest_resigned_index(ctx):
    """Someone with the index key but not the manifest's: the manifest signature catches it."""
    ctx.add("2.0.0")
    path = ctx.server.root / "bundles/2.0.0/manifest.json"
    path.write_text(path.read_text().replace('"acceptance_threshold": 0.9', '"acceptance_threshold": 0.1'))
    ctx.resign(lambda index: index["versions"]["2.0.0"]["files"]["manifest.json"].update(
        size=path.stat().st_size, sha256=sha256_file(path)))
    return r"manifest of 2\.0\.0 signature does not verify with any pinned key"


def case_index_signed_by_other_key(ctx):
    ctx.add("2.0.0", key=ctx.keys[1])
    return r"index\.json signature does not verify with any pinned key"


def case_unsigned_index(ctx):
    ctx.add("2.0.0")
    (ctx.server.root / "index.json.sig").unlink()
    return r"index\.json is unsigned"


def case_expired_index_replayed(ctx):
    ctx.add("2.0.0", now=datetime.now(timezone.utc) - timedelta(days=40))
    return r"index expired at .* stale or replayed"


def case_older_index_replayed(ctx):
    """Still within its validity, but older than the index the site already acted on."""
    ctx.add("2.0.0", now=datetime.now(timezone.utc) - timedelta(days=2))
    return r"index issued .* is older than one already seen .*: replayed"


def case_v2_manifest_with_v1_model(ctx):
    v1_model = (SHIPPED_BUNDLE / "model.tflite").read_bytes()
    ctx.add("2.0.0", prepare=lambda b: set_model(b, v1_model + b"\0" * 16))
    model = ctx.server.root / "bundles/2.0.0/model.tflite"
    model.write_bytes(v1_model)
    ctx.resign(lambda index: index["versions"]["2.0.0"]["files"]["model.tflite"].update(
        size=model.stat().st_size, sha256=sha256_file(model)))
    return r"manifest 2\.0\.0 names model sha256 .* manifest and model do not belong together"


def case_sha_mismatch_in_index(ctx):
    ctx.add("2.0.0")
    ctx.resign(lambda index: index["versions"]["2.0.0"]["files"]["selftest.npz"].update(sha256="0" * 64))
    return r"selftest\.npz: sha256 .* does not match the signed index"


def case_truncated_download(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["bundles/2.0.0/model.tflite"] = "truncate"
    return r"model\.tflite: truncated at \d+ of \d+ bytes \(after 2 attempts\)"


def case_endless_response(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["bundles/2.0.0/model.tflite"] = "endless"
    return r"model\.tflite: the server sent more than \d+ bytes \(listed size\)"


def case_larger_than_cap(ctx):
    ctx.add("2.0.0")
    ctx.http = HttpSettings(timeout=1.0, retries=1, backoff=0.01, max_bytes=1 << 20)
    return r"bundle 2\.0\.0 is \d+ bytes, over the 1048576-byte cap"


def case_index_larger_than_cap(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["index.json"] = "endless"
    return r"index\.json is larger than 1048576 bytes"


def case_downgrade(ctx):
    ctx.add("0.9.0")
    return r"downgrade refused: stable offers 0\.9\.0, older than 1\.0\.1 \(high-water mark 1\.0\.1\)"


def case_selftest_fails(ctx):
    ctx.add("2.0.0", prepare=_shuffled_selftest)
    promised = json.loads((ctx.base / "manifest.json").read_text())["selftest"]["accuracy"]  # the bundle's own
    return rf"self-test failed: 2\.0\.0 scores 0\.\d+ on 300 digits, manifest promises {re.escape(f'{promised:.4f}')}"


def case_model_outputs_nan(ctx):
    # publish now refuses a NaN scale, so this is a registry whose build side did not check: the
    # published 2.0.0 replaced by the NaN model, manifest and index re-signed with the real key.
    # The site's manifest check (or LiteRT's XNNPACK) refuses it before it can output
    # NaN; the self-test's own NaN check is covered in test_selftest_refuses_nan_outputs.
    ctx.add("2.0.0")
    published = ctx.server.root / "bundles/2.0.0"
    _nan_model(published)
    (published / "manifest.json.sig").write_bytes(sign(ctx.keys[0].private, (published / "manifest.json").read_bytes()))
    ctx.resign(lambda index: [index["versions"]["2.0.0"]["files"][name].update(
        size=(published / name).stat().st_size, sha256=sha256_file(published / name))
        for name in ("model.tflite", "manifest.json", "manifest.json.sig")
        if name in index["versions"]["2.0.0"]["files"]])
    return r"bundle 2\.0\.0.*(scale value \(nan\)|quantisation scale must be a positive finite number)"


def case_float_model(ctx):
    ctx.add("2.0.0", prepare=_float_model)
    return r"does not load: .* an int8 or uint8 model is required"


def case_trickling_server(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["bundles/2.0.0/model.tflite"] = "slow"
    ctx.http = HttpSettings(timeout=1.0, retries=1, backoff=0.01, transfer_timeout=0.3)
    return r"model\.tflite: slower than 0\.3 s \(\d+ of \d+ bytes\) \(after 2 attempts\)"


def case_http_500(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["index.json"] = "500"
    return r"index\.json: HTTP 500 from registry \(after 2 attempts\)"


def case_server_hangs(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["index.json"] = "hang"
    ctx.http = HttpSettings(timeout=0.3, retries=1, backoff=0.01)
    return r"index\.json: timed out after 0\.3 s"


def case_registry_returns_html(ctx):
    ctx.add("2.0.0")
    ctx.server.misbehave["*"] = "html"
    return r"registry returned an HTML page for index\.json"


CASES = [case_tampered_model, case_tampered_manifest, case_tampered_manifest_resigned_index,
         case_index_signed_by_other_key, case_unsigned_index, case_expired_index_replayed,
         case_older_index_replayed,
         case_v2_manifest_with_v1_model, case_sha_mismatch_in_index, case_truncated_download,
         case_endless_response, case_larger_than_cap, case_index_larger_than_cap, case_downgrade,
         case_selftest_fails, case_model_outputs_nan,
         pytest.param(case_float_model, marks=pytest.mark.slow), case_trickling_server, case_http_500,
         case_server_hangs, case_registry_returns_html]


class Ctx:
    def __init__(self, tmp_path, base, server, keys):
        self.tmp_path, self.base, self.server, self.keys = tmp_path, base, server, keys
        self.http = None

    def add(self, version, key=None, prepare=None, **publish_args):
        return add_version(self.tmp_path, self.base, self.server, key or self.keys[0], version,
                           prepare=prepare, **publish_args)

    def resign(self, mutate):
        _resign(self.server, self.keys[0], mutate)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_refused_with_its_reason_and_active_untouched(case, tmp_path, base_bundle, server, keys, site_v1):
    before = active_fingerprint(site_v1)
    ctx = Ctx(tmp_path, base_bundle, server, keys)
    expected = case(ctx)
    extra = {"http": ctx.http} if ctx.http else {}
    started = time.monotonic()
    result = pull(settings_for(server, site_v1, keys, **extra))
    assert time.monotonic() - started < 15
    assert result.outcome == "refused"
    assert "\n" not in result.reason
    assert re.search(expected, result.reason), result.reason
    assert active_fingerprint(site_v1) == before
    state = status(site_v1)
    assert state["active"] == "1.0.1" and state["last_error"] == result.reason
    assert not any((site_v1 / "versions").glob("2.0.0"))


def test_a_version_that_failed_validation_is_not_fetched_again(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0", prepare=_shuffled_selftest)
    assert "self-test failed" in pull(settings_for(server, site_v1, keys)).reason
    server.requests.clear()
    result = pull(settings_for(server, site_v1, keys))
    assert "2.0.0 failed before (self-test failed" in result.reason
    assert not [path for path, _ in server.requests if path.startswith("bundles/")]
    # A newer, good version supersedes it.
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.1")
    assert pull(settings_for(server, site_v1, keys)).version == "2.0.1"


def test_the_agent_sees_each_switch_once(tmp_path, base_bundle, server, keys, site_v1):
    pointer = activation.ActivePointer(site_v1)
    assert pointer.changed() is None
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    pull(settings_for(server, site_v1, keys))
    assert pointer.changed() == site_v1 / "versions" / "2.0.0"
    assert pointer.changed() is None
    activation.rollback(site_v1, reason="health check: no healthy reads within 60 s")
    assert pointer.changed() == site_v1 / "versions" / "1.0.1"
    assert status(site_v1)["failed"] == {"2.0.0": "health check: no healthy reads within 60 s"}


def test_downgrade_only_with_a_pin(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "0.9.0", channel="old")
    result = pull(settings_for(server, site_v1, keys, pin="0.9.0"))
    assert (result.outcome, result.version) == ("updated", "0.9.0")
    assert status(site_v1)["high_water"] == "1.0.1"
    assert "0.9.0" in activation.installed_versions(site_v1)
    # Unpinned again: back up to the channel's version (equal to the mark, so no downgrade).
    result = pull(settings_for(server, site_v1, keys))
    assert (result.outcome, result.version) == ("updated", "1.0.1")


def test_interrupted_download_resumes_with_range(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    server.misbehave["bundles/2.0.0/model.tflite"] = "truncate"
    assert "truncated" in pull(settings_for(server, site_v1, keys)).reason
    part = site_v1 / "staging/2.0.0/model.tflite.part"
    assert part.stat().st_size > 0
    server.misbehave.clear()
    server.requests.clear()
    assert pull(settings_for(server, site_v1, keys)).version == "2.0.0"
    model_requests = [h for p, h in server.requests if p == "bundles/2.0.0/model.tflite"]
    assert model_requests and model_requests[0]["Range"].startswith("bytes=")
    assert status(site_v1)["staged"] == []


def test_a_corrupt_partial_file_is_started_over(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    staged = site_v1 / "staging" / "2.0.0"
    staged.mkdir(parents=True)
    (staged / "model.tflite.part").write_bytes(b"\xff" * 1000)  # not what the registry holds
    assert pull(settings_for(server, site_v1, keys)).version == "2.0.0"
    read_bundle(activation.active_bundle(site_v1))


def test_publish_refuses_a_bundle_without_self_test(tmp_path, server, keys):
    bundle = tmp_path / "bare"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("selftest", None)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "selftest.npz").unlink(missing_ok=True)
    with pytest.raises(SyncError, match="no self-test"):
        publish(bundle, server.root, "stable", keys[0].private)
    assert not (server.root / "index.json").exists()


def test_a_cached_index_is_checked_against_todays_keys(tmp_path, base_bundle, server, keys, site_v1):
    """A 304 reuses the stored index, but a key removed from the pins no longer vouches for it."""
    only_b = PullSettings(registry_url=server.url, public_keys=[keys[1].public], models_dir=site_v1,
                          http=HttpSettings(timeout=1.0, retries=0))
    result = pull(only_b)
    assert result.reason == "cached index.json signature does not verify with any pinned key"


def test_resign_revives_a_registry_whose_index_expired(tmp_path, base_bundle, server, keys):
    from sync.registry import resign

    publish(base_bundle, server.root, "stable", keys[0].private,
            now=datetime.now(timezone.utc) - timedelta(days=31))
    site = tmp_path / "site"
    assert "index expired" in pull(settings_for(server, site, keys)).reason
    assert not (site / "active").exists()
    out = subprocess.run([sys.executable, "-m", "sync", "resign", "--registry", str(server.root), "--key",
                          str(keys[0].private_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("index re-signed, expires "), out.stderr
    assert pull(settings_for(server, site, keys)).version == "1.0.1"
    with pytest.raises(SyncError, match="publish a bundle first"):
        resign(tmp_path / "empty", keys[0].private)


def test_one_pull_at_a_time(tmp_path, server, keys, site_v1):
    import fcntl

    with open(site_v1 / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = pull(settings_for(server, site_v1, keys))
    assert result.reason == "another edge-sync pull is running on this models dir"


def test_pull_every_keeps_pulling(tmp_path, base_bundle, server, keys):
    publish(base_bundle, server.root, "stable", keys[0].private)
    site = tmp_path / "site"
    child = subprocess.Popen(
        [sys.executable, "-m", "sync", "pull", "--registry", server.url, "--public-key", str(keys[0].public_path),
         "--models-dir", str(site), "--every", "0.2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: activation.active_version(site) == "1.0.1")
        add_version(tmp_path, base_bundle, server, keys[0], "1.1.0")
        _wait_for(lambda: activation.active_version(site) == "1.1.0")
    finally:
        child.kill()
        child.wait(10)


def test_key_rotation_any_pinned_key_may_sign(tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[1], "2.0.0")
    both = PullSettings(registry_url=server.url, public_keys=[keys[0].public, keys[1].public],
                        models_dir=site_v1, http=HttpSettings(timeout=1.0, retries=0))
    assert pull(both).version == "2.0.0"


def test_full_disk_fails_cleanly(tmp_path, base_bundle, server, keys, site_v1, monkeypatch):
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    before = active_fingerprint(site_v1)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sync.fetch.os.fsync", no_space)
    result = pull(settings_for(server, site_v1, keys))
    assert result.reason == ("cannot write 2.0.0 to " f"{site_v1 / 'staging' / '2.0.0'}: No space left on device")
    assert not (site_v1 / "staging" / "2.0.0").exists()
    assert active_fingerprint(site_v1) == before
    monkeypatch.undo()
    assert pull(settings_for(server, site_v1, keys)).version == "2.0.0"


def test_offline_site_catches_up_in_one_pull_and_keeps_n(tmp_path, base_bundle, server, keys, site_v1):
    for version in ("1.1.0", "1.2.0", "1.3.0"):
        add_version(tmp_path, base_bundle, server, keys[0], version)
        assert pull(settings_for(server, site_v1, keys, keep=1)).version == version
    assert activation.installed_versions(site_v1) == ["1.2.0", "1.3.0"]
    # Away for a while: three releases go out, one on canary only.
    for version in ("1.4.0", "1.5.0", "2.0.0"):
        add_version(tmp_path, base_bundle, server, keys[0], version)
    add_version(tmp_path, base_bundle, server, keys[0], "3.0.0", channel="canary")
    result = pull(settings_for(server, site_v1, keys, keep=1))
    assert (result.outcome, result.version) == ("updated", "2.0.0")
    assert activation.installed_versions(site_v1) == ["1.3.0", "2.0.0"]
    assert pull(settings_for(server, site_v1, keys, channel="canary")).version == "3.0.0"


# ---------------------------------------------------------------- pure parts

def test_selftest_refuses_nan_outputs():
    from types import SimpleNamespace

    from edge_agent.loader import Classification
    from sync.errors import ValidationError
    from sync.selftest import score

    probabilities = np.full((2, 10), np.nan, np.float32)
    model = SimpleNamespace(version="9.9.9", classifier=SimpleNamespace(
        classify=lambda images: Classification(np.zeros(2, int), probabilities)))
    with pytest.raises(ValidationError, match="model 9.9.9 outputs NaN"):
        score(model, np.zeros((2, 28, 28), np.uint8), np.zeros(2))


def test_signature_checks(keys):
    data = b'{"format": 1}'
    signature = sign(keys[0].private, data)
    assert verify([keys[1].public, keys[0].public], data, signature, "x")
    for bad, reason in ((b"not base64!!", "not base64"), (b"AAAA", "not an Ed25519 signature"),
                        (sign(keys[1].private, data), "does not verify")):
        with pytest.raises(SignatureError, match=reason):
            verify([keys[0].public], data, bad, "x")
    with pytest.raises(SignatureError, match="does not verify"):
        verify([keys[0].public], data + b" ", signature, "x")


def test_index_parsing_refuses_what_it_cannot_trust():
    now = datetime(2026, 11, 27, tzinfo=timezone.utc)
    good = {"format": 1, "issued_at": "2026-11-26T00:00:00Z", "expires_at": "2026-12-26T00:00:00Z",
            "versions": {"1.0.0": {"path": "bundles/1.0.0/", "files": {
                "model.tflite": {"size": 3, "sha256": "a" * 64}}}}, "channels": {"stable": "1.0.0"}}
    assert parse_index(json.dumps(good).encode(), now)["channels"] == {"stable": "1.0.0"}
    for change, reason in (({"format": 2}, "format"), ({"expires_at": "2026-11-26T12:00:00Z"}, "expired"),
                           ({"issued_at": "yesterday"}, "not an ISO 8601"),
                           ({"versions": {"1.0": {"path": "x/", "files": {}}}}, "not semantic"),
                           ({"versions": {"1.0.0": {"path": "../etc/", "files": {}}}}, "leaves the registry"),
                           ({"versions": {"1.0.0": {"path": "b/", "files": {"../x": {"size": 1, "sha256": "a" * 64}}}}},
                            "malformed")):
        with pytest.raises(SyncError, match=reason):
            parse_index(json.dumps({**good, **change}).encode(), now)
    with pytest.raises(SyncError, match="not JSON"):
        parse_index(b"<html>", now)


# ---------------------------------------------------------------- crash safety

def _spawn_pull(server, site, keys, pause=None):
    env = dict(os.environ)
    env.pop("EDGE_SYNC_TEST_PAUSE", None)
    if pause:
        env["EDGE_SYNC_TEST_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-m", "sync", "pull", "--registry", server.url, "--public-key", str(keys[0].public_path),
         "--models-dir", str(site), "--timeout", "2", "--retries", "0"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("step", ["during_download", "after_verify", "during_activation", "after_switch"])
def test_kill_9_at_each_step_leaves_a_complete_model(step, tmp_path, base_bundle, server, keys, site_v1):
    add_version(tmp_path, base_bundle, server, keys[0], "2.0.0")
    if step == "during_download":
        server.misbehave["bundles/2.0.0/model.tflite"] = "slow"
        child = _spawn_pull(server, site_v1, keys)
        part = site_v1 / "staging/2.0.0/model.tflite.part"
        _wait_for(lambda: part.exists() and part.stat().st_size > 100_000)
    else:
        child = _spawn_pull(server, site_v1, keys, pause=step)
        assert child.stderr.readline().strip() == f"paused at {step}"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stderr.close()
    # Whatever the moment, active is a complete bundle whose model matches its manifest: old or new.
    manifest, _ = read_bundle(activation.active_bundle(site_v1))
    # Killed before the switch: the old one, complete; killed right after it: the new one, complete.
    assert manifest.version == ("2.0.0" if step == "after_switch" else "1.0.1")
    server.misbehave.clear()
    result = pull(settings_for(server, site_v1, keys))
    assert (result.outcome, result.version) == (
        ("up_to_date" if step == "after_switch" else "updated"), "2.0.0"), result
    assert status(site_v1)["high_water"] == "2.0.0"
    read_bundle(activation.active_bundle(site_v1))
    assert status(site_v1)["previous"] == "1.0.1"
