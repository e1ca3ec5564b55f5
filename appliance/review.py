"""Review work: which records a larger model checks, and how its records compare.

A review sends a record's raw line, with the same chat messages and schema the
local model got, to an OpenAI-compatible endpoint and stores the reviewer's
``log_event`` object beside the local one, with a verdict per field. Three
rules select records:

- the drift sample: a fixed fraction of validated ``log_event`` records, chosen
  by a hash of the record id, so the choice survives restarts;
- doubtful records: the local model needed more than one attempt, the line was
  cut before the model saw it, or the severity is two or more levels from the
  level the line logs (the keyword baseline's reading);
- records named by the operator, dead letters included (``appliance review``).

Review work lives in the ``reviews`` table of the appliance database, so it
waits durably while the endpoint is unreachable. Selection reads ``validate``
events after a cursor kept in ``review_state`` and commits the cursor with the
rows it adds, so no record is selected twice and none is skipped after a crash.
The cursor starts at the newest event when the tables are first created:
records validated before review was enabled are reviewed only on request.

The activity that sends the requests is in ``appliance.review_worker``.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from appliance.baseline import classify_line
from appliance.config import ReviewConfig
from appliance.errors import ApplianceError
from appliance.log_event import LogEvent, Severity
from appliance.prompts import MAX_LINE_CHARS
from appliance.states import RecordKind, RecordState
from appliance.store import Store

SELECTION_BATCH_EVENTS = 5000
"""Events scanned per selection pass, so one pass never holds the write lock long."""
TEXT_AGREEMENT_MIN = 0.4
"""Word overlap (Jaccard index of lower-case words) at which two free-text
fields count as agreeing. A heuristic: paraphrases of one event share most
content words, while summaries of different events rarely reach 0.4."""
DECISION_FIELDS = ("severity", "component", "event_type", "action_required")
"""Fields that a record's agreement rate is computed over. The free-text fields
get a verdict too, but word overlap is too rough to count towards the rate."""
TEXT_FIELDS = ("summary", "suggested_action")
SEVERITY_RANK = {severity: rank for rank, severity in enumerate(Severity)}
DOUBTFUL_SEVERITY_GAP = 2
"""Severity levels between the model's output and the logged level at which a
record counts as doubtful. One level apart is a normal judgement call."""
REQUEST_LOG_DAYS = 31
"""Days that rows of ``review_requests`` are kept; they feed the daily budget,
the limiter after a restart, and the status figures of the current day."""


class ReviewState(enum.StrEnum):
    """Position of one review's work."""

    PENDING = "pending"
    """Waiting to be sent, or requeued after a throttle or failure until
    ``next_attempt_at``."""
    DONE = "done"
    """The reviewer's record and the verdicts are stored."""
    FAILED = "failed"
    """Given up after the retry policy's attempts; ``last_error`` contains the reason."""


class ReviewPriority(enum.IntEnum):
    """Order in which pending reviews are sent; lower goes first."""

    REQUESTED = 0
    DOUBTFUL = 1
    SAMPLE = 2


class ReviewRequestError(ApplianceError):
    """An operator's review request named no record, several, or a ``json`` record.

    Attributes:
        record_id: the id or id prefix given.
    """

    def __init__(self, message: str, record_id: str) -> None:
        super().__init__(message)
        self.record_id = record_id


# Tables ----------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    record_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    requested_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    throttled INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    local_data TEXT,
    review_data TEXT,
    verdicts TEXT,
    agreement REAL,
    reviewer_model TEXT,
    structured_output TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    reviewed_at REAL
);
CREATE INDEX IF NOT EXISTS reviews_due
    ON reviews (state, priority, next_attempt_at);
CREATE TABLE IF NOT EXISTS review_requests (
    id INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    at REAL NOT NULL,
    reserved_tokens INTEGER NOT NULL,
    status INTEGER,
    outcome TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    duration REAL
);
CREATE INDEX IF NOT EXISTS review_requests_at ON review_requests (at);
CREATE TABLE IF NOT EXISTS review_state (key TEXT PRIMARY KEY, value TEXT);
"""
"""``reviews`` contains one row of work per record, and ``review_requests`` one
row per HTTP request with its token reservation, usage and cost. ``review_state``
contains the selection cursor, the settings that status reads, and pause reasons."""

CURSOR_KEY = "selected_through_event"


def ensure_schema(store: Store) -> None:
    """Create the review tables if missing, with the cursor at the newest event."""
    with store.transaction() as conn:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        newest = conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
        conn.execute(
            "INSERT OR IGNORE INTO review_state (key, value) VALUES (?, ?)",
            (CURSOR_KEY, str(newest)),
        )


def has_review_tables(store: Store) -> bool:
    """Return True when the database contains the review tables (read-only safe)."""
    rows = store.query(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reviews'"
    )
    return bool(rows)


def set_review_state(conn: sqlite3.Connection, **values: object) -> None:
    """Set ``review_state`` keys inside an open transaction; None deletes a key."""
    for key, value in values.items():
        if value is None:
            conn.execute("DELETE FROM review_state WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO review_state (key, value) VALUES (?, ?)",
                (key, str(value)),
            )


def review_state(store: Store) -> dict[str, str]:
    """Return every ``review_state`` key and value."""
    rows = store.query("SELECT key, value FROM review_state")
    return {row["key"]: row["value"] for row in rows}


def save_settings(store: Store, config: ReviewConfig) -> None:
    """Store the settings that ``appliance status`` reports, without the key file."""
    settings = {
        "enabled": config.enabled,
        "base_url": config.base_url,
        "model": config.model,
        "sample_fraction": config.sample_fraction,
        "requests_per_minute": config.requests_per_minute,
        "tokens_per_minute": config.tokens_per_minute,
        "daily_budget": config.daily_budget,
        "agreement_alert_below": config.agreement_alert_below,
        "agreement_window": config.agreement_window,
    }
    with store.transaction() as conn:
        set_review_state(conn, settings=json.dumps(settings))


# Selection -------------------------------------------------------------------


def in_drift_sample(record_id: str, fraction: float) -> bool:
    """Return True when ``record_id`` falls in the drift sample of ``fraction``.

    The first 8 bytes of the id's SHA-256 are read as a number in [0, 1), so
    the choice is stable across restarts and spread evenly over records.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def doubt_reasons(
    record: sqlite3.Row | Mapping[str, Any], data: Mapping[str, Any]
) -> list[str]:
    """Return why a validated record is doubtful; empty when nothing marks it.

    ``retried``: it took more than one inference attempt. ``line_cut``: the
    device or the prompt cut its line. ``severity_far_from_level``: the line
    logs a level and the model's severity is ``DOUBTFUL_SEVERITY_GAP`` or more
    levels away from the severity that level maps to.
    """
    reasons = []
    if (record["attempts"] or 0) > 1:
        reasons.append("retried")
    flags = (record["flags"] or "").split(",")
    if "truncated" in flags or len(record["raw"]) > MAX_LINE_CHARS:
        reasons.append("line_cut")
    baseline = classify_line(record["raw"])
    severity = data.get("severity")
    if baseline.component is not None and severity in SEVERITY_RANK:
        gap = abs(SEVERITY_RANK[Severity(severity)] - SEVERITY_RANK[baseline.severity])
        if gap >= DOUBTFUL_SEVERITY_GAP:
            reasons.append("severity_far_from_level")
    return reasons


def select_new(store: Store, config: ReviewConfig) -> int:
    """Add review work for records validated since the last pass; return how many.

    Each pass scans at most ``SELECTION_BATCH_EVENTS`` events and commits the
    rows it adds with the advanced cursor.
    """
    state = review_state(store)
    cursor = int(state.get(CURSOR_KEY, "0"))
    newest = store.query("SELECT MAX(id) AS m FROM events")[0]["m"] or 0
    if newest <= cursor:
        return 0
    upper = min(newest, cursor + SELECTION_BATCH_EVENTS)
    rows = store.query(
        "SELECT r.id, r.raw, r.flags, r.attempts, r.data FROM events e"
        " JOIN records r ON r.id = e.record_id"
        " WHERE e.id > ? AND e.id <= ? AND e.step = 'validate' AND e.to_state = ?"
        " AND r.kind = ? ORDER BY e.id",
        (cursor, upper, str(RecordState.VALIDATED), str(RecordKind.LOG_EVENT)),
    )
    added = 0
    now = store.clock()
    with store.transaction() as conn:
        for row in rows:
            data = json.loads(row["data"]) if row["data"] else {}
            reasons = doubt_reasons(row, data) if config.review_doubtful else []
            if reasons:
                reason, priority = (
                    "doubtful: " + ", ".join(reasons),
                    ReviewPriority.DOUBTFUL,
                )
            elif in_drift_sample(row["id"], config.sample_fraction):
                reason, priority = "sample", ReviewPriority.SAMPLE
            else:
                continue
            added += _insert_review(conn, row["id"], reason, priority, row["data"], now)
        set_review_state(conn, **{CURSOR_KEY: upper})
    return added


def _insert_review(
    conn: sqlite3.Connection,
    record_id: str,
    reason: str,
    priority: ReviewPriority,
    local_data: str | None,
    now: float,
) -> int:
    cursor = conn.execute(
        "INSERT OR IGNORE INTO reviews (record_id, reason, priority, state,"
        " requested_at, updated_at, local_data) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record_id,
            reason,
            int(priority),
            str(ReviewState.PENDING),
            now,
            now,
            local_data,
        ),
    )
    return cursor.rowcount


def request_review(store: Store, record_id: str) -> str:
    """Queue a review of one ``log_event`` record, dead letters included.

    An id prefix is enough. A record reviewed before is reviewed again, and
    its earlier result is replaced when the new one arrives. Returns the full
    record id.

    Raises:
        ReviewRequestError: no record or several match, or it is a ``json`` record.
        StoreError: SQLite failed.
    """
    ensure_schema(store)
    matches = store.query(
        "SELECT id, kind FROM records WHERE substr(id, 1, ?) = ?",
        (len(record_id), record_id),
    )
    if not matches:
        raise ReviewRequestError(
            f"no record with id {record_id!r}; list ids with `appliance records`",
            record_id,
        )
    if len(matches) > 1:
        raise ReviewRequestError(
            f"id prefix {record_id!r} matches {len(matches)} records; give more "
            "of the id",
            record_id,
        )
    if matches[0]["kind"] != RecordKind.LOG_EVENT:
        raise ReviewRequestError(
            f"record {matches[0]['id']} is a {matches[0]['kind']} record; only "
            "log_event records have model output to review",
            record_id,
        )
    full_id = str(matches[0]["id"])
    with store.transaction() as conn:
        _requeue_review(store, conn, full_id)
    return full_id


def request_all_dead(store: Store) -> int:
    """Queue a review of every dead ``log_event`` record; return how many."""
    ensure_schema(store)
    rows = store.query(
        "SELECT id FROM records WHERE state = ? AND kind = ?"
        " ORDER BY received_at, link, seq",
        (str(RecordState.DEAD), str(RecordKind.LOG_EVENT)),
    )
    with store.transaction() as conn:
        for row in rows:
            _requeue_review(store, conn, row["id"])
    return len(rows)


def _requeue_review(store: Store, conn: sqlite3.Connection, record_id: str) -> None:
    record = conn.execute(
        "SELECT state, data FROM records WHERE id = ?", (record_id,)
    ).fetchone()
    reason = "dead_letter" if record["state"] == RecordState.DEAD else "requested"
    now = store.clock()
    conn.execute(
        "INSERT INTO reviews (record_id, reason, priority, state, requested_at,"
        " updated_at, local_data) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (record_id) DO UPDATE SET reason = excluded.reason,"
        " priority = excluded.priority, state = excluded.state,"
        " requested_at = excluded.requested_at, updated_at = excluded.updated_at,"
        " local_data = excluded.local_data, attempts = 0, throttled = 0,"
        " next_attempt_at = 0, last_error = NULL",
        (
            record_id,
            reason,
            int(ReviewPriority.REQUESTED),
            str(ReviewState.PENDING),
            now,
            now,
            record["data"],
        ),
    )


def next_due(store: Store) -> str | None:
    """Return the record id of the pending review to send next, or None."""
    rows = store.query(
        "SELECT record_id FROM reviews WHERE state = ? AND next_attempt_at <= ?"
        " ORDER BY priority, requested_at LIMIT 1",
        (str(ReviewState.PENDING), store.clock()),
    )
    return str(rows[0]["record_id"]) if rows else None


# Verdicts --------------------------------------------------------------------


def compare_records(
    local: Mapping[str, Any] | None, reviewer: Mapping[str, Any]
) -> tuple[dict[str, str], float | None]:
    """Return a verdict per ``log_event`` field and the record's agreement rate.

    Verdicts are ``agree``, ``disagree``, or ``no_local`` when the local model
    produced no valid record (a dead letter). Enumerations and booleans must be
    equal, ``component`` equal ignoring case, and text fields must share
    ``TEXT_AGREEMENT_MIN`` of their words. The rate is the share of
    ``DECISION_FIELDS`` that agree, or None without a local record.
    """
    if local is None:
        return {field: "no_local" for field in LogEvent.model_fields}, None
    verdicts = {}
    for field in LogEvent.model_fields:
        mine, theirs = local.get(field), reviewer.get(field)
        if field in TEXT_FIELDS:
            same = (
                word_overlap(str(mine or ""), str(theirs or "")) >= TEXT_AGREEMENT_MIN
            )
        elif field == "component":
            same = (
                str(mine or "").strip().casefold()
                == str(theirs or "").strip().casefold()
            )
        else:
            same = mine == theirs
        verdicts[field] = "agree" if same else "disagree"
    agreed = sum(verdicts[field] == "agree" for field in DECISION_FIELDS)
    return verdicts, agreed / len(DECISION_FIELDS)


def word_overlap(first: str, second: str) -> float:
    """Return the Jaccard index of the lower-case words of two texts (1 when both
    are empty)."""
    words_first = set(re.findall(r"[a-z0-9]+", first.lower()))
    words_second = set(re.findall(r"[a-z0-9]+", second.lower()))
    if not words_first and not words_second:
        return 1.0
    return len(words_first & words_second) / len(words_first | words_second)


# Days and costs --------------------------------------------------------------


def utc_day(epoch: float) -> str:
    """Return the UTC date of ``epoch`` as YYYY-MM-DD; budgets reset at 00:00 UTC."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def day_start(epoch: float) -> float:
    """Return the epoch seconds of 00:00 UTC on the day of ``epoch``."""
    return float(calendar.timegm(time.gmtime(epoch)[:3] + (0, 0, 0)))


def request_cost(
    config: ReviewConfig, prompt_tokens: int, completion_tokens: int
) -> float:
    """Return the price of one request from its token counts and the configured prices."""
    return (
        prompt_tokens * config.price_per_1k_prompt_tokens
        + completion_tokens * config.price_per_1k_completion_tokens
    ) / 1000


def spent_today(store: Store, now: float) -> float:
    """Return the cost of the requests sent since 00:00 UTC."""
    row = store.query(
        "SELECT SUM(cost) AS cost FROM review_requests WHERE at >= ?",
        (day_start(now),),
    )[0]
    return float(row["cost"] or 0.0)


def prune_request_log(conn: sqlite3.Connection, now: float) -> None:
    """Delete request log rows older than ``REQUEST_LOG_DAYS`` inside a transaction."""
    conn.execute(
        "DELETE FROM review_requests WHERE at < ?", (now - REQUEST_LOG_DAYS * 86400,)
    )
