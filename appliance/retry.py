"""Retry policies for workflow activities and uploads, and manual retry of dead records.

A policy decides whether a failed attempt is tried again and after how long.
``requeue_dead`` and ``requeue_all_dead`` are the operator's retry: they put
dead-lettered records back into the workflow with their attempts reset, and
record that in each record's history.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sqlite3

from appliance.errors import ApplianceError
from appliance.states import RecordState
from appliance.store import Store

logger = logging.getLogger(__name__)

REQUEUE_BATCH_SIZE = 200
"""Dead records moved per transaction by ``requeue_all_dead``, so the write
lock is never held long while the daemon is writing too."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed activity is tried again.

    Delays grow as ``initial_interval * backoff_coefficient ** (attempt - 1)``,
    capped at ``maximum_interval``.
    """

    initial_interval: float = 1.0
    """Seconds before the first retry. Default 1."""
    backoff_coefficient: float = 2.0
    """Factor applied to the delay after each failed attempt. Default 2."""
    maximum_interval: float = 60.0
    """Cap on the delay between attempts, in seconds. Default 60."""
    maximum_attempts: int = 3
    """Attempts in total, the first included; 0 means no limit. Default 3."""
    non_retryable_errors: tuple[type[BaseException], ...] = ()
    """Exception types that end the activity at once, without retry."""
    attempt_timeout: float | None = None
    """Seconds one attempt may take; a longer attempt fails with
    ``AttemptTimeoutError`` and its result is discarded. None, the default,
    means no limit. The workflow checks it when the attempt returns, because a
    running llama.cpp call cannot be interrupted."""

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = self.initial_interval * self.backoff_coefficient ** max(attempt - 1, 0)
        return min(self.maximum_interval, raw)

    def jittered_delay(self, attempt: int) -> float:
        """Return a full-jitter delay: uniform between 0 and ``delay(attempt)``."""
        return random.uniform(0, self.delay(attempt))

    def allows_retry(self, attempt: int, error: BaseException) -> bool:
        """Return True when failed attempt ``attempt`` may be followed by another."""
        if isinstance(error, self.non_retryable_errors):
            return False
        return self.maximum_attempts == 0 or attempt < self.maximum_attempts


class AttemptTimeoutError(ApplianceError, TimeoutError):
    """An activity attempt took longer than its policy's ``attempt_timeout``.

    Attributes:
        step: the activity, such as ``infer``.
        elapsed: seconds the attempt took.
        timeout: the policy's ``attempt_timeout`` in seconds.
        record_id: the record being processed.
    """

    def __init__(
        self, step: str, elapsed: float, timeout: float, record_id: str
    ) -> None:
        super().__init__(
            f"{step} attempt timed out after {elapsed:.1f} s (attempt_timeout is "
            f"{timeout:g} s); its result was discarded"
        )
        self.step = step
        self.elapsed = elapsed
        self.timeout = timeout
        self.record_id = record_id


class ManualRetryError(ApplianceError):
    """A manual retry named no record, several records, or a record that is not dead.

    Attributes:
        record_id: the id or id prefix given.
        state: the matched record's state, or None when no single record matched.
    """

    def __init__(self, message: str, record_id: str, state: str | None = None) -> None:
        super().__init__(message)
        self.record_id = record_id
        self.state = state


def requeue_dead(store: Store, record_id: str) -> tuple[str, RecordState]:
    """Put one dead record back into the workflow; an id prefix is enough.

    Returns the full record id and the state it re-entered.

    Raises:
        ManualRetryError: no record or several records match ``record_id``, or
            the record is not dead.
        StoreError: SQLite failed.
    """
    matches = store.query(
        "SELECT id FROM records WHERE substr(id, 1, ?) = ?",
        (len(record_id), record_id),
    )
    if not matches:
        raise ManualRetryError(
            f"no record with id {record_id!r}; list ids with "
            "`appliance records --state dead`",
            record_id,
        )
    if len(matches) > 1:
        raise ManualRetryError(
            f"id prefix {record_id!r} matches {len(matches)} records; give more "
            "of the id",
            record_id,
        )
    full_id = matches[0]["id"]
    with store.transaction() as conn:
        target = _requeue(store, conn, full_id)
    if target is None:
        row = store.get_record(full_id)
        state = row["state"] if row is not None else None
        raise ManualRetryError(
            f"record {full_id} is {state}, not dead; only dead records can be retried",
            record_id,
            state,
        )
    logger.info("record %s: retried by the operator, back in %s", full_id, target)
    return full_id, target


def requeue_all_dead(store: Store) -> int:
    """Put every dead record back into the workflow and return how many moved.

    Raises:
        StoreError: SQLite failed; batches committed before the failure stay.
    """
    rows = store.query(
        "SELECT id FROM records WHERE state = ? ORDER BY received_at, link, seq",
        (str(RecordState.DEAD),),
    )
    ids = [row["id"] for row in rows]
    moved = 0
    for start in range(0, len(ids), REQUEUE_BATCH_SIZE):
        with store.transaction() as conn:
            for record_id in ids[start : start + REQUEUE_BATCH_SIZE]:
                if _requeue(store, conn, record_id) is not None:
                    moved += 1
    logger.info("retried %d dead records by operator request", moved)
    return moved


def _requeue(
    store: Store, conn: sqlite3.Connection, record_id: str
) -> RecordState | None:
    """Move one dead record back inside an open transaction; None if it is not dead."""
    row = conn.execute(
        "SELECT state, attempts, error FROM records WHERE id = ?", (record_id,)
    ).fetchone()
    if row is None or row["state"] != RecordState.DEAD:
        return None
    target = _requeue_state(conn, record_id)
    moved = store.move(
        conn,
        record_id,
        RecordState.DEAD,
        target,
        attempts=0,
        error=None,
        next_attempt_at=0.0,
        # A record the sink rejected goes into a new batch, because resending
        # the old batch id would only replay the sink's stored response.
        batch_id=None,
    )
    if not moved:
        return None
    detail = {
        "manual": True,
        "previous_attempts": row["attempts"],
        "previous_error": row["error"],
    }
    store.add_event(
        conn, record_id, "retry", RecordState.DEAD, target, 0, 0.0, detail=detail
    )
    return target


def _requeue_state(conn: sqlite3.Connection, record_id: str) -> RecordState:
    """Return the state a dead record re-enters: the one its failed step started in.

    A record that died in ``validate`` goes back to ``received``, not
    ``inferred``: validating the same stored output again would fail the same
    way, so its retry is a new inference, as for automatic retries.
    """
    event = conn.execute(
        "SELECT from_state FROM events WHERE record_id = ? AND to_state = ?"
        " ORDER BY id DESC LIMIT 1",
        (record_id, str(RecordState.DEAD)),
    ).fetchone()
    if event is None or event["from_state"] is None:
        return RecordState.RECEIVED
    state = RecordState(event["from_state"])
    if state is RecordState.INFERRED:
        return RecordState.RECEIVED
    return state
