"""A large backlog through a sink that fails in every way the contract allows.

The uploader runs against ``tests.fault_server.FaultServer`` on loopback, whose
script cycles through 429 with and without Retry-After (seconds and HTTP date),
500, 502, 503 and 504, resets before and after the server stored the batch,
answers slower than the client's timeout, truncated answers and partial
rejections, while a second thread takes the server off the network and back.
Every record must end uploaded exactly once at the server (after its
de-duplication by batch key and record id) or dead with the server's reason,
and `appliance status` must count what happened. 10,000 records run by
default; the ``slow`` variant drains 50,000.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from appliance.states import RecordState
from appliance.status import collect_status
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader
from tests.fault_server import Fault, FaultServer, retry_after_date
from tests.test_sync import PROXY_VARIABLES, add_queued_records

CLIENT_TIMEOUT = 1.0


@pytest.fixture(autouse=True)
def _direct_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def fault_cycle() -> list[Fault]:
    ok = Fault()
    return [
        ok,
        Fault(429, retry_after="1"),
        ok,
        Fault(429),
        Fault(500),
        ok,
        Fault(502),
        Fault(503, retry_after=retry_after_date(1)),
        ok,
        Fault(504),
        Fault(reset=True, store=False),
        ok,
        Fault(reset=True),  # stored, then the answer is lost
        Fault(delay=CLIENT_TIMEOUT * 2),  # stored, answered after the timeout
        ok,
        Fault(truncate=True),
        Fault(reject_fraction=0.01, reject_reason="value out of range"),
        ok,
    ]


def drain(tmp_path: Path, records: int) -> None:
    db = tmp_path / DB_NAME
    for start in range(0, records, 10_000):
        add_queued_records(db, min(10_000, records - start))
    with FaultServer(
        script=itertools.cycle(fault_cycle()), default=Fault(), seed=5
    ) as server:
        uploader = Uploader(
            db,
            server.url,
            batch_size=500,
            timeout=CLIENT_TIMEOUT,
            max_backoff=0.5,
        )
        stop = threading.Event()

        def flap() -> None:
            # Off the network twice for a second while the sync runs.
            for _ in range(2):
                if stop.wait(1.5):
                    return
                server.set_reachable(False)
                stop.wait(1.0)
                server.set_reachable(True)

        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        try:
            deadline = time.monotonic() + 600
            result = None
            while time.monotonic() < deadline:
                result = uploader.sync(deadline=deadline)
                if result.remaining == 0:
                    break
        finally:
            stop.set()
            flapper.join(timeout=10)
            uploader.close()
        assert result is not None
        assert result.remaining == 0

        store = Store(db, readonly=True)
        try:
            rows = store.query("SELECT id, state, error FROM records")
        finally:
            store.close()
        uploaded = {row["id"] for row in rows if row["state"] == RecordState.UPLOADED}
        dead = {
            row["id"]: row["error"] for row in rows if row["state"] == RecordState.DEAD
        }
        assert len(uploaded) + len(dead) == records
        assert set(server.accepted) == uploaded
        assert max(server.accepted.values()) == 1
        assert set(dead) == set(server.rejected)
        assert all("value out of range" in error for error in dead.values())

    sync = collect_status(tmp_path)["sync"]
    assert sync["retries"] > 0
    assert sync["rejected"] == len(dead)
    assert sync["last_success_at"] is not None


def test_ten_thousand_records_through_every_fault(tmp_path: Path) -> None:
    drain(tmp_path, 10_000)


@pytest.mark.slow
def test_fifty_thousand_record_backlog(tmp_path: Path) -> None:
    drain(tmp_path, 50_000)
