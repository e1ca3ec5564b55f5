"""The appliance's SQLite database: records, their history, link counters, batches.

One file, ``appliance.db`` in the data directory, in WAL mode so the CLI and
TUI can read while the daemon writes. Every write runs in a transaction that
takes the write lock up front (``BEGIN IMMEDIATE``), so concurrent writers wait
on ``busy_timeout`` instead of failing half-way. A state change and the step
result that justifies it are committed together; every change is conditional
on the state it expects, so a step that is run twice after a crash cannot move
a record twice.

The WAL file stays bounded: commits run a passive checkpoint once the WAL
contains ``WAL_AUTOCHECKPOINT_PAGES`` pages, a reset WAL is cut back to
``WAL_SIZE_LIMIT`` bytes, and idle workers call ``checkpoint`` to empty it.
A checkpoint cannot pass the oldest snapshot still being read, so one read
transaction kept open for minutes lets the WAL grow until it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance import faults
from appliance.errors import StoreError
from appliance.states import FINAL_STATES, RecordKind, RecordState

logger = logging.getLogger(__name__)

DB_NAME = "appliance.db"
BUSY_TIMEOUT_MS = 10_000
"""Milliseconds one statement waits for a lock held by another connection."""
LOCK_WAIT_SECONDS = 60.0
"""Seconds a write transaction keeps retrying to take the write lock, each try
waiting ``BUSY_TIMEOUT_MS``, before it fails with ``StoreError``."""
WAL_AUTOCHECKPOINT_PAGES = 1000
"""WAL size in pages (4 KiB each by default) at which a commit runs a passive
checkpoint; SQLite's own default, set explicitly."""
WAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes a WAL file is truncated to when a checkpoint has let it restart
(``PRAGMA journal_size_limit``); about ``WAL_AUTOCHECKPOINT_PAGES`` pages."""
SQLITE_BUSY = 5
SQLITE_LOCKED = 6


class Store:
    """One connection to the appliance database; use one instance per thread.

    Args:
        path: the database file; created with its tables when missing.
        readonly: open without write access (for status and listing commands).
        clock: wall-clock time in seconds since the epoch, for every timestamp
            this store writes and for deciding which records are due; tests
            inject a fake one.
    """

    def __init__(
        self,
        path: Path,
        readonly: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.clock = clock
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open database {str(path)!r}: {exc}", path
            ) from exc
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        if not readonly:
            try:
                self._configure_wal()
                self._create_tables()
            except StoreError:
                self.close()
                raise

    def _configure_wal(self) -> None:
        # Switching a new file to WAL mode takes an exclusive lock, so it can
        # meet a busy database like any write.
        mode = self._retry_busy(
            "enable WAL mode",
            lambda: self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0],
        )
        if mode != "wal":
            logger.warning(
                "database %s stays in journal mode %s, not WAL: readers will block "
                "writers; keep the data directory on a local file system",
                self.path,
                mode,
            )
        try:
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            self.conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except sqlite3.Error as exc:
            raise self._error("configure the connection", exc) from exc

    def close(self) -> None:
        """Close the connection. Safe to call more than once."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def _create_tables(self) -> None:
        with self.transaction():
            self.db["records"].create(
                {
                    "id": str,
                    "link": str,
                    "seq": int,
                    "kind": str,
                    "state": str,
                    "raw": str,
                    "raw_bytes": bytes,
                    "flags": str,
                    "received_at": float,
                    "updated_at": float,
                    "attempts": int,
                    "next_attempt_at": float,
                    "output": str,
                    "data": str,
                    "error": str,
                    "batch_id": str,
                    "uploaded_at": float,
                },
                pk="id",
                not_null={"link", "seq", "kind", "state", "raw", "received_at"},
                defaults={"attempts": 0, "next_attempt_at": 0.0, "flags": ""},
                if_not_exists=True,
            )
            self.db["records"].create_index(
                ["link", "seq"], unique=True, if_not_exists=True
            )
            self.db["records"].create_index(
                ["state", "next_attempt_at"], if_not_exists=True
            )
            self.db["records"].create_index(["batch_id"], if_not_exists=True)
            # The outbox reads queued records oldest first.
            self.db["records"].create_index(
                ["state", "received_at", "link", "seq"], if_not_exists=True
            )
            self.db["events"].create(
                {
                    "id": int,
                    "record_id": str,
                    "at": float,
                    "step": str,
                    "from_state": str,
                    "to_state": str,
                    "attempt": int,
                    "duration": float,
                    "error": str,
                    "detail": str,
                },
                pk="id",
                if_not_exists=True,
            )
            self.db["events"].create_index(["record_id"], if_not_exists=True)
            self.db["links"].create(
                {"name": str, "counters": str, "updated_at": float},
                pk="name",
                if_not_exists=True,
            )
            self.db["sync_state"].create(
                {"key": str, "value": str}, pk="key", if_not_exists=True
            )
            self.db["link_status"].create(
                {
                    "name": str,
                    "transport": str,
                    "protocol": str,
                    "state": str,
                    "last_error": str,
                    "updated_at": float,
                },
                pk="name",
                if_not_exists=True,
            )
            self.db["streams"].create(
                {
                    "device_id": str,
                    "stream_id": str,
                    "link": str,
                    "next_number": int,
                    "updated_at": float,
                },
                pk=("device_id", "stream_id"),
                if_not_exists=True,
            )
            self.db["messages"].create(
                {
                    "device_id": str,
                    "stream_id": str,
                    "number": int,
                    "record_id": str,
                },
                pk=("device_id", "stream_id", "number"),
                if_not_exists=True,
            )
            self.db["batches"].create(
                {
                    "id": str,
                    "created_at": float,
                    "attempts": int,
                    "last_status": int,
                    "last_error": str,
                    "delivered_at": float,
                },
                pk="id",
                if_not_exists=True,
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block in one write transaction taken with ``BEGIN IMMEDIATE``.

        Taking the write lock at ``BEGIN`` is what makes waiting safe: in WAL
        mode, statements and ``COMMIT`` inside a transaction that holds the
        lock never meet a busy database, so only ``BEGIN`` needs retrying. It
        is retried for up to ``LOCK_WAIT_SECONDS``.

        Raises:
            StoreError: SQLite failed, or another connection held the write lock
                for longer than ``LOCK_WAIT_SECONDS``; the transaction was rolled
                back.
        """
        with self._lock:
            self._retry_busy(
                "begin a transaction", lambda: self.conn.execute("BEGIN IMMEDIATE")
            )
            try:
                yield self.conn
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error("write", exc) from exc
                raise
            faults.point("commit.before")
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise self._error("commit", exc) from exc
            faults.point("commit.after")

    def _retry_busy(self, action: str, run: Callable[[], Any]) -> Any:
        """Call ``run`` until it gets past a busy or locked database.

        Each try already waits ``BUSY_TIMEOUT_MS`` inside SQLite. An open
        transaction is rolled back before the next try, so a retry never runs
        inside a half-done one.

        Raises:
            StoreError: another error, or still busy after ``LOCK_WAIT_SECONDS``.
        """
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        tries = 0
        while True:
            tries += 1
            try:
                return run()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise self._error(action, exc) from exc
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"database {str(self.path)!r}: {action} failed: {exc} "
                        f"after {tries} tries in {LOCK_WAIT_SECONDS:g} s; another "
                        "process keeps a transaction open on it",
                        self.path,
                    ) from exc
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                logger.warning(
                    "database %s is busy; retrying to %s (try %d): %s",
                    self.path,
                    action,
                    tries,
                    exc,
                )
            except sqlite3.Error as exc:
                raise self._error(action, exc) from exc

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[bool, int, int]:
        """Copy WAL pages into the database file without waiting for any lock.

        ``PASSIVE`` copies what no reader still needs. ``TRUNCATE`` also empties
        the WAL file when no reader is using it. The busy handler is off for the
        call, so the checkpoint gives up at once instead of holding up other
        writers. Returns ``(busy, wal_pages, checkpointed_pages)`` as SQLite
        reports them; ``busy`` is True when a lock or a reader stopped it early.

        Raises:
            ValueError: ``mode`` is not PASSIVE, FULL, RESTART or TRUNCATE.
            StoreError: SQLite failed.
        """
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        with self._lock:
            try:
                self.conn.execute("PRAGMA busy_timeout = 0")
                try:
                    row = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                finally:
                    self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    return True, -1, -1
                raise self._error("checkpoint", exc) from exc
            except sqlite3.Error as exc:
                raise self._error("checkpoint", exc) from exc
        return bool(row[0]), int(row[1]), int(row[2])

    def _error(self, action: str, exc: sqlite3.Error) -> StoreError:
        hint = ""
        if "full" in str(exc).lower():
            hint = ": free space on the data directory's file system"
        return StoreError(
            f"database {str(self.path)!r}: {action} failed: {exc}{hint}", self.path
        )

    def query(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> list[sqlite3.Row]:
        """Run a read-only query and return all rows.

        Outside a transaction a busy database is waited out like a write.
        """
        if self.conn.in_transaction:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc
        return self._retry_busy(
            "read", lambda: self.conn.execute(sql, params).fetchall()
        )

    # Records -----------------------------------------------------------------

    def next_seq(self, link: str) -> int:
        """Return the sequence number the next record on ``link`` gets."""
        rows = self.query("SELECT MAX(seq) AS m FROM records WHERE link = ?", (link,))
        return (rows[0]["m"] or 0) + 1

    def stream_next(self, device_id: str, stream_id: str) -> int:
        """Return the next message number expected on a device stream (0 if new)."""
        rows = self.query(
            "SELECT next_number FROM streams WHERE device_id = ? AND stream_id = ?",
            (device_id, stream_id),
        )
        return int(rows[0]["next_number"]) if rows else 0

    def record_message(
        self,
        conn: sqlite3.Connection,
        link: str,
        device_id: str,
        stream_id: str,
        number: int,
        record_id: str,
    ) -> None:
        """Tie a record to its device message and advance the stream, in one
        transaction with the record's insert, so a message is stored once.

        Raises:
            sqlite3.IntegrityError: the message is already stored.
        """
        conn.execute(
            "INSERT INTO messages (device_id, stream_id, number, record_id)"
            " VALUES (?, ?, ?, ?)",
            (device_id, stream_id, number, record_id),
        )
        conn.execute(
            "INSERT INTO streams (device_id, stream_id, link, next_number, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, stream_id) DO UPDATE"
            " SET next_number = MAX(next_number, excluded.next_number),"
            " link = excluded.link, updated_at = excluded.updated_at",
            (device_id, stream_id, link, number + 1, time.time()),
        )

    @staticmethod
    def has_message(
        conn: sqlite3.Connection, device_id: str, stream_id: str, number: int
    ) -> bool:
        """True when the device message is already stored."""
        row = conn.execute(
            "SELECT 1 FROM messages WHERE device_id = ? AND stream_id = ? AND number = ?",
            (device_id, stream_id, number),
        ).fetchone()
        return row is not None

    @staticmethod
    def next_seq_in(conn: sqlite3.Connection, link: str) -> int:
        """``next_seq`` inside an open transaction."""
        row = conn.execute(
            "SELECT MAX(seq) AS m FROM records WHERE link = ?", (link,)
        ).fetchone()
        return int(row["m"] or 0) + 1

    def latest_stream(self, device_id: str) -> tuple[str, int] | None:
        """Return the most recently used stream of a device and its next number."""
        rows = self.query(
            "SELECT stream_id, next_number FROM streams WHERE device_id = ?"
            " ORDER BY updated_at DESC LIMIT 1",
            (device_id,),
        )
        return (rows[0]["stream_id"], int(rows[0]["next_number"])) if rows else None

    def message_of(self, record_id: str) -> sqlite3.Row | None:
        """Return the device message a record came from, if it came framed."""
        rows = self.query("SELECT * FROM messages WHERE record_id = ?", (record_id,))
        return rows[0] if rows else None

    def count_link_records(self, link: str) -> int:
        rows = self.query("SELECT COUNT(*) AS n FROM records WHERE link = ?", (link,))
        return int(rows[0]["n"])

    def insert_record(
        self,
        conn: sqlite3.Connection,
        link: str,
        seq: int,
        raw: str,
        raw_bytes: bytes,
        kind: RecordKind = RecordKind.LOG_EVENT,
        flags: str = "",
    ) -> str | None:
        """Insert a received record inside an open transaction.

        Returns the new record's id, or None when ``(link, seq)`` already exists,
        which makes replaying the same input idempotent.
        """
        record_id = str(uuid.uuid4())
        now = self.clock()
        cursor = conn.execute(
            "INSERT OR IGNORE INTO records (id, link, seq, kind, state, raw, raw_bytes,"
            " flags, received_at, updated_at, attempts, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
            (
                record_id,
                link,
                seq,
                str(kind),
                RecordState.RECEIVED,
                raw,
                raw_bytes,
                flags,
                now,
                now,
            ),
        )
        if cursor.rowcount == 0:
            return None
        self.add_event(conn, record_id, "receive", None, RecordState.RECEIVED, 0, 0.0)
        return record_id

    def add_event(
        self,
        conn: sqlite3.Connection,
        record_id: str,
        step: str,
        from_state: str | None,
        to_state: str | None,
        attempt: int,
        duration: float,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one entry to a record's history inside an open transaction."""
        conn.execute(
            "INSERT INTO events (record_id, at, step, from_state, to_state, attempt,"
            " duration, error, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record_id,
                self.clock(),
                step,
                from_state,
                to_state,
                attempt,
                duration,
                error,
                json.dumps(detail) if detail else None,
            ),
        )

    def add_events(
        self,
        conn: sqlite3.Connection,
        record_ids: list[str],
        step: str,
        from_state: str | None,
        to_state: str | None,
        attempt: int,
        duration: float,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append the same history entry to many records in one statement."""
        at = self.clock()
        encoded = json.dumps(detail) if detail else None
        conn.executemany(
            "INSERT INTO events (record_id, at, step, from_state, to_state, attempt,"
            " duration, error, detail) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            [
                (record_id, at, step, from_state, to_state, attempt, duration, encoded)
                for record_id in record_ids
            ],
        )

    def move_many(
        self,
        conn: sqlite3.Connection,
        record_ids: list[str],
        expected: RecordState,
        target: RecordState,
        **fields: Any,
    ) -> list[str]:
        """Move each record still in ``expected`` to ``target``; return the ids moved."""
        moved: list[str] = []
        assignments = "".join(f", {name} = ?" for name in fields)
        for start in range(0, len(record_ids), 500):
            chunk = record_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"UPDATE records SET state = ?, updated_at = ?{assignments}"
                f" WHERE id IN ({marks}) AND state = ? RETURNING id",
                (str(target), self.clock(), *fields.values(), *chunk, str(expected)),
            ).fetchall()
            moved += [row[0] for row in rows]
        return moved

    def move(
        self,
        conn: sqlite3.Connection,
        record_id: str,
        expected: RecordState,
        target: RecordState,
        **fields: Any,
    ) -> bool:
        """Move a record from ``expected`` to ``target`` and set ``fields``.

        Returns False, changing nothing, when the record is not in ``expected``
        (another worker or an earlier run already moved it).
        """
        assignments = ", ".join(f"{name} = ?" for name in fields)
        sql = "UPDATE records SET state = ?, updated_at = ?"
        if assignments:
            sql += ", " + assignments
        sql += " WHERE id = ? AND state = ?"
        params = (str(target), self.clock(), *fields.values(), record_id, str(expected))
        return conn.execute(sql, params).rowcount == 1

    def due_records(
        self, states: list[RecordState], kinds: list[RecordKind], limit: int
    ) -> list[sqlite3.Row]:
        """Return up to ``limit`` records in ``states`` whose next attempt is due."""
        state_marks = ",".join("?" * len(states))
        kind_marks = ",".join("?" * len(kinds))
        return self.query(
            f"SELECT * FROM records WHERE state IN ({state_marks})"
            f" AND kind IN ({kind_marks}) AND next_attempt_at <= ?"
            " ORDER BY received_at, link, seq LIMIT ?",
            (*map(str, states), *map(str, kinds), self.clock(), limit),
        )

    def unfinished_count(self, links: list[str] | None = None) -> int:
        """Count records not yet in a final state, optionally on some links only."""
        # IN over the unfinished states lets SQLite search the state index;
        # NOT IN over the final ones would scan all of it, every call.
        unfinished = [str(s) for s in RecordState if s not in FINAL_STATES]
        marks = ",".join("?" * len(unfinished))
        sql = f"SELECT COUNT(*) AS n FROM records WHERE state IN ({marks})"
        params: list[Any] = list(unfinished)
        if links is not None:
            sql += f" AND link IN ({','.join('?' * len(links))})"
            params += links
        return int(self.query(sql, tuple(params))[0]["n"])

    def state_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM records GROUP BY state")
        counts = {str(state): 0 for state in RecordState}
        counts.update({row["state"]: row["n"] for row in rows})
        return counts

    def get_record(self, record_id: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM records WHERE id = ?", (record_id,))
        return rows[0] if rows else None

    def list_records(
        self, state: str | None = None, limit: int | None = None
    ) -> list[sqlite3.Row]:
        sql = "SELECT * FROM records"
        params: list[Any] = []
        if state is not None:
            sql += " WHERE state = ?"
            params.append(state)
        sql += " ORDER BY received_at, link, seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self.query(sql, tuple(params))

    def events_for(self, record_id: str) -> list[sqlite3.Row]:
        return self.query(
            "SELECT * FROM events WHERE record_id = ? ORDER BY id", (record_id,)
        )

    # Link counters -----------------------------------------------------------

    def load_link_counters(self, name: str) -> dict[str, int]:
        rows = self.query("SELECT counters FROM links WHERE name = ?", (name,))
        return json.loads(rows[0]["counters"]) if rows else {}

    def save_link_counters(
        self, conn: sqlite3.Connection, name: str, counters: dict[str, int]
    ) -> None:
        conn.execute(
            "INSERT INTO links (name, counters, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET counters = excluded.counters,"
            " updated_at = excluded.updated_at",
            (name, json.dumps(counters), time.time()),
        )

    SYNC_COUNTERS = (
        "retries",
        "rate_limit_wait_s",
        "duplicates",
        "rejected",
        "batches",
    )
    """Numbers in ``sync_state`` that ``add_sync_counts`` adds to."""

    @staticmethod
    def add_sync_counts(conn: sqlite3.Connection, **counts: float) -> None:
        """Add to the sync counters inside an open transaction."""
        for key, value in counts.items():
            if not value:
                continue
            conn.execute(
                "INSERT INTO sync_state (key, value) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = CAST(value AS REAL) + excluded.value",
                (key, value),
            )

    @staticmethod
    def set_sync_state(conn: sqlite3.Connection, **values: object) -> None:
        """Set sync facts (last success, last error) inside an open transaction."""
        for key, value in values.items():
            conn.execute(
                "INSERT OR REPLACE INTO sync_state (key, value) VALUES (?, ?)",
                (key, None if value is None else str(value)),
            )

    def sync_state(self) -> dict[str, Any]:
        """Return the sync counters and facts; counters default to 0."""
        state: dict[str, Any] = {key: 0 for key in self.SYNC_COUNTERS}
        state |= {"last_success_at": None, "last_error": None, "last_error_at": None}
        try:
            rows = self.query("SELECT key, value FROM sync_state")
        except StoreError:
            return state  # a database from before sync state was kept
        for row in rows:
            value: Any = row["value"]
            if row["key"] in self.SYNC_COUNTERS or row["key"].endswith("_at"):
                value = float(value) if value is not None else None
                if row["key"] in self.SYNC_COUNTERS and value is not None:
                    value = round(value, 3) if value % 1 else int(value)
            state[row["key"]] = value
        return state

    def save_link_status(
        self,
        name: str,
        transport: str,
        protocol: str,
        state: str,
        last_error: str | None,
    ) -> None:
        """Record a link's connection state and last error for ``status``."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO link_status (name, transport, protocol, state,"
                " last_error, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, transport, protocol, state, last_error, time.time()),
            )

    def all_link_status(self) -> dict[str, dict[str, Any]]:
        rows = self.query("SELECT * FROM link_status ORDER BY name")
        return {
            row["name"]: {k: row[k] for k in row.keys() if k != "name"} for row in rows
        }

    def all_link_counters(self) -> dict[str, dict[str, int]]:
        rows = self.query("SELECT name, counters FROM links ORDER BY name")
        return {row["name"]: json.loads(row["counters"]) for row in rows}


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Return True for SQLITE_BUSY or SQLITE_LOCKED, extended codes included."""
    return exc.sqlite_errorcode & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)


def record_to_json(row: sqlite3.Row, with_data: bool = True) -> dict[str, Any]:
    """Return the public JSON form of a record, as listed and as uploaded.

    ``with_data=False`` leaves out ``data``, for callers that add the stored
    JSON text themselves.
    """
    result = {
        "id": row["id"],
        "link": row["link"],
        "seq": row["seq"],
        "kind": row["kind"],
        "state": row["state"],
        "received_at": _iso(row["received_at"]),
        "raw": row["raw"],
        "error": row["error"],
        "attempts": row["attempts"],
        "flags": row["flags"].split(",") if row["flags"] else [],
    }
    if with_data:
        result["data"] = json.loads(row["data"]) if row["data"] else None
    return result


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + (
        f".{int(epoch % 1 * 1000):03d}Z"
    )
