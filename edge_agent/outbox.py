"""Durable outbox and audit trail: every result is stored here before it is published.

A row is written (and committed) before the MQTT adapter sees it and is marked
delivered only when the broker acknowledged it, so a crash, a broker outage or a
network cut delays results but never loses them. Rows that were delivered,
expired or dropped stay for ``retention_s`` as the audit trail used to trace a
mis-sorted item back to its image, model and scores.

The same database journals every trigger before the broker is told it arrived
(``journal_triggers``), and an item's answer is stored in the same transaction
that closes its journal row (``record_answers``): after any crash, every trigger
the broker handed over has either its stored answer or an open row to answer.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .types import Clock, Trigger

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# SQLite still checkpoints inside a commit past this many WAL pages (4 KB each): the bound on the
# WAL when Outbox.checkpoint() cannot finish between a steady stream's writes.
WAL_BACKSTOP_PAGES = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    -- AUTOINCREMENT: ids are never reused after a prune, so "oldest first" is
    -- simply "lowest id first" and an id in a log line names one result forever.
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    topic            TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    qos              INTEGER NOT NULL,
    correlation_data BLOB,
    expires_at       REAL,
    created_at       REAL    NOT NULL,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    finished_at      REAL,
    result_id        TEXT,
    item_id          TEXT,
    audit            TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_state_id ON messages (state, id);
CREATE INDEX IF NOT EXISTS messages_item_id ON messages (item_id);
CREATE INDEX IF NOT EXISTS messages_finished_at ON messages (finished_at);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Every trigger taken in, written before its PUBACK; "open" until its answer is stored.
CREATE TABLE IF NOT EXISTS triggers (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id          TEXT    NOT NULL,
    received_at      REAL    NOT NULL,
    triggered_at     REAL,
    deadline         REAL    NOT NULL,
    response_topic   TEXT,
    correlation_data BLOB,
    stale            TEXT,
    state            TEXT    NOT NULL,
    result_id        TEXT,
    answered_at      REAL
);
CREATE INDEX IF NOT EXISTS triggers_item ON triggers (item_id, id);
CREATE INDEX IF NOT EXISTS triggers_state ON triggers (state, id);
CREATE INDEX IF NOT EXISTS messages_result_id ON messages (result_id);
-- instance_id: matched against the marker file beside the database, so a database that
-- vanished or was replaced by an empty one is noticed instead of silently recreated.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# meta 'open': '1' while a process has the outbox open, '0' once it closed it cleanly.
_SET_OPEN_FLAG = "INSERT OR REPLACE INTO meta (key, value) VALUES ('open', ?)"

TRIGGER_OPEN = "open"
TRIGGER_ANSWERED = "answered"

_COUNTERS = ("added", "delivered", "dropped", "expired")
# SQLite allows 32,766 parameters per statement (999 before 3.32): ids are looked up in chunks.
_IDS_PER_QUERY = 500


def _json_default(value: Any) -> Any:
    """JSON for the values an audit record carries besides plain ones: numpy scores, enums."""
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy here
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class OutboxError(Exception):
    """The outbox database cannot be opened or written; the message says what to do."""


class MessageState(str, enum.Enum):
    """Where a stored message is in its life."""

    PENDING = "pending"  # stored, not yet acknowledged by the broker
    DELIVERED = "delivered"  # the broker acknowledged it (QoS 1 PUBACK)
    EXPIRED = "expired"  # its deadline passed before it could be delivered
    DROPPED = "dropped"  # evicted, oldest first, because the outbox was full


@dataclass(frozen=True)
class OutboxMessage:
    """One message waiting for delivery, as the delivery loop needs it."""

    id: int
    topic: str
    payload: bytes
    qos: int
    expires_at: float | None
    created_at: float
    attempts: int
    correlation_data: bytes | None = None  # MQTT v5 reply to a trigger that asked for one


class JournalOutcome(str, enum.Enum):
    """What taking a trigger into the journal found."""

    NEW = "new"  # journaled: read it and answer it
    ANSWERED = "answered"  # the item was answered within the dedup window: send that answer again
    IN_PROGRESS = "in_progress"  # the item's earlier trigger is still open: its answer covers this one


@dataclass(frozen=True)
class Journaled:
    outcome: JournalOutcome
    journal_id: int | None = None
    earlier_answer: bytes | None = None  # the stored result payload, for ANSWERED


@dataclass(frozen=True)
class OpenTrigger:
    """A journaled trigger with no stored answer (found at start-up after a crash)."""

    journal_id: int
    trigger: Trigger


@dataclass(frozen=True)
class OutgoingMessage:
    topic: str
    payload: bytes
    qos: int = 1
    expires_at: float | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Answer:
    """One item's answer: its messages (result, reply, review) and the journal row it closes."""

    journal_id: int | None
    result_id: str | None
    item_id: str | None
    messages: tuple[OutgoingMessage, ...]
    audit: Mapping[str, Any]


@dataclass(frozen=True)
class AuditRecord:
    """What happened to one stored message: for tracing a mis-sort back to its read."""

    message_id: int
    topic: str
    state: MessageState
    result_id: str | None
    item_id: str | None
    created_at: float
    finished_at: float | None
    attempts: int
    audit: dict[str, Any] = field(default_factory=dict)  # image_sha256, model_version, scores, decision, ...

    @property
    def delivered_at(self) -> float | None:
        """When the broker acknowledged the message, or None if it never did."""
        return self.finished_at if self.state is MessageState.DELIVERED else None


class Outbox:
    """SQLite outbox (WAL) shared by the pipeline (writer) and the MQTT delivery loop.

    Thread-safe: one connection guarded by a lock for every read and write. Writes are tiny
    (one row per envelope) so a single serialised connection is far from a bottleneck and
    avoids SQLite's busy/retry dance between connections of one process. The only other
    connection is checkpoint()'s, whose PASSIVE checkpoints never wait for the writer.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock,
        max_pending: int = 10_000,
        retention_s: float = 7 * 86_400.0,
        synchronous: str = "NORMAL",
        start_fresh: bool = False,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if retention_s < 0:
            raise ValueError(f"retention_s must not be negative, got {retention_s}")
        synchronous = synchronous.upper()
        # NORMAL is the default. In WAL mode a commit under NORMAL has been written to
        # the WAL file (the OS page cache) before add() returns, so it survives kill -9,
        # an OOM kill or a crash of the agent: the cases we see in the field. Only a
        # power cut or kernel crash can roll back the last few commits (the database
        # stays consistent), and then the sorting line is down too: the items under the
        # camera are re-fed or go to the manual bin when the PLC gets no answer. FULL
        # closes that gap at one fsync per envelope, which on SD/eMMC storage costs
        # milliseconds and flash wear; sites without a UPS that want it can ask for it.
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.max_pending = max_pending
        self.retention_s = retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._closed = False
        self._marked_open = False  # set by _mark_open: only then does close() record a clean end
        self._listeners: list[Callable[[], None]] = []
        self.marker = self.path.with_name(self.path.name + ".instance")
        self._check_continuity(start_fresh)
        self._conn = self._open(synchronous)
        self._bind_instance()
        # Whether the process that had this outbox before never closed it (killed, crashed, power
        # cut): the broker may have died with it, forgetting results it had acknowledged.
        self.ended_uncleanly = self._mark_open()

    # ------------------------------------------------------------------ opening

    def _open(self, synchronous: str) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the outbox folder {self.path.parent}: {exc}") from exc
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so every write
            # is exactly one explicit transaction.
            if not self.path.exists():
                # Owner-only from the first byte: the audit trail names items and their reads.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("outbox %s: journal_mode is %s, not wal (filesystem without shared memory?)",
                            self.path, mode)
            conn.execute(f"PRAGMA synchronous={synchronous}")
            # A checkpoint (WAL into the database, then fsync) costs the committing thread 5-8 ms
            # here; SQLite's default runs one inside the commit that passes 1,000 WAL pages, about
            # every 50th envelope. checkpoint() does them off the hot path; this is only the
            # backstop that bounds the WAL (16 MB) when a steady stream never leaves it a gap.
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxError(self._corrupt_message(f"integrity check failed: {check}"))
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version == 0 and tables - {"sqlite_sequence"}:
                raise OutboxError(self._corrupt_message(
                    f"it is an SQLite database but not an outbox (tables: {', '.join(sorted(tables))})"))
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox {self.path} has schema version {version}, newer than this agent's "
                    f"{SCHEMA_VERSION}: it was written by a newer release; upgrade the agent or move the file aside")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            for name in _COUNTERS:
                conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (name,))
        except OutboxError:
            if conn is not None:
                conn.close()
            raise
        except sqlite3.OperationalError as exc:
            if conn is not None:
                conn.close()
            if "locked" in str(exc):
                raise OutboxError(
                    f"outbox {self.path} is locked by another process ({exc}); "
                    "is a second agent running on the same data folder?") from exc
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            raise OutboxError(self._corrupt_message(str(exc))) from exc
        pending = conn.execute("SELECT COUNT(*) FROM messages WHERE state = ?",
                               (MessageState.PENDING.value,)).fetchone()[0]
        log.info("outbox %s open: %d pending from before, synchronous=%s", self.path, pending, synchronous)
        return conn

    def _check_continuity(self, start_fresh: bool) -> None:
        """Refuse to start on a missing or empty database where an earlier run kept state.

        SQLite would happily create a new database in place of a deleted or truncated one:
        every pending result and the whole audit trail would be gone without a word.
        """
        empty = self.path.exists() and self.path.is_file() and self.path.stat().st_size == 0
        missing = not self.path.exists() and self.marker.exists()
        if not (empty or missing):
            return
        what = "is empty (0 bytes)" if empty else "is missing"
        if not start_fresh:
            raise OutboxError(
                f"outbox {self.path} {what}, but an earlier run kept its state there ({self.marker}): "
                "pending results and the audit trail would be lost. Restore the file, or start the agent "
                "with --start-fresh to begin a new outbox on purpose")
        log.warning("outbox %s %s; starting a new one as asked (--start-fresh)", self.path, what)
        if empty:
            aside = self.path.with_name(f"{self.path.name}.empty-{int(self._clock.time())}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                extra = self.path.with_name(self.path.name + suffix)
                if extra.exists():
                    extra.rename(aside.with_name(aside.name + suffix))
        self.marker.unlink(missing_ok=True)

    def _bind_instance(self) -> None:
        """Tie the database and its marker file together (see _check_continuity)."""
        row = self._read("SELECT value FROM meta WHERE key = 'instance_id'")
        if row:
            instance = str(row[0][0])
        else:
            instance = uuid.uuid4().hex
            with self._tx("naming the outbox") as conn:
                conn.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (instance,))
        recorded = self.marker.read_text().strip() if self.marker.exists() else None
        if recorded is not None and recorded != instance:
            self.close()
            raise OutboxError(
                f"outbox {self.path} is not the database an earlier run used (its marker {self.marker} "
                f"names another): was the file replaced? Restore it, or move {self.marker} aside to accept "
                "this database")
        if recorded is None:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(instance + "\n")

    def _mark_open(self) -> bool:
        """Record that a process has the outbox open (close() records the end); True if the last one never did."""
        with self._tx("marking the outbox open") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'open'").fetchone()
            conn.execute(_SET_OPEN_FLAG, ("1",))
        self._marked_open = True
        return row is not None and row[0] == "1"

    def _corrupt_message(self, detail: str) -> str:
        return (f"outbox database {self.path} is corrupt or not an outbox ({detail}). "
                f"Stop the agent, move the file (and any -wal/-shm files beside it) aside "
                f"to keep its audit trail, then start the agent again to create a new one")

    @contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; SQLite errors become OutboxError."""
        with self._lock:
            try:
                # IMMEDIATE takes the write lock up front, so a concurrent reader in
                # another process cannot make us fail half-way through.
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {what} failed: {exc} "
                                  "(disk full or failing storage?)") from exc

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: read failed: {exc}") from exc

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    # ------------------------------------------------------------------ writing

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each committed add (the delivery loop's wake-up)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Undo ``add_listener`` (a stopped delivery loop no longer needs waking)."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def add(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        expires_at: float | None = None,
        audit: Mapping[str, Any] | None = None,
        *,
        correlation_data: bytes | None = None,
    ) -> int:
        """Store one message durably and return its id; when full, the oldest pending are dropped."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if not topic:
            raise ValueError("topic must not be empty")
        audit_dict = dict(audit or {})
        result_id, item_id = audit_dict.get("result_id"), audit_dict.get("item_id")
        answer = Answer(None, None if result_id is None else str(result_id), None if item_id is None else str(item_id),
                        (OutgoingMessage(topic, payload, qos, expires_at, correlation_data),), audit_dict)
        return self.record_answers([answer])[0][0]

    def journal_triggers(self, triggers: Iterable[Trigger], dedup_window_s: float,
                         results_topic: str) -> list[Journaled]:
        """Journal triggers in one transaction (call before acknowledging them to the broker).

        A trigger whose item_id was answered within ``dedup_window_s`` is not journaled
        again: the caller sends the earlier answer (same result_id). One whose earlier
        trigger is still open is covered by that trigger's answer.
        """
        now = self._clock.time()
        outcomes: list[Journaled] = []
        with self._tx("journaling triggers") as conn:
            for t in triggers:
                row = conn.execute("SELECT id, state, result_id, answered_at FROM triggers WHERE item_id = ?"
                                   " ORDER BY id DESC LIMIT 1", (t.item_id,)).fetchone()
                if row is not None and row[1] == TRIGGER_OPEN:
                    outcomes.append(Journaled(JournalOutcome.IN_PROGRESS, row[0]))
                    continue
                if row is not None and row[3] is not None and row[3] >= now - dedup_window_s:
                    stored = conn.execute("SELECT payload FROM messages WHERE result_id = ? AND topic = ?"
                                          " ORDER BY id LIMIT 1", (row[2], results_topic)).fetchone()
                    if stored is not None:
                        outcomes.append(Journaled(JournalOutcome.ANSWERED, row[0], bytes(stored[0])))
                        continue
                cur = conn.execute(
                    "INSERT INTO triggers (item_id, received_at, triggered_at, deadline, response_topic,"
                    " correlation_data, stale, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (t.item_id, t.received_at, t.triggered_at, t.deadline, t.response_topic,
                     t.correlation_data, t.stale.value if t.stale else None, TRIGGER_OPEN))
                outcomes.append(Journaled(JournalOutcome.NEW, int(cur.lastrowid or 0)))
        return outcomes

    def open_triggers(self) -> list[OpenTrigger]:
        """Journaled triggers that have no stored answer, oldest first."""
        from .types import Reason  # the journal stores the reason's value

        rows = self._read("SELECT id, item_id, received_at, triggered_at, deadline, response_topic,"
                          " correlation_data, stale FROM triggers WHERE state = ? ORDER BY id", (TRIGGER_OPEN,))
        return [OpenTrigger(r[0], Trigger(item_id=r[1], received_at=r[2], triggered_at=r[3], deadline=r[4],
                                          response_topic=r[5],
                                          correlation_data=None if r[6] is None else bytes(r[6]),
                                          stale=Reason(r[7]) if r[7] else None)) for r in rows]

    def record_answers(self, answers: Iterable[Answer]) -> list[list[int]]:
        """Store answers and close their journal rows, all in one transaction; message ids per answer."""
        answers = list(answers)
        if not answers:
            return []
        now = self._clock.time()
        ids: list[list[int]] = []
        dropped: list[int] = []
        with self._tx("storing answers") as conn:
            for answer in answers:
                audit_json = self._audit_json(answer.audit)
                message_ids = []
                for m in answer.messages:
                    if m.qos not in (0, 1, 2) or not m.topic:
                        raise ValueError(f"bad outgoing message: topic {m.topic!r}, qos {m.qos}")
                    cur = conn.execute(
                        "INSERT INTO messages (topic, payload, qos, correlation_data, expires_at, created_at,"
                        " state, result_id, item_id, audit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (m.topic, bytes(m.payload), m.qos, m.correlation_data, m.expires_at, now,
                         MessageState.PENDING.value, answer.result_id, answer.item_id, audit_json))
                    message_ids.append(int(cur.lastrowid or 0))
                if answer.journal_id is not None:
                    conn.execute("UPDATE triggers SET state = ?, result_id = ?, answered_at = ? WHERE id = ?",
                                 (TRIGGER_ANSWERED, answer.result_id, now, answer.journal_id))
                ids.append(message_ids)
            self._bump(conn, "added", sum(len(message_ids) for message_ids in ids))  # once per batch
            dropped = self._drop_excess(conn, now)
        self._after_add(dropped)
        return ids

    def answered_result_id(self, item_id: str) -> str | None:
        """The result_id of the item's newest answered trigger, if any (for tests and audits)."""
        rows = self._read("SELECT result_id FROM triggers WHERE item_id = ? AND state = ? ORDER BY id DESC"
                          " LIMIT 1", (item_id, TRIGGER_ANSWERED))
        return rows[0][0] if rows else None

    def journal_stats(self) -> dict[str, int]:
        """Open (unanswered) and total journaled triggers."""
        rows = dict(self._read("SELECT state, COUNT(*) FROM triggers GROUP BY state"))
        return {"open": int(rows.get(TRIGGER_OPEN, 0)),
                "answered": int(rows.get(TRIGGER_ANSWERED, 0))}

    @staticmethod
    def _audit_json(audit: Mapping[str, Any]) -> str:
        try:
            return json.dumps(dict(audit), sort_keys=True, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit record is not JSON-serialisable: {exc}") from exc

    def _drop_excess(self, conn: sqlite3.Connection, now: float) -> list[int]:
        pending = conn.execute("SELECT COUNT(*) FROM messages WHERE state = ?",
                               (MessageState.PENDING.value,)).fetchone()[0]
        excess = pending - self.max_pending
        if excess <= 0:
            return []
        # Drop the oldest, never the new one: the newest result is the one the
        # sorting machine can still act on; the oldest envelopes are long gone.
        dropped = [r[0] for r in conn.execute(
            "SELECT id FROM messages WHERE state = ? ORDER BY id LIMIT ?", (MessageState.PENDING.value, excess))]
        conn.executemany("UPDATE messages SET state = ?, finished_at = ? WHERE id = ?",
                         [(MessageState.DROPPED.value, now, i) for i in dropped])
        self._bump(conn, "dropped", len(dropped))
        return dropped

    def _after_add(self, dropped: list[int]) -> None:
        if dropped:
            log.warning("outbox full (%d pending): dropped oldest message(s) %s", self.max_pending, dropped)
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a listener must not make a stored result look unstored
                log.exception("outbox listener failed")

    def record_attempt(self, message_id: int) -> None:
        """Count one publish attempt (for the audit trail and for spotting a stuck message)."""
        self.record_attempts([message_id])

    def record_attempts(self, message_ids: Iterable[int]) -> None:
        """Count one publish attempt for each message, in one transaction."""
        ids = [(i,) for i in message_ids]
        if ids:
            with self._tx("recording attempts") as conn:
                conn.executemany("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", ids)

    def mark_delivered(self, message_id: int) -> bool:
        """Record the broker's acknowledgement; False if the message was already finished or unknown."""
        return self.mark_delivered_many([message_id]) == 1

    def mark_delivered_many(self, message_ids: Iterable[int]) -> int:
        """Record acknowledgements for several messages in one transaction; returns how many changed."""
        ids = list(message_ids)
        if not ids:
            return 0
        now = self._clock.time()
        with self._tx("marking delivered") as conn:
            states: dict[int, str] = {}
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start: start + _IDS_PER_QUERY]
                states.update(conn.execute(f"SELECT id, state FROM messages WHERE id IN ({','.join('?' * len(chunk))})",
                                           chunk).fetchall())
            changing = {i: state for i, state in states.items() if state != MessageState.DELIVERED.value}
            conn.executemany("UPDATE messages SET state = ?, finished_at = ? WHERE id = ?",
                             [(MessageState.DELIVERED.value, now, i) for i in changing])
            # A message dropped or expired while paho still held it, whose PUBACK then
            # arrives, did reach the broker: the audit trail must say so, so it moves
            # to delivered and out of the other total.
            self._bump(conn, "delivered", len(changing))
            for state, count in collections.Counter(changing.values()).items():
                if state != MessageState.PENDING.value:
                    self._bump(conn, state, -count)
        return len(changing)

    def mark_expired(self, message_id: int) -> bool:
        """Give up on a pending message whose deadline passed; False if it was not pending."""
        now = self._clock.time()
        with self._tx("marking expired") as conn:
            cur = conn.execute("UPDATE messages SET state = ?, finished_at = ? WHERE id = ? AND state = ?",
                               (MessageState.EXPIRED.value, now, message_id, MessageState.PENDING.value))
            self._bump(conn, "expired", cur.rowcount)
        return cur.rowcount == 1

    def expire_due(self, now: float | None = None, exclude: Collection[int] = ()) -> list[int]:
        """Expire pending messages whose ``expires_at`` is at or before ``now``, except ``exclude``; returns ids."""
        now = self._clock.time() if now is None else now
        # Read first: the delivery loop calls this every second and there is usually
        # nothing to expire, so most calls should not take the write lock.
        due = [r[0] for r in self._read(
            "SELECT id FROM messages WHERE state = ? AND expires_at IS NOT NULL AND expires_at <= ?"
            " ORDER BY id", (MessageState.PENDING.value, now)) if r[0] not in exclude]
        if not due:
            return []
        ids = []
        with self._tx("expiring messages") as conn:
            for message_id in due:  # skip any that were delivered since the read
                cur = conn.execute("UPDATE messages SET state = ?, finished_at = ? WHERE id = ? AND state = ?",
                                   (MessageState.EXPIRED.value, now, message_id, MessageState.PENDING.value))
                if cur.rowcount:
                    ids.append(message_id)
            self._bump(conn, "expired", len(ids))
        if ids:
            log.warning("expired %d undelivered message(s): %s", len(ids), ids)
        return ids

    def prune(self, now: float | None = None) -> int:
        """Delete finished rows older than the retention period; returns how many were removed."""
        now = self._clock.time() if now is None else now
        with self._tx("pruning the audit trail") as conn:
            cur = conn.execute("DELETE FROM messages WHERE state != ? AND finished_at < ?",
                               (MessageState.PENDING.value, now - self.retention_s))
            conn.execute("DELETE FROM triggers WHERE state = ? AND answered_at < ?",
                         (TRIGGER_ANSWERED, now - self.retention_s))
        return cur.rowcount

    # ------------------------------------------------------------------ reading

    def pending(self, limit: int = 100, after_id: int = 0) -> list[OutboxMessage]:
        """Pending messages with an id above ``after_id``, oldest first."""
        rows = self._read(
            "SELECT id, topic, payload, qos, expires_at, created_at, attempts, correlation_data"
            " FROM messages WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (MessageState.PENDING.value, after_id, limit))
        return [self._message(r) for r in rows]

    def last_delivered_ids(self, window_s: float) -> list[int]:
        """Ids of the messages delivered in the ``window_s`` before the last delivery, oldest first."""
        rows = self._read(
            "SELECT id FROM messages WHERE state = ? AND finished_at >= "
            "(SELECT MAX(finished_at) FROM messages WHERE state = ?) - ? ORDER BY id",
            (MessageState.DELIVERED.value, MessageState.DELIVERED.value, window_s))
        return [int(r[0]) for r in rows]

    def delivered(self, message_ids: Iterable[int], now: float | None = None) -> list[OutboxMessage]:
        """Those of ``message_ids`` that are delivered and not yet expired, oldest first.

        A broker acknowledges from memory and saves to disk only now and then: one killed in
        between forgets what it acknowledged. These are the messages to send again then.
        """
        now = self._clock.time() if now is None else now
        ids = list(message_ids)
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start: start + _IDS_PER_QUERY]
            rows += self._read(
                "SELECT id, topic, payload, qos, expires_at, created_at, attempts, correlation_data FROM messages"
                f" WHERE id IN ({','.join('?' * len(chunk))}) AND state = ? AND (expires_at IS NULL OR expires_at > ?)",
                (*chunk, MessageState.DELIVERED.value, now))
        return [self._message(r) for r in sorted(rows)]

    @staticmethod
    def _message(row: tuple[Any, ...]) -> OutboxMessage:
        return OutboxMessage(id=row[0], topic=row[1], payload=bytes(row[2]), qos=row[3], expires_at=row[4],
                             created_at=row[5], attempts=row[6],
                             correlation_data=None if row[7] is None else bytes(row[7]))

    def stats(self) -> dict[str, int]:
        """``pending`` now, plus lifetime totals ``added``, ``delivered``, ``dropped``, ``expired``.

        Totals are kept in the database, so they survive restarts and pruning and can
        be exported as monotonic counters; added == pending + delivered + dropped + expired.
        """
        counters = dict(self._read("SELECT name, value FROM counters"))
        pending = self._read("SELECT COUNT(*) FROM messages WHERE state = ?", (MessageState.PENDING.value,))
        return {"pending": int(pending[0][0]), **{name: int(counters.get(name, 0)) for name in _COUNTERS}}

    def audit(self, item_id: str) -> list[AuditRecord]:
        """Every stored message about one item (result and replies), oldest first."""
        rows = self._read(
            "SELECT id, topic, state, result_id, item_id, created_at, finished_at, attempts, audit"
            " FROM messages WHERE item_id = ? ORDER BY id", (item_id,))
        return [AuditRecord(message_id=r[0], topic=r[1], state=MessageState(r[2]), result_id=r[3],
                            item_id=r[4], created_at=r[5], finished_at=r[6], attempts=r[7],
                            audit=json.loads(r[8])) for r in rows]

    def state(self, message_id: int) -> MessageState | None:
        """The state of one message, or None if it is unknown (or pruned)."""
        rows = self._read("SELECT state FROM messages WHERE id = ?", (message_id,))
        return MessageState(rows[0][0]) if rows else None

    def checkpoint(self) -> tuple[int, int] | None:
        """Copy the WAL into the database from a connection of its own (call it every second or so
        from a thread that answers no one): a PASSIVE checkpoint never waits for, nor holds up, the
        writers, so no answer waits on its fsync. Returns (WAL frames, frames copied), or None if
        the outbox is closed. Errors are the next write's to report: a checkpoint loses nothing."""
        with self._checkpoint_lock:
            if self._closed:
                return None
            try:
                if self._checkpoint_conn is None:
                    self._checkpoint_conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None,
                                                            check_same_thread=False)
                _busy, frames, copied = self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                log.debug("outbox %s: checkpoint skipped: %s", self.path, exc)
                return None
            return int(frames), int(copied)

    def close(self) -> None:
        """Record a clean end, close the database; further calls raise OutboxError."""
        with self._checkpoint_lock:
            if self._closed:
                return
            self._closed = True
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()
                self._checkpoint_conn = None
        with self._lock:
            try:
                if self._marked_open:
                    self._conn.execute(_SET_OPEN_FLAG, ("0",))
            except sqlite3.Error as exc:  # the next start then resends a few results: duplicates, not loss
                log.warning("outbox %s: could not record a clean close: %s", self.path, exc)
            self._conn.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
