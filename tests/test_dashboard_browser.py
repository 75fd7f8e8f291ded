"""The site dashboard in a real headless Chromium, while real agents read demo frames through a real Mosquitto.

Two lines: line-1 runs in this process, line-2 is an agent process that is killed with SIGKILL (its
broker connection just stops, so only its last will and its silence can tell the page). edge-web
runs as its own process, exactly as on site. edge-sync's MQTT reporter (the real one) says what it
activated on each line: line-1 updated from stable, line-2 on the canary channel rolled back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from edge_agent.agent import build_agent, start_agent
from edge_agent.config import parse_config
from edge_agent.demo import render_demo_camera
from sync.mqtt_report import SyncMqtt
from tests.broker import free_port, wait_for_port
from tests.paths import ROOT, SHIPPED_BUNDLE

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SITE = "browser-site"
KEEPALIVE_S = 5
# The README's screenshot is refreshed only when asked (DASHBOARD_SCREENSHOT=docs/dashboard.png):
# a test run leaves the working tree as it found it.
SCREENSHOT = Path(os.environ.get("DASHBOARD_SCREENSHOT") or Path(tempfile.gettempdir()) / "edge-dashboard.png")


@pytest.fixture(scope="module")
def browser_tools() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        print(f"\nskipping the dashboard browser test: {reason}")
        pytest.skip(reason)
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def camera(tmp_path_factory) -> Path:
    return render_demo_camera(tmp_path_factory.mktemp("camera") / "camera", 16, seed=7)


def agent_table(workdir: Path, broker_port: int, camera: Path, line: str) -> dict:
    return {
        "site": {"site_id": SITE, "line_id": line},
        "camera": {"source": str(camera), "loop": True, "fps": 10.0, "max_frame_age_ms": 2000},
        # No PLC here: the agent reads a frame every 200 ms by itself.
        "trigger": {"mode": "interval", "interval_ms": 200},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": KEEPALIVE_S},
        "outbox": {"path": str(workdir / "state" / "outbox.sqlite")},
        "review": {"crops_dir": str(workdir / "state" / "review"), "max_items": 100},
        "http": {"port": free_port()},
        # A small site reference so drift is judged within the test.
        "observability": {"reference_reads": 60, "min_reads": 30, "window_reads": 200},
        "logging": {"json": False, "level": "WARNING"},
    }


def toml(table: dict) -> str:
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def site(tmp_path, mqtt_broker, camera, browser_tools):
    """line-1 in this process, line-2 an agent process, edge-web a process; yields what the test needs."""
    in_process = build_agent(parse_config(agent_table(tmp_path / "line-1", mqtt_broker.port, camera, "line-1")))
    start_agent(in_process)
    config = tmp_path / "line-2.toml"
    # line-2 sorts by a plan (a region per first digit), so its card shows the chute bar.
    plan = tmp_path / "plan.csv"
    plan.write_text("postcode,chute\n" + "".join(f"{d}*,R{d}\n" for d in range(10)))
    line_2 = agent_table(tmp_path / "line-2", mqtt_broker.port, camera, "line-2")
    line_2["sort_plan"] = {"path": str(plan), "acceptance": "spent"}
    config.write_text(toml(line_2))
    agent_log = open(tmp_path / "line-2.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], cwd=ROOT,
                             stdout=agent_log, stderr=subprocess.STDOUT)
    web_port = free_port()
    web_log = open(tmp_path / "edge-web.log", "wb")
    web = subprocess.Popen([sys.executable, "-m", "web.cli", "--broker", f"127.0.0.1:{mqtt_broker.port}",
                            "--site", SITE, "--port", str(web_port)], cwd=ROOT, stdout=web_log,
                           stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", web_port, 20, web), (tmp_path / "edge-web.log").read_text()
        yield {"url": f"http://127.0.0.1:{web_port}", "agent": agent, "web": web, "tmp": tmp_path}
    finally:
        for proc in (agent, web):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        in_process.stop(drain_s=5)
        agent_log.close()
        web_log.close()


def api_site(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/site", timeout=5) as response:
        return json.loads(response.read())


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture
def chrome(browser_tools, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-proxy-server", "--hide-scrollbars", "--window-size=1400,1000",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# The page exposes window.dashboard; these read it and the DOM.
CHART_CHECK = """
const canvases = Array.from(document.querySelectorAll('canvas[data-chart]'));
return canvases.map(c => {
  const chart = Chart.getChart(c);
  const points = chart ? chart.data.datasets.reduce((n, d) => n + d.data.filter(v => v !== null).length, 0) : 0;
  return {line: c.closest('.card').dataset.line, name: c.dataset.chart, width: c.width, height: c.height,
          chart: !!chart, draws: chart ? (chart.$draws || 0) : 0, points: points};
});
"""
LINE_TEXT = """
const card = document.querySelector('.card[data-line="' + arguments[0] + '"]');
if (!card) return null;
const text = k => (card.querySelector('[data-k="' + k + '"]') || {}).textContent;
const tile = document.querySelector('.tile[data-line="' + arguments[0] + '"]');
const tileText = k => (tile.querySelector('[data-k="' + k + '"]') || {}).textContent;
const alert = card.querySelector('[data-k="sync_alert"]');
return {status: text('status'), reads_per_min: text('reads_per_min'), p99: text('p99'), model: text('model_version'),
        auto_sort: text('auto_sort_pct'), system: text('system'), first_read: text('reads').slice(0, 60),
        thumbnails: Array.from(card.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length,
        previous: text('model_previous'), channel: text('channel'), last_sync: text('last_sync'),
        last_sync_age: text('last_sync_age'), last_sync_reason: text('last_sync_reason'),
        sync_alert: alert.hidden ? null : alert.textContent, sync_events: text('sync_events'),
        model_health: text('model_health'),
        canary: !card.querySelector('[data-k="canary"]').hidden, tile_version: tileText('tile_version'),
        tile_canary: !tile.querySelector('[data-k="canary"]').hidden, tile_sync: tileText('sync_short')};
"""
# The agent runs the shipped bundle; the canary line tried a newer version that was rolled back.
SHIPPED = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["version"]
CANARY = "9.9.0"
ROLLBACK_REASON = f"unhealthy: 96% of 48 reads on {CANARY} went to review (max 90%)"


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def publish_sync(port: int) -> None:
    """What edge-sync publishes after a pull on each line: its step events and the retained state."""
    stable_pull = [{"event": "check", "active": "0.9.0", "channel": "stable", "pin": None},
                   {"event": "download", "version": f"{SHIPPED}", "bytes": 118_000},
                   {"event": "verified", "version": f"{SHIPPED}"},
                   {"event": "validated", "version": f"{SHIPPED}", "selftest_accuracy": 0.985},
                   {"event": "activated", "version": f"{SHIPPED}", "previous": "0.9.0", "pruned": []},
                   {"event": "healthy", "version": f"{SHIPPED}", "reads": 42, "review_pct": 11.9}]
    canary_pull = [{"event": "check", "active": f"{SHIPPED}", "channel": "canary", "pin": None},
                   {"event": "activated", "version": f"{CANARY}", "previous": f"{SHIPPED}", "pruned": []},
                   {"event": "rolled_back", "version": f"{CANARY}", "to": f"{SHIPPED}", "reason": ROLLBACK_REASON}]
    updated = {"active": f"{SHIPPED}", "previous": "0.9.0", "last_error": None,
               "last_result": {"outcome": "updated", "version": f"{SHIPPED}", "reason": "", "at": iso_now()}}
    rolled_back = {"active": f"{SHIPPED}", "previous": f"{CANARY}", "last_error": ROLLBACK_REASON,
                   "last_result": {"outcome": "rolled_back", "version": f"{CANARY}", "reason": ROLLBACK_REASON,
                                   "at": iso_now()}}
    for line, events, state in (("line-1", stable_pull, updated), ("line-2", canary_pull, rolled_back)):
        reporter = SyncMqtt("127.0.0.1", port, SITE, line)
        assert reporter.connect(), f"edge-sync's reporter could not reach the broker for {line}"
        try:
            for event in events:
                reporter.event(event)
            reporter.state(state)
        finally:
            reporter.close()


def test_dashboard_in_a_real_browser(site, chrome, mqtt_broker):
    url = site["url"]
    # The agents are up and have reported a few times before the page is opened, as on a real site.
    wait_for(lambda: [line["status"] for line in api_site(url)["lines"]] == ["up", "up"]
             and all(line["reads"] and len(line["series"]["at"]) >= 3 for line in api_site(url)["lines"]),
             60, "both lines up with reads and a few health reports")

    started = time.monotonic()
    chrome.get(url + "/")
    wait_for(lambda: chrome.execute_script("return window.dashboard && window.dashboard.ready"), 10,
             "the page drew every chart", interval_s=0.01)
    wall_s = time.monotonic() - started
    board = chrome.execute_script("return window.dashboard")
    print(f"\npage load to all values and charts drawn: {wall_s * 1000:.0f} ms from driver.get "
          f"({board['readyMs']} ms after navigation start by the page's own clock; the issue asks < 2000 ms)")

    # Every chart exists, has a size and has drawn; the time series carry points.
    charts = chrome.execute_script(CHART_CHECK)
    assert len(charts) == 8 and board["charts"] == 8 and board["chartsDrawn"] == 8
    assert all(c["chart"] and c["width"] > 0 and c["height"] > 0 and c["draws"] > 0 for c in charts), charts
    assert all(c["points"] > 0 for c in charts if c["name"] in ("latency", "throughput", "digits")), charts

    first = chrome.execute_script(LINE_TEXT, "line-1")
    assert first["status"] == "up" and first["model"] == f"{SHIPPED}"
    assert first["reads_per_min"] not in ("", "–") and first["p99"].endswith("ms")
    assert first["thumbnails"] > 0  # the digit crops decoded as PNG images
    assert first["last_sync"] == "not reported" and first["tile_version"] == f"{SHIPPED}"
    assert "chute bar" not in first["model_health"]  # no sort plan on line-1
    # The agent's and its reader's share of a core, measured by the agent from its threads.
    assert re.search(r"agent · readers \(of a core\)\d+ % · \d+ %", first["system"]), first["system"]
    second = chrome.execute_script(LINE_TEXT, "line-2")
    assert "chute bar0.9990 · strict until 500 reads" in second["model_health"], second["model_health"]

    # edge-sync reports its pulls: the page shows active and previous version, channel and result.
    publish_sync(mqtt_broker.port)
    synced = wait_for(lambda: (lambda l1: l1 if l1["previous"] else None)(chrome.execute_script(LINE_TEXT, "line-1")),
                      10, "line-1's sync state on the page")
    assert synced["model"] == f"{SHIPPED}" and synced["previous"] == "(previous 0.9.0)"
    assert synced["channel"] == "· channel stable" and synced["last_sync"] == f"updated {SHIPPED}"
    assert synced["last_sync_age"].endswith("s ago") and synced["sync_alert"] is None
    assert not synced["canary"] and not synced["tile_canary"] and synced["tile_sync"] == ""
    assert f"activated {SHIPPED} (from 0.9.0)" in synced["sync_events"] and f"healthy {SHIPPED}" in synced["sync_events"]
    canary = wait_for(lambda: (lambda l2: l2 if l2["sync_alert"] else None)(chrome.execute_script(LINE_TEXT, "line-2")),
                      10, "line-2's rollback on the page")
    assert canary["model"] == f"{SHIPPED}" and canary["previous"] == f"(previous {CANARY})"
    assert canary["canary"] and canary["tile_canary"] and canary["channel"] == "· channel canary"
    assert canary["last_sync"] == f"rolled back {CANARY}" and ROLLBACK_REASON in canary["last_sync_reason"]
    assert canary["sync_alert"] == f"Last sync rolled back {CANARY}: {ROLLBACK_REASON}"
    assert canary["tile_sync"] == "⚠ sync rolled back"
    assert f"rolled back {CANARY} → {SHIPPED}: {ROLLBACK_REASON}" in canary["sync_events"]
    assert chrome.execute_script("return document.getElementById('models-text').textContent") == \
        f"Models {SHIPPED} · 1 sync refused/rolled back"
    site_now = api_site(url)
    assert site_now["summary"]["canary_lines"] == 1 and site_now["summary"]["sync_problems"] == 1
    assert [line["model"]["rollout"] for line in site_now["lines"]] == ["in_sync", "in_sync"]

    # Live: within a few seconds the numbers on the page move without a reload.
    updates = board["updates"]
    later = wait_for(lambda: (lambda now: now if now["system"] != first["system"]
                              and now["first_read"] != first["first_read"] else None)(
        chrome.execute_script(LINE_TEXT, "line-1")), 10, "the line's live numbers changed")
    assert chrome.execute_script("return window.dashboard.updates") > updates
    assert later["status"] == "up"

    # A hung agent (SIGSTOP): its connection stays open but nothing comes; its silence (3 health
    # periods) or its will (after 1.5 keep-alives) must show it down within the keep-alive.
    agent = site["agent"]
    agent.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: (chrome.execute_script(LINE_TEXT, "line-2") or {}).get("status") == "down",
             KEEPALIVE_S * 1.5 + 5, "hung line-2 shown as down", interval_s=0.1)
    down_s = time.monotonic() - stopped
    print(f"hung agent (SIGSTOP) shown as DOWN after {down_s:.1f} s (keep-alive {KEEPALIVE_S} s, "
          f"health every 2 s)")
    assert down_s <= KEEPALIVE_S * 1.5 + 2
    # Then killed outright (SIGKILL): the broker publishes its last will and the page says so.
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    reason = wait_for(lambda: "connection lost" in (api_site(url)["lines"][1]["status_reason"] or ""),
                      KEEPALIVE_S * 1.5 + 5, "line-2's last will")
    assert reason and chrome.execute_script(LINE_TEXT, "line-2")["status"] == "down"
    assert chrome.execute_script(LINE_TEXT, "line-1")["status"] == "up"

    # Let the judged drift and a few more points reach the page, then keep a picture of it.
    wait_for(lambda: api_site(url)["lines"][0]["drift"]["judged"] is True, 60, "drift judged on line-1")
    time.sleep(2)
    chrome.set_window_size(1400, 1000)
    chrome.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert chrome.save_screenshot(str(SCREENSHOT))

    # The broker goes away: the page says so, keeps the last known values, and keeps updating.
    mqtt_broker.kill()
    wait_for(lambda: chrome.execute_script(
        "return !document.getElementById('broker-banner').hidden"), 15, "the broker-unreachable banner")
    assert chrome.execute_script(LINE_TEXT, "line-1")["status"] == "unknown"
    last_known = chrome.execute_script(LINE_TEXT, "line-1")
    assert last_known["model"] == f"{SHIPPED}" and last_known["previous"] == "(previous 0.9.0)"
    assert chrome.execute_script("return document.getElementById('server-banner').hidden")

    problems = [entry for entry in chrome.get_log("browser")
                if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]]
    assert not problems, problems

    rss_kb = int(next(line for line in Path(f"/proc/{site['web'].pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:")).split()[1])
    print(f"edge-web RSS while serving the page: {rss_kb / 1024:.1f} MB")
    assert rss_kb / 1024 < 120
