"""The agent follows the sync's "active" pointer: a new model between two reads, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

from tests.paths import SHIPPED_BUNDLE
from tests.test_agent import RunningAgent, agent_table, camera_frames, plc_for  # noqa: F401 - fixture


def bundle_copy(folder: Path, version: str) -> Path:
    shutil.copytree(SHIPPED_BUNDLE, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def point(active: Path, target: Path) -> None:
    """Switch the pointer atomically, as edge-sync does."""
    tmp = active.with_name("active.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, active)


def test_switch_under_steady_triggers_loses_and_doubles_nothing(tmp_path, mqtt_broker, camera_frames):  # noqa: F811
    folder, _ = camera_frames
    models = tmp_path / "models"
    v1, v2 = bundle_copy(models / "versions" / "1.0.0", "1.0.0"), bundle_copy(models / "versions" / "1.1.0", "1.1.0")
    broken = models / "versions" / "9.9.9"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    active = models / "active"
    point(active, v1)
    table = agent_table(tmp_path, mqtt_broker.port, folder, model={"bundle": str(active)},
                        trigger={"mode": "interval", "interval_ms": 20})
    plc = plc_for(mqtt_broker.port, persistent=True, client_id="sorter-swap", watch=("postcode/test-site/line-9/events/#",))
    agent = RunningAgent(table)
    try:
        assert plc.wait_for(lambda c: len(c.results()) >= 30, 30)
        point(active, broken)  # a bundle that does not load: refused, the line keeps its model
        assert plc.wait_for(lambda c: any(json.loads(p).get("kind") == "model_swap_failed"
                                          for t, p in c.messages if t.endswith("/events/error")), 10)
        point(active, v2)
        assert plc.wait_for(lambda c: sum(p["model_version"] == "1.1.0" for p in c.results().values()) >= 30, 30)
        assert plc.wait_for(lambda c: c.agent_status().get("model_version") == "1.1.0", 15)
    finally:
        agent.stop()
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as conn:
        triggers = conn.execute("SELECT item_id, state, result_id FROM triggers ORDER BY id").fetchall()
        results = conn.execute("SELECT item_id, payload FROM messages WHERE topic LIKE '%/result' ORDER BY id").fetchall()
    assert triggers and {state for _i, state, _r in triggers} == {"answered"}
    assert len(results) == len(triggers) == len({i for i, _p in results})  # one answer per trigger, none twice
    versions = [json.loads(p)["model_version"] for _i, p in results]
    switch = versions.index("1.1.0")
    assert set(versions[:switch]) == {"1.0.0"} and set(versions[switch:]) == {"1.1.0"}  # a clean cut
    assert plc.wait_for(lambda c: set(i for i, _ in results) <= set(c.results()), 30)
    plc.stop()
