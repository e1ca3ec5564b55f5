"""The HTTP sink contract of docs/sync-protocol.md beyond plain delivery:
partial rejection, 413 splitting, bearer tokens, rate limits, probing and the
sync figures in status. The server is a real HTTP server on loopback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.errors import SetupError
from appliance.rate_limit import SlidingWindowLimiter
from appliance.status import collect_status
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader
from tests.http_receiver import HttpReceiver, Reply, unused_port_url
from tests.test_sync import PROXY_VARIABLES, add_queued_records, record_states


@pytest.fixture(autouse=True)
def _direct_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver():
    with HttpReceiver() as server:
        yield server


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / DB_NAME


def sync_once(db_path: Path, url: str, **options) -> None:
    uploader = Uploader(db_path, url, **options)
    try:
        uploader.sync(deadline=None)
    finally:
        uploader.close()


def test_partial_rejection_moves_named_records_to_dead(
    db_path: Path, receiver: HttpReceiver
) -> None:
    ids = add_queued_records(db_path, 4)
    body = json.dumps(
        {
            "rejected": [{"id": ids[1], "reason": "temp_c out of range"}],
            "duplicates": [ids[3]],
        }
    ).encode()
    receiver.add_replies(Reply(200, body=body, content_type="application/json"))
    sync_once(db_path, receiver.url)
    states = record_states(db_path)
    assert states[ids[1]] == "dead"
    assert [states[i] for i in (ids[0], ids[2], ids[3])] == ["uploaded"] * 3
    store = Store(db_path, readonly=True)
    try:
        error = store.get_record(ids[1])["error"]
        sync = store.sync_state()
    finally:
        store.close()
    assert "temp_c out of range" in error
    assert sync["duplicates"] == 1
    assert sync["rejected"] == 1
    assert sync["last_success_at"] is not None


def test_non_json_2xx_body_accepts_everything(
    db_path: Path, receiver: HttpReceiver
) -> None:
    add_queued_records(db_path, 2)
    receiver.add_replies(Reply(200, body=b'{"rejected": "not json typed"}'))
    sync_once(db_path, receiver.url)
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_413_splits_the_batch(db_path: Path, receiver: HttpReceiver) -> None:
    ids = add_queued_records(db_path, 8)
    receiver.add_replies(Reply(413, body=b"too big"))
    sync_once(db_path, receiver.url)
    sizes = [len(request.record_ids()) for request in receiver.requests]
    assert sizes == [8, 4, 4]
    assert set(record_states(db_path).values()) == {"uploaded"}
    sent = [i for request in receiver.requests[1:] for i in request.record_ids()]
    assert sent == ids


def test_413_on_one_record_moves_it_to_dead(
    db_path: Path, receiver: HttpReceiver
) -> None:
    add_queued_records(db_path, 1)
    receiver.add_replies(Reply(413, body=b"too big"))
    sync_once(db_path, receiver.url)
    assert set(record_states(db_path).values()) == {"dead"}


def test_bearer_token_is_sent(
    db_path: Path, receiver: HttpReceiver, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    add_queued_records(db_path, 1)
    sync_once(db_path, receiver.url, token_file=token)
    assert receiver.requests[0].header("Authorization") == "Bearer s3cret"


@pytest.mark.parametrize(
    ("mode", "content", "message"),
    [(0o644, "t", "chmod 600"), (0o600, "  \n", "empty"), (None, "", "cannot be read")],
)
def test_bad_token_file_is_refused(
    db_path: Path, tmp_path: Path, mode: int | None, content: str, message: str
) -> None:
    token = tmp_path / "token"
    if mode is not None:
        token.write_text(content)
        os.chmod(token, mode)
    with pytest.raises(SetupError, match=message):
        Uploader(db_path, "http://127.0.0.1:9/x", token_file=token)


def test_missing_ca_bundle_is_refused(db_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="CA bundle"):
        Uploader(db_path, "https://127.0.0.1:9/x", ca_bundle=tmp_path / "ca.pem")


def test_probe_tells_reachable_from_unreachable(
    db_path: Path, receiver: HttpReceiver
) -> None:
    up = Uploader(db_path, receiver.url)
    down = Uploader(db_path, unused_port_url())
    try:
        assert up.probe(timeout=2)
        assert not down.probe(timeout=2)
    finally:
        up.close()
        down.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_limiter_spaces_requests_per_minute() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(requests_per_minute=3, clock=clock)
    waits = [limiter.acquire(10, sleep=clock.sleep) for _ in range(7)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(60.0)
    assert limiter.waited == pytest.approx(sum(waits))
    # Never more than 3 in any 60-second window.
    times = [at for at, _ in limiter._sent]
    for index in range(len(times) - 3):
        assert times[index + 3] - times[index] >= 60.0


def test_limiter_limits_bytes_per_minute() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(bytes_per_minute=1000, clock=clock)
    assert limiter.acquire(600, sleep=clock.sleep) == 0.0
    assert limiter.acquire(600, sleep=clock.sleep) == pytest.approx(60.0)


def test_limiter_lets_an_oversize_request_through_an_empty_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(bytes_per_minute=100, clock=clock)
    assert limiter.acquire(500, sleep=clock.sleep) == 0.0


def test_rate_limit_waits_show_in_status(
    db_path: Path, receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_queued_records(db_path, 3)
    limiter = SlidingWindowLimiter(requests_per_minute=1)
    limiter.record(1)  # the window is full, so the first batch waits
    monkeypatch.setattr(limiter, "_delay_locked", _one_wait(limiter._delay_locked))
    sync_once(db_path, receiver.url, limiter=limiter)
    status = collect_status(db_path.parent)
    assert status["sync"]["rate_limit_wait_s"] > 0
    assert status["sync"]["batches"] == 1


def _one_wait(real):
    """Report a 0.05 s wait once, then defer to the real window."""
    calls = {"n": 0}

    def delay(size: int, now: float) -> float:
        calls["n"] += 1
        return 0.05 if calls["n"] == 1 else 0.0

    return delay


def test_status_reports_last_error(db_path: Path) -> None:
    add_queued_records(db_path, 1)
    uploader = Uploader(db_path, unused_port_url(), max_backoff=0.1)
    try:
        import time

        uploader.sync(deadline=time.monotonic() + 1.0)
    finally:
        uploader.close()
    sync = collect_status(db_path.parent)["sync"]
    assert sync["last_error"]
    assert sync["retries"] >= 1
