"""The sort plan file: every bad row named with its line, and hot reload in the running agent."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_agent.sortplan import MAX_ERRORS, SortPlanError, load_sort_plan, parse_sort_plan
from tests.test_agent import BASE, RunningAgent, agent_table, plc_for


def errors_of(text: str, lengths=(5,)) -> list[str]:
    with pytest.raises(SortPlanError) as caught:
        parse_sort_plan(text.encode(), "plan.csv", lengths)
    return caught.value.errors


def test_a_good_plan_with_prefixes_bom_and_blank_lines():
    plan = parse_sort_plan("\ufeffPostcode,Chute\n01234,7\n\n75*,12\n75001,13\n".encode(), "plan.csv")
    assert plan.exact == {"01234": "7", "75001": "13"} and plan.prefixes == {"75": "12"}
    assert plan.chute_for("01234") == "7"  # the leading zero is kept
    assert plan.chute_for("75999") == "12" and plan.chute_for("75001") == "13"
    assert plan.chute_for("99999") is None and plan.size == 3
    assert plan.summary() == {"rows": 3, "sha256": plan.sha256[:16]}


def test_every_bad_row_is_named_with_its_line_number():
    errors = errors_of("postcode,chute\n12345,1\n1234,2\n12a45,3\n12345,4\n99999\n88888,\n7*7,5\n12345*,6\n")
    assert errors == [
        "plan.csv:3: postcode '1234' has 4 digits; this site reads 5 (a spreadsheet may have dropped a leading zero)",
        "plan.csv:4: postcode '12a45' must be digits only (leading zeros kept; a spreadsheet may have dropped them)",
        "plan.csv:5: 12345 is listed twice (first on line 2)",
        "plan.csv:6: expected 2 columns (postcode,chute), got 1",
        "plan.csv:7: 88888 has no chute",
        "plan.csv:8: prefix '7*7' must be digits followed by one '*' (e.g. 75*)",
        "plan.csv:9: prefix '12345*' is as long as a whole postcode; list the postcode itself",
    ]


def test_unknown_columns_and_a_missing_header_are_refused():
    assert errors_of("postcode,chute,office\n12345,1,X\n") == [
        "plan.csv:1: header must be exactly postcode,chute, got postcode,chute,office (unknown column(s): office)"]
    assert "header" in errors_of("12345,1\n")[0]
    assert "empty file" in errors_of("")[0]


def test_a_flood_of_bad_rows_stops_at_a_readable_number():
    errors = errors_of("postcode,chute\n" + "abc,1\n" * 500)
    assert len(errors) == MAX_ERRORS + 1 and "stopped after" in errors[-1]


def test_a_missing_file_is_a_plan_error_not_a_crash(tmp_path):
    with pytest.raises(SortPlanError, match="cannot read"):
        load_sort_plan(tmp_path / "nope.csv")


def test_a_large_plan_loads(tmp_path):
    """100,000 rows (every 5-digit code): loads, and is indexed for the decoder. Timing is in benchmarks."""
    path = tmp_path / "plan.csv"
    path.write_text("postcode,chute\n" + "".join(f"{c:05d},{c % 97}\n" for c in range(100_000)))
    plan = load_sort_plan(path)
    assert plan.size == 100_000 and plan.by_length[5].valid_count == 100_000 and len(plan.chutes) == 97


# -- in the running agent -------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


@pytest.fixture(scope="module")
def camera(tmp_path_factory):
    from edge_agent.demo import render_demo_camera

    workdir = tmp_path_factory.mktemp("plan-camera")
    folder = render_demo_camera(workdir / "camera", 6, seed=21)
    return folder, json.loads((workdir / "truth.json").read_text())


def test_hot_reload_while_triggers_flow(tmp_path, mqtt_broker, camera):
    """Plan A sends every postcode on camera to chute A, plan B to chute B. The plan is replaced
    (and then replaced by a broken file) while triggers flow: every trigger gets one answer, and
    each answer's chute is the chute of the plan whose hash it carries."""
    folder, truth = camera
    codes = sorted(set(truth.values()))
    plan_path = tmp_path / "plan.csv"
    plan_a = "postcode,chute\n" + "".join(f"{c},A\n" for c in codes)
    plan_b = "postcode,chute\n" + "".join(f"{c},B\n" for c in codes)
    _write_atomically(plan_path, plan_a)
    sha = {parse_sort_plan(text.encode()).sha256[:16]: chute for text, chute in ((plan_a, "A"), (plan_b, "B"))}
    table = agent_table(tmp_path, mqtt_broker.port, folder, sort_plan={"path": str(plan_path), "acceptance": "spent"},
                        camera={"source": str(folder), "loop": True, "fps": 20.0, "max_frame_age_ms": 2000})
    running = RunningAgent(table)
    plc = plc_for(mqtt_broker.port, watch=(f"{BASE}/events/#",))
    try:
        assert plc.wait_online(30)
        items = []
        for n in range(60):
            item = f"plan-{n}"
            items.append(item)
            plc.trigger(item)
            time.sleep(0.03)
            if n == 20:
                _write_atomically(plan_path, plan_b)
            if n == 40:
                _write_atomically(plan_path, "postcode,chute\n1234,B\n")  # refused: plan B stays
        assert plc.wait_for(lambda c: all(i in c.results() for i in items), 30)
        results = plc.results()
        assert len(results) == len(items)
        seen = set()
        for item in items:
            result = results[item]
            assert result["decided_by"] == "sort_plan"
            plan_sha = result["sort_plan"]["sha256"]
            seen.add(sha[plan_sha])
            if result["chute"] is not None:
                assert result["chute"] == sha[plan_sha], result
            assert len(result["alternatives"]) <= 3
            assert 0.99 <= result["chute_threshold"] <= 0.999  # the bar it was held to
        assert seen == {"A", "B"}
        assert plc.wait_for(lambda c: any(t.endswith("/events/error") and b"sort_plan_invalid" in p
                                          for t, p in c.messages), 10)
        url = f"{running.agent.endpoint.url}/readyz"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        body = json.loads(refused.value.read())
        assert "sort_plan" in body["failing"] and "plan.csv:2" in body["checks"]["sort_plan"]["detail"]
        assert running.agent.reader.plan.sha256[:16] in sha and sha[running.agent.reader.plan.sha256[:16]] == "B"
        bar = running.agent.health()["chute_threshold"]
        assert bar["acceptance"] == "spent" and bar["threshold"] == pytest.approx(0.999)  # 2,000-read window
        assert 0 < bar["reads"] < bar["min_reads"] == 500  # and the new plan started it afresh
        assert "postcode_chute_threshold 0.999" in urllib.request.urlopen(
            f"{running.agent.endpoint.url}/metrics", timeout=5).read().decode()
    finally:
        plc.stop()
        running.stop()


def _agent_on_a_sparse_plan(tmp_path: Path, port: int, camera) -> tuple[Path, list[str], dict]:
    """A plan listing the camera's postcodes, all to chute A (far under 10% of the five-digit
    codes: "auto" spends the target over it); its path, the codes and an agent table using it."""
    folder, truth = camera
    codes = sorted(set(truth.values()))
    plan_path = tmp_path / "plan.csv"
    _write_atomically(plan_path, "postcode,chute\n" + "".join(f"{c},A\n" for c in codes))
    return plan_path, codes, agent_table(tmp_path, port, folder, sort_plan={"path": str(plan_path)})


def test_auto_acceptance_spends_the_target_over_a_sparse_plan_and_holds_a_dense_one_per_item(
        tmp_path, mqtt_broker, camera):
    """The default sort_plan.acceptance, "auto": a plan with a few codes (far under 10% of the
    five-digit codes) is decided on the spent bar; reloaded as region prefixes covering every code,
    the same agent holds every item to the strict bar, and says so in its health and plan events."""
    plan_path, codes, table = _agent_on_a_sparse_plan(tmp_path, mqtt_broker.port, camera)
    running = RunningAgent(table)
    plc = plc_for(mqtt_broker.port, watch=(f"{BASE}/events/#",))
    try:
        assert plc.wait_online(30)
        bar = running.agent.health()["chute_threshold"]
        assert bar["setting"] == "auto" and bar["acceptance"] == "spent" and "min_reads" in bar
        assert running.agent.reader.plan.valid_share == pytest.approx(len(codes) / 100_000)
        _write_atomically(plan_path, "postcode,chute\n" + "".join(f"{d}*,R{d}\n" for d in range(10)))

        def dense_plan_event(client) -> bool:
            return any(t.endswith("/events/sort_plan") and json.loads(p).get("valid_share") == 1.0
                       for t, p in client.messages)

        assert plc.wait_for(dense_plan_event, 20)
        event = next(json.loads(p) for t, p in plc.messages
                     if t.endswith("/events/sort_plan") and json.loads(p).get("valid_share") == 1.0)
        assert event["acceptance"] == "per_item"
        bar = running.agent.health()["chute_threshold"]
        assert bar == {"threshold": pytest.approx(0.999), "acceptance": "per_item", "setting": "auto"}
        plc.trigger("dense-1")
        assert plc.wait_for(lambda c: "dense-1" in c.results(), 20)
        result = plc.results()["dense-1"]
        assert result["decided_by"] == "sort_plan" and result["chute_threshold"] == pytest.approx(0.999)
        assert running.agent.reader.budget.reads() == 0  # a dense plan's reads never feed the spent bar
    finally:
        plc.stop()
        running.stop()


def test_the_spent_bar_survives_a_restart_for_the_same_model_and_plan_only(tmp_path, mqtt_broker, camera, caplog):
    """A restart does not send the line back to the strict bar for the next 500 reads: the chute
    posteriors the bar rests on are kept beside the outbox and taken back at start, for the same
    model, plan and prior only. A damaged file is reported and ignored; the agent reads on."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    plan_path, codes, table = _agent_on_a_sparse_plan(tmp_path, mqtt_broker.port, camera)
    kept = tmp_path / "state" / "chute-bar.json"
    assert Path(table["outbox"]["path"]).parent == kept.parent

    def run(items: list[str]) -> tuple[dict, dict]:
        """Start an agent, note its bar, answer ``items``, stop; the bar at start and at the end."""
        running = RunningAgent(table)
        plc = plc_for(mqtt_broker.port)
        try:
            assert plc.wait_online(30)
            at_start = running.agent.health()["chute_threshold"]
            for item in items:
                plc.trigger(item)
                time.sleep(0.05)
            assert plc.wait_for(lambda c: all(i in c.results() for i in items), 30)
            return at_start, running.agent.health()["chute_threshold"]
        finally:
            plc.stop()
            running.stop()

    first_start, first_end = run([f"bar-{n}" for n in range(8)])
    assert first_start["acceptance"] == "spent" and first_start["reads"] == 0
    assert first_end["reads"] >= 1  # the reads that found a chute (most of the 8)
    assert json.loads(kept.read_text())["key"]["plan_sha256"] == parse_sort_plan(plan_path.read_bytes()).sha256
    second_start, second_end = run(["bar-again"])
    assert second_start["reads"] == first_end["reads"]  # taken back before the first trigger
    assert first_end["reads"] <= second_end["reads"] <= first_end["reads"] + 1
    assert "chute bar restored" in caplog.text
    # Another plan: the posteriors meant something else, so its bar starts afresh.
    _write_atomically(plan_path, "postcode,chute\n" + "".join(f"{c},B\n" for c in codes))
    third_start, _ = run([])
    assert third_start["reads"] == 0
    kept.write_text("{not json")
    caplog.clear()
    fourth_start, _ = run(["after-damage"])
    assert fourth_start["reads"] == 0
    assert "ignoring the kept chute bar" in caplog.text and "not JSON" in caplog.text
