"""Outbox: durability, order, bounds, expiry, retention, audit trail, corrupt files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.outbox import WAL_BACKSTOP_PAGES, MessageState, Outbox, OutboxError
from edge_agent.types import Reason

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def audit_for(n: int) -> dict[str, object]:
    return {"result_id": f"r{n}", "item_id": f"item{n}", "image_sha256": "ab" * 32, "model_version": "m1",
            "scores": [0.9, 0.8], "decision": "accept"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", clock=clock, max_pending=100, retention_s=3600)
    yield box
    box.close()


def test_added_message_is_pending_with_its_fields(outbox: Outbox, clock: FakeClock) -> None:
    mid = outbox.add("postcode/result", b'{"a": 1}', 1, clock.now + 30, audit_for(1), correlation_data=b"\x00\x01")
    [msg] = outbox.pending(10)
    assert (msg.id, msg.topic, msg.payload, msg.qos) == (mid, "postcode/result", b'{"a": 1}', 1)
    assert msg.expires_at == clock.now + 30
    assert msg.created_at == clock.now
    assert msg.attempts == 0
    assert msg.correlation_data == b"\x00\x01"
    assert outbox.stats() == {"pending": 1, "added": 1, "delivered": 0, "dropped": 0, "expired": 0}


def test_pending_is_oldest_first_and_limited(outbox: Outbox) -> None:
    ids = [outbox.add("t", str(i).encode(), 1, None, audit_for(i)) for i in range(5)]
    assert [m.id for m in outbox.pending(3)] == ids[:3]
    assert [m.payload for m in outbox.pending(10)] == [str(i).encode() for i in range(5)]


def test_result_survives_reopening_the_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, clock=clock)
    mid = box.add("t", b"x", 1, None, audit_for(1))
    box.record_attempt(mid)
    box.close()
    again = Outbox(path, clock=clock)
    [msg] = again.pending(10)
    assert (msg.id, msg.payload, msg.attempts) == (mid, b"x", 1)
    again.close()


def test_mark_delivered_once(outbox: Outbox, clock: FakeClock) -> None:
    mid = outbox.add("t", b"x", 1, None, audit_for(1))
    clock.advance(2)
    assert outbox.mark_delivered(mid) is True
    assert outbox.mark_delivered(mid) is False
    assert outbox.pending(10) == []
    assert outbox.state(mid) is MessageState.DELIVERED
    [record] = outbox.audit("item1")
    assert record.delivered_at == clock.now
    assert outbox.stats()["delivered"] == 1


def test_full_outbox_drops_the_oldest_and_counts(tmp_path: Path, clock: FakeClock) -> None:
    box = Outbox(tmp_path / "o.db", clock=clock, max_pending=3)
    ids = [box.add("t", str(i).encode(), 1, None, audit_for(i)) for i in range(5)]
    assert [m.id for m in box.pending(10)] == ids[2:]
    assert box.stats() == {"pending": 3, "added": 5, "delivered": 0, "dropped": 2, "expired": 0}
    assert [box.state(i) for i in ids[:2]] == [MessageState.DROPPED] * 2
    # The audit trail keeps what was dropped, for tracing the envelope.
    assert box.audit("item0")[0].state is MessageState.DROPPED
    box.close()


def test_late_ack_for_a_dropped_message_counts_as_delivered(tmp_path: Path, clock: FakeClock) -> None:
    box = Outbox(tmp_path / "o.db", clock=clock, max_pending=1)
    first = box.add("t", b"1", 1, None, audit_for(1))
    box.add("t", b"2", 1, None, audit_for(2))
    assert box.state(first) is MessageState.DROPPED
    assert box.mark_delivered(first) is True
    assert box.stats() == {"pending": 1, "added": 2, "delivered": 1, "dropped": 0, "expired": 0}
    box.close()


def test_late_ack_for_an_expired_message_counts_as_delivered(outbox: Outbox, clock: FakeClock) -> None:
    mid = outbox.add("t", b"1", 1, clock.now + 1, audit_for(1))
    clock.advance(5)
    assert outbox.expire_due() == [mid]
    assert outbox.mark_delivered(mid) is True
    assert outbox.stats() == {"pending": 0, "added": 1, "delivered": 1, "dropped": 0, "expired": 0}


def test_marking_many_delivered_moves_each_state_once(tmp_path: Path, clock: FakeClock) -> None:
    """One batch of PUBACKs holding pending, dropped, expired, already delivered, unknown and
    repeated ids: each message moves to delivered once and the totals stay balanced."""
    box = Outbox(tmp_path / "o.db", clock=clock, max_pending=3)
    dropped = box.add("t", b"d", 1, None, audit_for(0))
    expired = box.add("t", b"e", 1, clock.now + 1, audit_for(1))
    done = box.add("t", b"x", 1, None, audit_for(2))
    pending = box.add("t", b"p", 1, None, audit_for(3))
    assert box.state(dropped) is MessageState.DROPPED
    clock.advance(5)
    assert box.expire_due() == [expired]
    assert box.mark_delivered(done) is True
    batch = [pending, dropped, expired, done, 999_999, pending] + [box.add("t", b"n", 1, None, audit_for(9))] * 600
    assert box.mark_delivered_many(batch) == 4
    stats = box.stats()
    assert stats == {"pending": 0, "added": 5, "delivered": 5, "dropped": 0, "expired": 0}
    assert all(box.state(i) is MessageState.DELIVERED for i in (pending, dropped, expired, done))
    box.close()


def test_expire_due_respects_deadline_and_exclusions(outbox: Outbox, clock: FakeClock) -> None:
    soon = outbox.add("t", b"soon", 1, clock.now + 5, audit_for(1))
    later = outbox.add("t", b"later", 1, clock.now + 50, audit_for(2))
    never = outbox.add("t", b"never", 1, None, audit_for(3))
    in_flight = outbox.add("t", b"flight", 1, clock.now + 5, audit_for(4))
    assert outbox.expire_due() == []
    clock.advance(10)
    assert outbox.expire_due(exclude={in_flight}) == [soon]
    assert [m.id for m in outbox.pending(10)] == [later, never, in_flight]
    assert outbox.mark_expired(in_flight) is True
    assert outbox.mark_expired(in_flight) is False
    assert outbox.stats()["expired"] == 2


def test_delivered_gives_only_delivered_unexpired_messages_oldest_first(outbox: Outbox, clock: FakeClock) -> None:
    """What the link sends again after a broker may have lost what it acknowledged."""
    ids = [outbox.add("t", str(i).encode(), 1, clock.now + (5 if i == 1 else 50), audit_for(i), correlation_data=b"c")
           for i in range(4)]
    outbox.mark_delivered_many(ids[:3])  # ids[3] stays pending: the normal delivery sends it
    clock.advance(10)  # ids[1] expires: a sorter has no use for it any more
    again = outbox.delivered(reversed(ids + [999]))
    assert [(m.id, m.payload, m.correlation_data) for m in again] == [(ids[0], b"0", b"c"), (ids[2], b"2", b"c")]
    assert outbox.delivered([]) == []
    many = [outbox.add("t", b"x", 1, None, audit_for(9)) for _ in range(1200)]  # more ids than one query takes
    outbox.mark_delivered_many(many)
    assert [m.id for m in outbox.delivered(many)] == many


def test_an_outbox_never_closed_is_known_at_the_next_open(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    first = Outbox(path, clock=clock)
    assert first.ended_uncleanly is False  # a new outbox
    first.close()
    clean = Outbox(path, clock=clock)
    assert clean.ended_uncleanly is False
    # Not closed, as after kill -9 or a power cut: the next process to open it is told.
    crashed = Outbox(path, clock=clock)
    assert crashed.ended_uncleanly is True
    crashed.close()
    clean.close()


def test_last_delivered_ids_counts_back_from_the_last_delivery(outbox: Outbox, clock: FakeClock) -> None:
    assert outbox.last_delivered_ids(15) == []
    early = outbox.add("t", b"a", 1, None, audit_for(1))
    outbox.mark_delivered(early)
    clock.advance(100)
    recent = [outbox.add("t", b"b", 1, None, audit_for(n)) for n in (2, 3)]
    outbox.mark_delivered(recent[0])
    clock.advance(10)
    outbox.mark_delivered(recent[1])
    pending = outbox.add("t", b"c", 1, None, audit_for(4))  # never delivered: the normal delivery sends it
    clock.advance(3600)  # the agent was down an hour: still counted from the last delivery
    assert outbox.last_delivered_ids(15) == recent
    assert outbox.last_delivered_ids(5) == recent[1:]
    assert pending not in outbox.last_delivered_ids(1e6)


def test_prune_keeps_pending_and_recent_rows(outbox: Outbox, clock: FakeClock) -> None:
    old_delivered = outbox.add("t", b"1", 1, None, audit_for(1))
    outbox.mark_delivered(old_delivered)
    still_pending = outbox.add("t", b"2", 1, None, audit_for(2))
    clock.advance(3000)
    recent = outbox.add("t", b"3", 1, None, audit_for(3))
    outbox.mark_delivered(recent)
    clock.advance(1000)  # old_delivered is now 4000 s old, past the 3600 s retention
    assert outbox.prune() == 1
    assert outbox.state(old_delivered) is None
    assert outbox.state(still_pending) is MessageState.PENDING
    assert outbox.state(recent) is MessageState.DELIVERED
    # Totals are counters: pruning the trail does not rewrite history.
    assert outbox.stats()["delivered"] == 2


def test_audit_trail_for_an_item(outbox: Outbox, clock: FakeClock) -> None:
    audit = audit_for(7)
    result = outbox.add("postcode/result", b"x", 1, None, audit)
    reply = outbox.add("plc/reply", b"x", 1, None, audit, correlation_data=b"c")
    outbox.mark_delivered(result)
    records = outbox.audit("item7")
    assert [r.message_id for r in records] == [result, reply]
    assert [r.topic for r in records] == ["postcode/result", "plc/reply"]
    assert records[0].result_id == "r7"
    assert records[0].audit == audit
    assert records[0].state is MessageState.DELIVERED and records[1].state is MessageState.PENDING
    assert outbox.audit("unknown") == []


def test_listener_is_called_after_each_add(outbox: Outbox) -> None:
    calls: list[int] = []
    outbox.add_listener(lambda: calls.append(outbox.stats()["pending"]))
    outbox.add("t", b"x", 1, None, audit_for(1))
    assert calls == [1]  # called after the commit: the row is already visible


def test_invalid_arguments_are_refused(outbox: Outbox, tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        outbox.add("t", b"x", 3, None, {})
    with pytest.raises(ValueError):
        outbox.add("", b"x", 1, None, {})
    with pytest.raises(ValueError):
        outbox.add("t", b"x", 1, None, {"bad": {1, 2}})
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", clock=clock, max_pending=0)
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", clock=clock, synchronous="OFF")


def test_garbage_file_gives_an_actionable_error(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(OutboxError) as excinfo:
        Outbox(path, clock=clock)
    message = str(excinfo.value)
    assert str(path) in message
    assert "corrupt" in message and "move the file" in message


def test_damaged_outbox_gives_an_actionable_error(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, clock=clock)
    for i in range(300):
        box.add("t", os.urandom(200), 1, None, audit_for(i))
    box.close()
    with sqlite3.connect(path) as conn:  # fold the WAL into the main file before damaging it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page:6 * page] = b"\xff" * (4 * page)  # scribble over table and index pages
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match="corrupt"):
        Outbox(path, clock=clock)


def test_foreign_sqlite_database_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(OutboxError, match="not an outbox"):
        Outbox(path, clock=clock)


def test_newer_schema_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path, clock=clock).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path, clock=clock)


def test_closed_outbox_raises_outbox_error(tmp_path: Path, clock: FakeClock) -> None:
    box = Outbox(tmp_path / "o.db", clock=clock)
    box.close()
    with pytest.raises(OutboxError):
        box.add("t", b"x", 1, None, {})
    with pytest.raises(OutboxError):
        box.pending()


def test_concurrent_writers_and_deliverer(tmp_path: Path, clock: FakeClock) -> None:
    outbox = Outbox(tmp_path / "o.db", clock=clock, max_pending=1000)
    ids: list[int] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(50):
            mid = outbox.add("t", f"{w}-{i}".encode(), 1, None, audit_for(i))
            with lock:
                ids.append(mid)

    def deliverer() -> None:
        for _ in range(200):
            for msg in outbox.pending(5):
                outbox.mark_delivered(msg.id)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)] + [threading.Thread(target=deliverer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 200
    stats = outbox.stats()
    assert stats["added"] == 200
    assert stats["pending"] + stats["delivered"] == 200
    outbox.close()


_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from edge_agent.outbox import Outbox

class Clock:
    def time(self): return 1.0
    def monotonic(self): return 1.0

box = Outbox(sys.argv[2], clock=Clock())
for i in range(int(sys.argv[3])):
    box.add("t", str(i).encode(), 1, None, {"item_id": str(i)})
print("stored", flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_results_survive_kill_minus_9(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.db"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(path), "40"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"stored"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    box = Outbox(path, clock=clock)
    assert [m.payload for m in box.pending(100)] == [str(i).encode() for i in range(40)]
    box.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(["add", "deliver", "late_ack", "expire", "tick", "prune"]), max_size=60),
       max_pending=st.integers(1, 6))
def test_totals_always_add_up(tmp_path: Path, ops: list[str], max_pending: int) -> None:
    clock = FakeClock()
    path = tmp_path / f"prop-{os.getpid()}-{id(ops)}.db"
    box = Outbox(path, clock=clock, max_pending=max_pending, retention_s=5)
    try:
        for op in ops:
            if op == "add":
                box.add("t", b"x", 1, clock.now + 3, {})
            elif op == "deliver" and (pending := box.pending(1)):
                box.mark_delivered(pending[0].id)
            elif op == "late_ack":  # a PUBACK for whatever was stored first, in any state
                box.mark_delivered(1)
            elif op == "expire":
                box.expire_due()
            elif op == "tick":
                clock.advance(2)
            elif op == "prune":
                box.prune()
            s = box.stats()
            assert s["added"] == s["pending"] + s["delivered"] + s["dropped"] + s["expired"]
            assert s["pending"] <= max_pending
            pending_ids = [m.id for m in box.pending(100)]
            assert pending_ids == sorted(pending_ids)
    finally:
        box.close()
        for suffix in ("", "-wal", "-shm", ".instance"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_audit_json_round_trips_numpy_and_enums(outbox: Outbox) -> None:
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    audit = {"item_id": "a", "scores": scores, "top": np.float32(0.75),
             "decision": {"accepted": False, "reason": Reason.LOW_CONFIDENCE}}
    outbox.add("t", b"x", 1, None, audit)
    [record] = outbox.audit("a")
    assert record.audit == {"item_id": "a", "scores": [[0.25, 0.75]], "top": 0.75,
                            "decision": {"accepted": False, "reason": "low_confidence"}}


# -- the trigger journal -------------------------------------------------------------

from edge_agent.outbox import Answer, JournalOutcome, OutgoingMessage  # noqa: E402
from edge_agent.types import Trigger  # noqa: E402

RESULTS = "postcode/s/l/result"


def trig(item: str, at: float, **kw: object) -> Trigger:
    return Trigger(item_id=item, received_at=at, deadline=at + 1.5, **kw)  # type: ignore[arg-type]


def answer_for(journal_id: int | None, item: str, result_id: str, accepted: bool = True) -> Answer:
    payload = f'{{"result_id": "{result_id}", "item_id": "{item}"}}'.encode()
    messages = [OutgoingMessage(RESULTS, payload, 1, None)]
    if not accepted:
        messages.append(OutgoingMessage("postcode/s/l/review", payload))
    return Answer(journal_id, result_id, item, tuple(messages), {"result_id": result_id, "item_id": item})


def test_journaled_trigger_stays_open_until_its_answer_is_stored(outbox: Outbox, clock: FakeClock) -> None:
    [j] = outbox.journal_triggers([trig("A", clock.now, response_topic="plc/r", correlation_data=b"\x01")],
                                  3600, RESULTS)
    assert j.outcome is JournalOutcome.NEW
    [open_one] = outbox.open_triggers()
    assert open_one.journal_id == j.journal_id
    assert (open_one.trigger.item_id, open_one.trigger.response_topic, open_one.trigger.correlation_data,
            open_one.trigger.deadline) == ("A", "plc/r", b"\x01", clock.now + 1.5)
    [ids] = outbox.record_answers([answer_for(j.journal_id, "A", "r-A", accepted=False)])
    assert len(ids) == 2 and outbox.open_triggers() == []
    assert outbox.journal_stats() == {"open": 0, "answered": 1}
    assert outbox.answered_result_id("A") == "r-A"


def test_a_repeated_item_gets_its_stored_answer_not_a_new_read(outbox: Outbox, clock: FakeClock) -> None:
    [j] = outbox.journal_triggers([trig("A", clock.now)], 3600, RESULTS)
    # Asked again while the first is still being answered: covered by that answer.
    [again] = outbox.journal_triggers([trig("A", clock.now)], 3600, RESULTS)
    assert again.outcome is JournalOutcome.IN_PROGRESS
    outbox.record_answers([answer_for(j.journal_id, "A", "r-A")])
    clock.advance(60)
    [later] = outbox.journal_triggers([trig("A", clock.now)], 3600, RESULTS)
    assert later.outcome is JournalOutcome.ANSWERED and b'"r-A"' in later.earlier_answer
    clock.advance(3600)  # outside the dedup window: a new envelope with a reused number
    [much_later] = outbox.journal_triggers([trig("A", clock.now)], 3600, RESULTS)
    assert much_later.outcome is JournalOutcome.NEW


def test_the_same_item_twice_in_one_batch_is_journaled_once(outbox: Outbox, clock: FakeClock) -> None:
    outcomes = outbox.journal_triggers([trig("B", clock.now), trig("B", clock.now)], 3600, RESULTS)
    assert [o.outcome for o in outcomes] == [JournalOutcome.NEW, JournalOutcome.IN_PROGRESS]
    assert len(outbox.open_triggers()) == 1


def test_open_triggers_survive_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    box = Outbox(tmp_path / "o.db", clock=clock)
    box.journal_triggers([trig(f"I{i}", clock.now) for i in range(3)], 3600, RESULTS)
    box.close()
    box = Outbox(tmp_path / "o.db", clock=clock)
    assert [o.trigger.item_id for o in box.open_triggers()] == ["I0", "I1", "I2"]
    box.close()


def test_outbox_and_journal_files_are_owner_only(tmp_path: Path, clock: FakeClock) -> None:
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "state" / "o.db", clock=clock)
        box.add("t", b"x", 1, None, audit_for(1))
        # SQLite gives its -wal and -shm files the database file's mode.
        for path in (tmp_path / "state" / "o.db", tmp_path / "state" / "o.db.instance",
                     tmp_path / "state" / "o.db-wal", tmp_path / "state" / "o.db-shm"):
            assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)
        box.close()
    finally:
        os.umask(old)


def test_an_emptied_outbox_is_refused_unless_starting_afresh(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, clock=clock)
    box.add("t", b"pending result", 1, None, audit_for(1))
    box.close()
    path.write_bytes(b"")  # truncated: SQLite alone would silently start a new, empty database
    with pytest.raises(OutboxError, match="is empty.*--start-fresh"):
        Outbox(path, clock=clock)
    box = Outbox(path, clock=clock, start_fresh=True)
    assert box.stats()["pending"] == 0
    box.close()
    assert list(tmp_path.glob("o.db.empty-*"))  # the empty file was kept aside, not deleted


def test_a_deleted_outbox_is_refused_while_its_marker_remains(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "o.db"
    Outbox(path, clock=clock).close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(OutboxError, match="is missing"):
        Outbox(path, clock=clock)
    Outbox(path, clock=clock, start_fresh=True).close()


def test_a_replaced_outbox_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    Outbox(tmp_path / "a.db", clock=clock).close()
    Outbox(tmp_path / "b.db", clock=clock).close()
    (tmp_path / "b.db").replace(tmp_path / "a.db")  # another database under the old name
    with pytest.raises(OutboxError, match="not the database an earlier run used"):
        Outbox(tmp_path / "a.db", clock=clock)


def test_schema_1_outbox_is_upgraded_in_place(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "v1.db"
    box = Outbox(path, clock=clock)
    box.add("t", b"kept", 1, None, audit_for(1))
    box.close()
    with sqlite3.connect(path) as conn:  # what a release before the journal left behind
        conn.execute("DROP TABLE triggers")
        conn.execute("DROP TABLE meta")
        conn.execute("PRAGMA user_version = 1")
    Path(f"{path}.instance").unlink()
    box = Outbox(path, clock=clock)
    assert [m.payload for m in box.pending(10)] == [b"kept"]
    assert box.journal_triggers([trig("X", clock.now)], 3600, RESULTS)[0].outcome is JournalOutcome.NEW
    box.close()


def test_checkpoints_run_off_the_writers_and_a_backstop_bounds_the_wal(tmp_path: Path, clock: FakeClock) -> None:
    """The WAL goes into the database from checkpoint()'s own connection (PASSIVE: no writer waits
    on its fsync); inside a commit SQLite checkpoints only past WAL_BACKSTOP_PAGES."""
    box = Outbox(tmp_path / "outbox.db", clock=clock, max_pending=10_000)
    try:
        assert box._read("PRAGMA wal_autocheckpoint")[0][0] == WAL_BACKSTOP_PAGES
        for n in range(200):
            box.add("t", b"x" * 1000, audit=audit_for(n))
        wal = tmp_path / "outbox.db-wal"
        assert wal.stat().st_size > 100 * 4096  # 200 answers, no checkpoint inside a commit
        frames, copied = box.checkpoint()
        assert frames > 100 and copied == frames  # nothing was writing: all of it copied
        box.add("t", b"after", audit=audit_for(999))  # a writer after a whole checkpoint rewinds the WAL
        assert box.checkpoint()[0] < frames
        # Written by one connection, checkpointed by another: the data is whole on reopening.
        assert box.stats()["pending"] == 201
    finally:
        box.close()
    assert box.checkpoint() is None  # closed: nothing to do, nothing raised
    with Outbox(tmp_path / "outbox.db", clock=clock) as reopened:
        assert reopened.stats()["pending"] == 201
