"""Several connections on one database: lock waits, CLI writers, WAL size.

The daemon's threads, the CLI and the TUI each open their own connection to
the same file. These tests run them at once against a real SQLite file and
check that no writer fails with "database is locked" and that the WAL file
stays bounded while a reader keeps its connection open.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance.errors import StoreError
from appliance.inference import SamplingParams
from appliance.retry import RetryPolicy
from appliance.states import FINAL_STATES, RecordKind
from appliance.store import WAL_SIZE_LIMIT, Store
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from tests.conftest import APPLIANCE, FakeEngine

CLI_TIMEOUT = 120.0
"""Seconds one CLI run may take before the test fails."""
RAW = "x" * 2000
"""A 2000-character line, so that a few hundred records fill the WAL."""


def _insert(store: Store, seq: int, kind: RecordKind = RecordKind.JSON) -> None:
    raw = RAW if kind is RecordKind.LOG_EVENT else f'{{"n": {seq}}}'
    with store.transaction() as conn:
        store.insert_record(conn, "test", seq, raw, RAW.encode(), kind)


def _wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


# Waiting for the write lock ------------------------------------------------------


def _hold_write_lock(db: Path, seconds: float, lock_taken: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        lock_taken.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_writer_waits_past_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.store.BUSY_TIMEOUT_MS", 50)
    store = Store(tmp_path / "appliance.db")
    lock_taken = threading.Event()
    holder = threading.Thread(
        target=_hold_write_lock, args=(store.path, 0.5, lock_taken), daemon=True
    )
    holder.start()
    lock_taken.wait(5)

    started = time.monotonic()
    try:
        _insert(store, 1)
        waited = time.monotonic() - started
        count = store.count_link_records("test")
    finally:
        holder.join()
        store.close()

    assert count == 1
    assert waited >= 0.3


def test_lock_held_too_long_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.store.BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr("appliance.store.LOCK_WAIT_SECONDS", 0.2)
    store = Store(tmp_path / "appliance.db")
    lock_taken = threading.Event()
    holder = threading.Thread(
        target=_hold_write_lock, args=(store.path, 1.0, lock_taken), daemon=True
    )
    holder.start()
    lock_taken.wait(5)

    try:
        with pytest.raises(
            StoreError, match="database is locked after .* keeps a transaction open"
        ):
            _insert(store, 1)
        in_transaction = store.conn.in_transaction
    finally:
        holder.join()
    try:
        _insert(store, 2)
        count = store.count_link_records("test")
    finally:
        store.close()

    assert not in_transaction
    assert count == 1


# Daemon threads and CLI processes at once -------------------------------------


def _run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [APPLIANCE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Intake(threading.Thread):
    """Commits one record per transaction, as a link's intake does."""

    def __init__(self, db: Path, stop: threading.Event) -> None:
        super().__init__(name="intake", daemon=True)
        self.db = db
        self.stop = stop
        self.inserted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        store = Store(self.db)
        try:
            while not self.stop.is_set():
                self.inserted += 1
                kind = [RecordKind.LOG_EVENT, RecordKind.JSON][self.inserted % 2]
                _insert(store, self.inserted, kind)
                time.sleep(0.002)
        except BaseException as exc:
            self.error = exc
        finally:
            store.close()


def test_workers_and_cli_share_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "appliance.db"
    Store(db).close()
    # Every model output is invalid, so records keep dying and the CLI keeps
    # finding dead records to put back.
    no_wait = RetryPolicy(initial_interval=0.0, maximum_interval=0.0)
    flow = Workflow(
        db,
        FakeEngine([]),
        "",
        SamplingParams(),
        policies={"infer": no_wait, "validate": no_wait},
    )
    workers = [
        Worker("inference", flow, inference_jobs(flow)),
        Worker("steps", flow, step_jobs(flow)),
    ]
    stop = threading.Event()
    intake = Intake(db, stop)
    for thread in (*workers, intake):
        thread.start()

    runs = []
    try:
        for _ in range(3):
            batch = [
                _run_cli("retry", "--all-dead", "--data-dir", str(data_dir)),
                _run_cli("records", "--state", "dead", "--data-dir", str(data_dir)),
            ]
            for process in batch:
                stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)
                runs.append((process.args[1], process.returncode, stdout, stderr))
    finally:
        stop.set()
        intake.join(10)
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(10)

    for command, code, _, stderr in runs:
        assert code == 0, (command, stderr)
        assert "locked" not in stderr, (command, stderr)
    assert [w.error for w in workers] == [None, None]
    assert intake.error is None
    retried = [int(out.split()[0]) for command, _, out, _ in runs if command == "retry"]
    assert sum(retried) > 0
    store = Store(db, readonly=True)
    try:
        assert store.count_link_records("test") == intake.inserted
    finally:
        store.close()


def test_workers_drive_records_to_final_states(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    store = Store(db)
    for seq in range(1, 21):
        _insert(store, seq, RecordKind.LOG_EVENT)
    no_wait = RetryPolicy(initial_interval=0.0, maximum_interval=0.0)
    flow = Workflow(
        db,
        FakeEngine([]),
        "",
        SamplingParams(),
        policies={"infer": no_wait, "validate": no_wait},
    )
    workers = [
        Worker("inference", flow, inference_jobs(flow)),
        Worker("steps", flow, step_jobs(flow)),
    ]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 30
        while store.unfinished_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = store.state_counts()
    finally:
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(10)
        store.close()

    assert {state for state, n in counts.items() if n} <= set(FINAL_STATES)
    assert sum(counts.values()) == 20


# WAL size -------------------------------------------------------------------------


class PollingReader(threading.Thread):
    """Keeps one read-only connection open and reads state counts every 5 ms,
    as a status screen refreshing far faster than a person reads would."""

    def __init__(self, db: Path) -> None:
        super().__init__(name="reader", daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.reads = 0

    def run(self) -> None:
        store = Store(self.db, readonly=True)
        try:
            while not self.stop.is_set():
                store.state_counts()
                self.reads += 1
                time.sleep(0.005)
        finally:
            store.close()


def test_wal_bounded_with_open_reader(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    store = Store(db)
    reader = PollingReader(db)
    reader.start()
    largest = 0
    try:
        # About 9 pages per commit, so 800 commits write some 28 MiB of WAL
        # frames: several times the size at which the WAL is restarted.
        for seq in range(1, 801):
            _insert(store, seq)
            largest = max(largest, _wal_size(db))
    finally:
        reader.stop.set()
        reader.join(10)
        store.close()

    assert reader.reads > 0
    assert largest <= 2 * WAL_SIZE_LIMIT


def test_pinned_reader_lets_wal_grow_until_done(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    store = Store(db)
    _insert(store, 1)
    pinned = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    pinned.execute("BEGIN")
    pinned.execute("SELECT COUNT(*) FROM records").fetchall()
    try:
        for seq in range(2, 402):
            _insert(store, seq)
        grown = _wal_size(db)
        started = time.monotonic()
        busy, _, _ = store.checkpoint("TRUNCATE")
        checkpoint_seconds = time.monotonic() - started
    finally:
        pinned.execute("COMMIT")
        pinned.close()
    try:
        after_busy, _, _ = store.checkpoint("TRUNCATE")
        emptied = _wal_size(db)
    finally:
        store.close()

    assert grown > WAL_SIZE_LIMIT
    assert busy is True
    assert checkpoint_seconds < 1.0
    assert after_busy is False
    assert emptied == 0


def test_idle_worker_empties_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.workflow.CHECKPOINT_INTERVAL", 0.0)
    db = tmp_path / "appliance.db"
    store = Store(db)
    for seq in range(1, 51):
        _insert(store, seq)
    before = _wal_size(db)
    flow = Workflow(db, None, "", SamplingParams())
    worker = Worker("steps", flow, lambda _store: [])
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while _wal_size(db) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = _wal_size(db)
    finally:
        worker.stop()
        worker.join(10)
        store.close()

    assert before > 0
    assert after == 0
    assert worker.error is None
