"""The bounded on-disk telemetry spool and the local span store, in one SQLite file.

``telemetry.db`` in the data directory sits apart from ``appliance.db`` so
telemetry writes never wait for, or hold, the workflow's write lock. It holds:

- ``batches``: serialized OTLP export requests (spans or metrics) waiting for
  the collector. Their total size stays under ``max_bytes``: adding a batch
  deletes the oldest ones first and counts what they held as dropped.
- ``spans``: a readable copy of every span for ``appliance trace``, kept for
  ``retention_s`` seconds and at most ``max_spans`` rows. Spans of drift
  samples outlive the retention time and go only when the row limit needs room.
- ``state``: counters (spooled, exported, dropped) and the last export error.

Durability is ``synchronous = NORMAL``: a power cut can lose the last batches
written, which is acceptable for telemetry and keeps fsyncs off the export path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.errors import StoreError

SPOOL_NAME = "telemetry.db"
BUSY_TIMEOUT_MS = 5000
TRACES = "traces"
METRICS = "metrics"
SIGNALS = (TRACES, METRICS)

COUNTERS = tuple(
    f"{signal}_{event}"
    for signal in SIGNALS
    for event in ("spooled", "exported", "dropped", "rejected")
)
"""Names in ``state``: spans (traces) or metric batches spooled, exported,
dropped to stay within the bound, and rejected by the collector as invalid."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One spooled export request."""

    id: int
    signal: str
    """``traces`` or ``metrics``."""
    items: int
    """Spans in a trace batch; 1 for a metric batch."""
    payload: bytes


@dataclasses.dataclass(frozen=True)
class SpanRow:
    """The local, readable copy of one span."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    status: str
    """``UNSET``, ``OK`` or ``ERROR``, with the description after a colon."""
    attributes: dict[str, Any]
    drift: bool = False


class TelemetrySpool:
    """One connection to ``telemetry.db``; safe to share between threads.

    Args:
        path: the spool file; created with its tables when missing.
        max_bytes: bound on the payload bytes of spooled batches.
        max_spans: bound on the rows of the local span copy.
        retention_s: seconds a local span is kept (drift samples excepted).
        readonly: open for reading only (``appliance status``, ``trace``).

    Raises:
        StoreError: SQLite cannot open or create the file.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int = 16 * 2**20,
        max_spans: int = 100_000,
        retention_s: float = 7 * 86400.0,
        readonly: bool = False,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_spans = max_spans
        self.retention_s = retention_s
        self._lock = threading.Lock()
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False
                )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                _create_tables(conn)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open telemetry spool {str(path)!r}: {exc}", path
            ) from exc
        self.conn = conn

    def close(self) -> None:
        """Close the connection. Safe to call more than once."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"telemetry spool {str(self.path)!r}: {action} failed: {exc}",
                    self.path,
                ) from exc

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(
                    f"telemetry spool {str(self.path)!r}: read failed: {exc}",
                    self.path,
                ) from exc

    # Writes ----------------------------------------------------------------

    def add(
        self,
        signal: str,
        payload: bytes | None,
        items: int,
        spans: Sequence[SpanRow] = (),
        now: float | None = None,
    ) -> int:
        """Spool one batch and store local span copies in one transaction.

        ``payload`` None stores the local copies only (no collector is
        configured). Returns how many items older batches lost to the bound.

        Raises:
            StoreError: SQLite failed (for example, the disk is full).
        """
        now = time.time() if now is None else now
        with self._transaction("add a batch") as conn:
            if payload is not None:
                conn.execute(
                    "INSERT INTO batches (signal, created_at, items, bytes, payload)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (signal, now, items, len(payload), payload),
                )
                _add_counter(conn, f"{signal}_spooled", items)
            conn.executemany(
                "INSERT OR REPLACE INTO spans (trace_id, span_id, parent_span_id,"
                " name, start_ns, end_ns, status, attributes, drift, stored_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row.trace_id,
                        row.span_id,
                        row.parent_span_id,
                        row.name,
                        row.start_ns,
                        row.end_ns,
                        row.status,
                        json.dumps(row.attributes, ensure_ascii=False, default=str),
                        int(row.drift),
                        now,
                    )
                    for row in spans
                ],
            )
            dropped = _enforce_bound(conn, self.max_bytes)
            _prune_spans(conn, now - self.retention_s, self.max_spans)
        return dropped

    def remove(self, batch: Batch, outcome: str, now: float | None = None) -> None:
        """Delete a batch the collector accepted (``exported``) or rejected.

        Raises:
            StoreError: SQLite failed.
        """
        with self._transaction("remove a batch") as conn:
            deleted = conn.execute(
                "DELETE FROM batches WHERE id = ?", (batch.id,)
            ).rowcount
            if deleted:
                _add_counter(conn, f"{batch.signal}_{outcome}", batch.items)
            if outcome == "exported":
                _set_state(conn, "last_export_at", now or time.time())

    def set_error(self, message: str | None, now: float | None = None) -> None:
        """Record the last export error; a later success keeps it, with its time."""
        with self._transaction("save the export error") as conn:
            _set_state(conn, "last_error", message)
            _set_state(conn, "last_error_at", now or time.time())

    def set_endpoint(self, endpoint: str | None) -> None:
        """Record where telemetry goes, for ``appliance status``."""
        with self._transaction("save the endpoint") as conn:
            _set_state(conn, "endpoint", endpoint)

    # Reads -----------------------------------------------------------------

    def oldest(self, limit: int, signals: Sequence[str] = SIGNALS) -> list[Batch]:
        """Return up to ``limit`` spooled batches of ``signals``, oldest first."""
        marks = ",".join("?" * len(signals))
        rows = self._read(
            f"SELECT id, signal, items, payload FROM batches WHERE signal IN ({marks})"
            " ORDER BY id LIMIT ?",
            (*signals, limit),
        )
        return [Batch(row[0], row[1], row[2], bytes(row[3])) for row in rows]

    def stats(self) -> dict[str, Any]:
        """Return spool contents, counters and the last error."""
        state = dict(self._read("SELECT key, value FROM state"))
        result: dict[str, Any] = {
            name: int(float(state.get(name) or 0)) for name in COUNTERS
        }
        for signal in SIGNALS:
            count, size = self._read(
                "SELECT IFNULL(SUM(items), 0), IFNULL(SUM(bytes), 0) FROM batches"
                " WHERE signal = ?",
                (signal,),
            )[0]
            result[f"{signal}_in_spool"] = int(count)
            result[f"{signal}_spool_bytes"] = int(size)
        result["local_spans"] = int(self._read("SELECT COUNT(*) FROM spans")[0][0])
        result["endpoint"] = state.get("endpoint")
        result["last_error"] = state.get("last_error")
        for key in ("last_error_at", "last_export_at"):
            value = state.get(key)
            result[key] = float(value) if value is not None else None
        return result

    def trace(self, trace_id: str) -> list[SpanRow]:
        """Return the locally kept spans of one trace, by start time."""
        rows = self._read(
            "SELECT trace_id, span_id, parent_span_id, name, start_ns, end_ns,"
            " status, attributes, drift FROM spans WHERE trace_id = ?"
            " ORDER BY start_ns, span_id",
            (trace_id,),
        )
        return [
            SpanRow(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                json.loads(row[7]),
                bool(row[8]),
            )
            for row in rows
        ]


def _create_tables(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS batches (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            signal TEXT NOT NULL,
            created_at REAL NOT NULL,
            items INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE TABLE IF NOT EXISTS spans (
            trace_id TEXT NOT NULL,
            span_id TEXT NOT NULL,
            parent_span_id TEXT,
            name TEXT NOT NULL,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER NOT NULL,
            status TEXT NOT NULL,
            attributes TEXT NOT NULL,
            drift INTEGER NOT NULL DEFAULT 0,
            stored_at REAL NOT NULL,
            PRIMARY KEY (trace_id, span_id)
        );
        CREATE INDEX IF NOT EXISTS spans_stored_at ON spans (stored_at);
        CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value);
        """
    )


def _add_counter(conn: sqlite3.Connection, key: str, amount: int) -> None:
    if amount:
        conn.execute(
            "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key)"
            " DO UPDATE SET value = value + excluded.value",
            (key, amount),
        )


def _set_state(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value)
    )


def _enforce_bound(conn: sqlite3.Connection, max_bytes: int) -> int:
    """Delete the oldest batches until the spool fits; return the spans lost."""
    total = conn.execute("SELECT IFNULL(SUM(bytes), 0) FROM batches").fetchone()[0]
    lost_spans = 0
    while total > max_bytes:
        row = conn.execute(
            "SELECT id, signal, items, bytes FROM batches ORDER BY id LIMIT 1"
        ).fetchone()
        if row is None:
            break
        batch_id, signal, items, size = row
        conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        _add_counter(conn, f"{signal}_dropped", items)
        if signal == TRACES:
            lost_spans += items
        total -= size
    return lost_spans


def _prune_spans(conn: sqlite3.Connection, cutoff: float, max_spans: int) -> None:
    conn.execute("DELETE FROM spans WHERE stored_at < ? AND drift = 0", (cutoff,))
    excess = conn.execute("SELECT COUNT(*) FROM spans").fetchone()[0] - max_spans
    if excess > 0:
        conn.execute(
            "DELETE FROM spans WHERE rowid IN (SELECT rowid FROM spans"
            " ORDER BY stored_at LIMIT ?)",
            (excess,),
        )
