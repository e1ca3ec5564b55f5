"""Outbox bounds: a disk quota, retention of uploaded records and a time-to-live.

The appliance may run offline for weeks, so the database must not grow without
bound, and it must never silently delete what it has not delivered. The rules,
applied by ``maintain`` in this order:

1. A queued record older than the time-to-live (if one is set) moves to dead
   with the reason "expired", so it stops waiting for a sink that never comes;
   it is kept, not deleted.
2. Uploaded records older than the retention period are deleted with their
   history.
3. While the database's used bytes exceed the quota, the oldest uploaded
   records are deleted, retention or not.
4. If the quota is still exceeded, the outbox is full: intake stops reading
   (the links push back on their devices) and status shows why, until a sync
   or an operator frees space. Unfinished, queued and dead records are never
   deleted by these rules.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from appliance.states import RecordState
from appliance.store import Store

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 500
"""Records deleted per transaction, so a large prune never holds the lock long."""


@dataclasses.dataclass(frozen=True)
class OutboxPolicy:
    """The outbox's bounds; 0 disables a bound."""

    quota_bytes: int = 0
    retain_uploaded_s: float = 7 * 86400.0
    ttl_s: float = 0.0


@dataclasses.dataclass
class OutboxReport:
    """What one ``maintain`` call did and found."""

    expired: int = 0
    pruned: int = 0
    used_bytes: int = 0
    full: bool = False


def used_bytes(store: Store) -> int:
    """Bytes of the database in use: pages minus free pages (WAL excluded)."""
    page_size = store.query("PRAGMA page_size")[0][0]
    pages = store.query("PRAGMA page_count")[0][0]
    free = store.query("PRAGMA freelist_count")[0][0]
    return int((pages - free) * page_size)


def maintain(
    store: Store, policy: OutboxPolicy, now: float | None = None
) -> OutboxReport:
    """Apply the outbox rules once; see the module docstring."""
    now = time.time() if now is None else now
    report = OutboxReport()
    if policy.ttl_s > 0:
        report.expired = _expire(store, now - policy.ttl_s, policy.ttl_s)
    if policy.retain_uploaded_s > 0:
        report.pruned += _prune(store, before=now - policy.retain_uploaded_s)
    report.used_bytes = used_bytes(store)
    if policy.quota_bytes > 0:
        while report.used_bytes > policy.quota_bytes:
            deleted = _prune(store, before=None, limit=PRUNE_CHUNK)
            report.pruned += deleted
            report.used_bytes = used_bytes(store)
            if deleted == 0:
                break
        report.full = report.used_bytes > policy.quota_bytes
    with store.transaction() as conn:
        store.set_sync_state(
            conn,
            outbox_full=int(report.full),
            outbox_used_bytes=report.used_bytes,
            outbox_quota_bytes=policy.quota_bytes,
        )
    if report.expired or report.pruned:
        logger.info(
            "outbox: %d queued records expired, %d uploaded records pruned, "
            "%d bytes used",
            report.expired,
            report.pruned,
            report.used_bytes,
        )
    if report.full:
        logger.error(
            "outbox full: %d bytes used of a %d-byte quota and nothing uploaded is "
            "left to prune; intake is paused until records are uploaded or the "
            "quota ([outbox] quota_bytes) is raised",
            report.used_bytes,
            policy.quota_bytes,
        )
    return report


def _expire(store: Store, before: float, ttl: float) -> int:
    expired = 0
    with store.transaction() as conn:
        rows = conn.execute(
            "SELECT id FROM records WHERE state = ? AND received_at < ?",
            (str(RecordState.QUEUED), before),
        ).fetchall()
        reason = f"expired: not uploaded within the {ttl:g} s time-to-live"
        for row in rows:
            if store.move(
                conn, row["id"], RecordState.QUEUED, RecordState.DEAD, error=reason
            ):
                store.add_event(
                    conn,
                    row["id"],
                    "expire",
                    RecordState.QUEUED,
                    RecordState.DEAD,
                    0,
                    0.0,
                    error=reason,
                )
                expired += 1
    return expired


def _prune(store: Store, before: float | None, limit: int | None = None) -> int:
    """Delete uploaded records (oldest first) uploaded before ``before``."""
    deleted = 0
    while True:
        chunk = PRUNE_CHUNK if limit is None else min(PRUNE_CHUNK, limit - deleted)
        if chunk <= 0:
            return deleted
        with store.transaction() as conn:
            sql = "SELECT id FROM records WHERE state = ?"
            params: list[object] = [str(RecordState.UPLOADED)]
            if before is not None:
                sql += " AND uploaded_at < ?"
                params.append(before)
            sql += " ORDER BY uploaded_at LIMIT ?"
            params.append(chunk)
            ids = [row["id"] for row in conn.execute(sql, params).fetchall()]
            if not ids:
                return deleted
            marks = ",".join("?" * len(ids))
            conn.execute(f"DELETE FROM events WHERE record_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM messages WHERE record_id IN ({marks})", ids)
            conn.execute(
                f"DELETE FROM records WHERE id IN ({marks}) AND state = ?",
                (*ids, str(RecordState.UPLOADED)),
            )
        deleted += len(ids)
        if len(ids) < chunk:
            return deleted
