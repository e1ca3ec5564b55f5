"""Outbox bounds on a real SQLite file: retention, quota, time-to-live, status."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.outbox import OutboxPolicy, maintain, used_bytes
from appliance.states import RecordState
from appliance.status import collect_status
from appliance.store import DB_NAME, Store
from tests.test_sync import add_queued_records


def upload(db: Path, ids: list[str], at: float) -> None:
    store = Store(db)
    try:
        with store.transaction() as conn:
            for record_id in ids:
                assert store.move(
                    conn,
                    record_id,
                    RecordState.QUEUED,
                    RecordState.UPLOADED,
                    uploaded_at=at,
                )
    finally:
        store.close()


def states(db: Path) -> dict[str, str]:
    store = Store(db, readonly=True)
    try:
        return {row["id"]: row["state"] for row in store.list_records()}
    finally:
        store.close()


def run(db: Path, policy: OutboxPolicy, now: float | None = None):
    store = Store(db)
    try:
        return maintain(store, policy, now)
    finally:
        store.close()


def test_retention_prunes_only_old_uploaded_records(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    ids = add_queued_records(db, 6)
    now = time.time()
    upload(db, ids[:2], now - 100)
    upload(db, ids[2:4], now - 1)
    report = run(db, OutboxPolicy(retain_uploaded_s=50), now)
    assert report.pruned == 2
    left = states(db)
    assert set(left) == set(ids[2:])
    assert [left[i] for i in ids[4:]] == ["queued", "queued"]


def test_pruned_records_lose_their_history(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    ids = add_queued_records(db, 2)
    upload(db, ids, time.time() - 100)
    run(db, OutboxPolicy(retain_uploaded_s=10))
    store = Store(db, readonly=True)
    try:
        assert store.query("SELECT COUNT(*) AS n FROM events")[0]["n"] == 0
    finally:
        store.close()


def test_quota_prunes_uploaded_first_and_never_queued(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    ids = add_queued_records(db, 3000)
    upload(db, ids[:2000], time.time())
    store = Store(db)
    try:
        full_size = used_bytes(store)
    finally:
        store.close()
    report = run(db, OutboxPolicy(quota_bytes=full_size // 2, retain_uploaded_s=0))
    left = states(db)
    assert all(left[i] == "queued" for i in ids[2000:])
    assert report.pruned > 0
    assert not report.full


def test_quota_that_queued_records_exceed_pauses_intake(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    ids = add_queued_records(db, 500)
    report = run(db, OutboxPolicy(quota_bytes=4096))
    assert report.full
    assert len(states(db)) == len(ids)
    status = collect_status(tmp_path)
    assert status["outbox"]["full"] is True
    assert status["outbox"]["quota_bytes"] == 4096


def test_ttl_moves_old_queued_records_to_dead(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    ids = add_queued_records(db, 3)
    report = run(db, OutboxPolicy(ttl_s=60), now=time.time() + 120)
    assert report.expired == 3
    store = Store(db, readonly=True)
    try:
        rows = store.list_records()
    finally:
        store.close()
    assert {row["state"] for row in rows} == {"dead"}
    assert all("expired" in row["error"] for row in rows)
    assert len(rows) == len(ids)
