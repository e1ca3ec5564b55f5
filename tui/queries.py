"""SQL reads behind the TUI's views, each on an open read-only ``Store``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from appliance.errors import StoreError
from appliance.states import RecordState
from appliance.store import Store
from tui.views import BatchView, FeedRow, HistoryEntry, LastError

RECENT_INFERENCES = 20
"""Model calls averaged for the dashboard's tokens per second."""
EVENT_SEARCH_WINDOW = 10_000
"""Newest history events searched for the last error and the model speed, so
a poll stays fast on a database with millions of events."""
RECENT_BATCH_LIMIT = 10
PENDING_BATCH_LIMIT = 50
SQL_VARIABLE_CHUNK = 500
"""Ids per ``IN (...)`` query, below 999, SQLite's limit on bound variables
before version 3.32."""

FEED_COLUMNS = (
    "rowid AS key, id, link, seq, state, received_at, updated_at, attempts, error,"
    " substr(raw, 1, 200) AS raw,"
    " CASE WHEN json_valid(data) THEN json_extract(data, '$.severity') END"
    " AS severity,"
    " CASE WHEN json_valid(data) THEN json_extract(data, '$.summary') END"
    " AS summary"
)
"""Columns of a ``FeedRow``: the rowid, which orders records by insert, and the
severity and summary of the validated data when it has them."""


def saved_links(store: Store) -> dict[str, dict[str, Any]]:
    """Return each link's saved counters and state, in the shape ``status`` uses."""
    links: dict[str, dict[str, Any]] = {
        name: dict(counts) for name, counts in store.all_link_counters().items()
    }
    try:
        states = store.all_link_status()
    except StoreError:
        states = {}  # a database from before link states were saved
    for name, state in states.items():
        links.setdefault(name, {}).update(state)
    return links


def _newest_events_clause(store: Store) -> tuple[str, tuple[Any, ...]]:
    newest = store.query("SELECT MAX(id) AS m FROM events")[0]["m"] or 0
    return "id > ?", (newest - EVENT_SEARCH_WINDOW,)


def last_error(store: Store) -> LastError | None:
    clause, params = _newest_events_clause(store)
    rows = store.query(
        "SELECT record_id, at, step, error FROM events"
        f" WHERE {clause} AND error IS NOT NULL ORDER BY id DESC LIMIT 1",
        params,
    )
    if not rows:
        return None
    row = rows[0]
    return LastError(row["at"], row["record_id"], row["step"], row["error"])


def inference_speed(store: Store) -> tuple[str | None, float | None]:
    """Return the latest model name and its tokens per second, from the history."""
    clause, params = _newest_events_clause(store)
    rows = store.query(
        "SELECT duration, detail FROM events WHERE"
        f" {clause} AND step = 'infer' AND detail IS NOT NULL"
        " ORDER BY id DESC LIMIT ?",
        (*params, RECENT_INFERENCES * 4),
    )
    model = None
    tokens = 0
    seconds = 0.0
    used = 0
    for row in rows:
        detail = _json_object(row["detail"])
        model = model or detail.get("model")
        if detail.get("cached") or not row["duration"]:
            continue
        tokens += int(detail.get("completion_tokens") or 0)
        seconds += float(row["duration"])
        used += 1
        if used == RECENT_INFERENCES:
            break
    return model, (tokens / seconds if seconds > 0 else None)


def rows_by_id(store: Store, record_ids: Sequence[str]) -> list[FeedRow]:
    rows: list[FeedRow] = []
    ids = list(record_ids)
    for start in range(0, len(ids), SQL_VARIABLE_CHUNK):
        chunk = ids[start : start + SQL_VARIABLE_CHUNK]
        marks = ",".join("?" * len(chunk))
        found = store.query(
            f"SELECT {FEED_COLUMNS} FROM records WHERE id IN ({marks})", tuple(chunk)
        )
        rows += [feed_row(row) for row in found]
    return rows


def feed_row(row: sqlite3.Row) -> FeedRow:
    severity = row["severity"] if isinstance(row["severity"], str) else None
    if isinstance(row["summary"], str):
        summary = row["summary"]
    elif row["error"]:
        summary = row["error"]
    else:
        summary = row["raw"]
    return FeedRow(
        key=row["key"],
        record_id=row["id"],
        link=row["link"],
        seq=row["seq"],
        state=row["state"],
        received_at=row["received_at"],
        updated_at=row["updated_at"],
        attempts=row["attempts"],
        severity=severity,
        summary=" ".join(summary.split()),
    )


def history_entry(event: sqlite3.Row) -> HistoryEntry:
    return HistoryEntry(
        at=event["at"],
        step=event["step"],
        from_state=event["from_state"],
        to_state=event["to_state"],
        attempt=event["attempt"] or 0,
        duration_s=event["duration"] or 0.0,
        error=event["error"],
        detail=_json_object(event["detail"]) or None,
    )


def trace_id(history: list[HistoryEntry]) -> str | None:
    for entry in reversed(history):
        if entry.detail and isinstance(entry.detail.get("trace_id"), str):
            return entry.detail["trace_id"]
    return None


def _json_object(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def batches(store: Store) -> tuple[list[BatchView], list[BatchView]]:
    """Return open batches, oldest first, and recent deliveries, newest first."""
    queued = {
        row["batch_id"]: row["n"]
        for row in store.query(
            "SELECT batch_id, COUNT(*) AS n FROM records WHERE state = ?"
            " AND batch_id IS NOT NULL GROUP BY batch_id",
            (str(RecordState.QUEUED),),
        )
    }
    pending = store.query(
        "SELECT * FROM batches WHERE delivered_at IS NULL ORDER BY created_at LIMIT ?",
        (PENDING_BATCH_LIMIT,),
    )
    recent = store.query(
        "SELECT * FROM batches WHERE delivered_at IS NOT NULL"
        " ORDER BY delivered_at DESC LIMIT ?",
        (RECENT_BATCH_LIMIT,),
    )
    return (
        [_batch_view(row, queued.get(row["id"], 0)) for row in pending],
        [_batch_view(row, None) for row in recent],
    )


def _batch_view(row: sqlite3.Row, records: int | None) -> BatchView:
    return BatchView(
        batch_id=row["id"],
        created_at=row["created_at"],
        attempts=row["attempts"] or 0,
        last_status=row["last_status"],
        last_error=row["last_error"],
        delivered_at=row["delivered_at"],
        records=records,
    )
