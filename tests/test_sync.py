"""Store-and-forward upload: ``Uploader``, ``parse_retry_after`` and ``appliance sync``.

Every test talks to a real HTTP server on 127.0.0.1 (``tests.http_receiver``).
Records are built without a model, either through ``Store.insert_record`` and
``Store.move`` or with ``appliance replay --kind json``.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader, parse_retry_after
from tests.http_receiver import HttpReceiver, Reply, unused_port_url

APPLIANCE = Path(sys.executable).parent / "appliance"
CLI_TIMEOUT = 60.0
"""Seconds any single CLI run may take before the test fails."""
SYNC_DEADLINE = 20.0
"""Seconds an in-process ``Uploader.sync`` may keep retrying."""

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


@pytest.fixture(autouse=True)
def _direct_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours proxy variables, which would send loopback requests elsewhere.
    # The CLI subprocesses inherit the cleaned environment.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def add_queued_records(db_path: Path, count: int, link: str = "sensor-a") -> list[str]:
    """Insert ``count`` JSON records and move them straight to queued with ``data`` set.

    Returns the record ids in insertion order, which is also upload order.
    """
    store = Store(db_path)
    try:
        first_seq = store.next_seq(link)
        record_ids = []
        with store.transaction() as conn:
            for seq in range(first_seq, first_seq + count):
                payload = {"sensor": link, "seq": seq, "value": seq * 0.5}
                raw = json.dumps(payload)
                record_id = store.insert_record(
                    conn, link, seq, raw, raw.encode("utf-8"), RecordKind.JSON
                )
                assert record_id is not None
                moved = store.move(
                    conn,
                    record_id,
                    RecordState.RECEIVED,
                    RecordState.QUEUED,
                    data=json.dumps(payload, separators=(",", ":")),
                    attempts=1,
                )
                assert moved
                record_ids.append(record_id)
        return record_ids
    finally:
        store.close()


def record_states(db_path: Path) -> dict[str, str]:
    """Return each record's state by id."""
    store = Store(db_path, readonly=True)
    try:
        return {row["id"]: row["state"] for row in store.list_records()}
    finally:
        store.close()


def batch_record_ids(db_path: Path, batch_id: str) -> list[str]:
    """Return the ids of the records assigned to ``batch_id``, in upload order."""
    store = Store(db_path, readonly=True)
    try:
        rows = store.query(
            "SELECT id FROM records WHERE batch_id = ? ORDER BY received_at, link, seq",
            (batch_id,),
        )
        return [row["id"] for row in rows]
    finally:
        store.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``appliance`` command and return its exit code and output."""
    return subprocess.run(
        [str(APPLIANCE), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def open_uploader(
    db_path: Path, url: str, **options: float | int | bool
) -> Iterator[Uploader]:
    uploader = Uploader(db_path, url, **options)  # type: ignore[arg-type]
    try:
        yield uploader
    finally:
        uploader.close()


# One sync run -------------------------------------------------------------------


def test_sync_delivers_each_record_once(data_dir: Path, receiver: HttpReceiver) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 5)

    with open_uploader(db_path, receiver.url) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 1
    request = requests[0]
    assert request.method == "POST"
    assert request.path == "/ingest"
    assert request.header("Content-Type") == "application/x-ndjson"
    assert request.header("Content-Encoding") == "gzip"
    assert request.header("Idempotency-Key")
    assert request.decode_error is None
    assert request.record_ids() == record_ids
    assert result.batches == 1
    assert result.records == 5
    assert result.failures == 0
    assert result.remaining == 0
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_second_sync_sends_no_request(data_dir: Path, receiver: HttpReceiver) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 3)

    with open_uploader(db_path, receiver.url) as uploader:
        first = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
    with open_uploader(db_path, receiver.url) as uploader:
        second = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert first.records == 3
    assert second.batches == 0
    assert second.records == 0
    assert second.remaining == 0
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [201, 202, 204])
def test_any_2xx_marks_records_uploaded(
    data_dir: Path, receiver: HttpReceiver, status: int
) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 2)
    receiver.add_replies(Reply(status))

    with open_uploader(db_path, receiver.url) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert len(receiver.requests) == 1
    assert result.records == 2
    assert set(record_states(db_path).values()) == {"uploaded"}


# Resending the same batch -------------------------------------------------------


def test_resend_after_500_keeps_key_and_records(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 4)
    receiver.add_replies(Reply(500, body=b"internal error"))

    with open_uploader(db_path, receiver.url, max_backoff=0.2) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    assert requests[0].reply.status == 500
    assert requests[1].reply.status == 200
    assert requests[1].header("Idempotency-Key") == requests[0].header(
        "Idempotency-Key"
    )
    assert requests[0].record_ids() == record_ids
    assert requests[1].record_ids() == record_ids
    assert result.failures == 1
    assert result.records == 4
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_read_timeout_resends_same_key(data_dir: Path, receiver: HttpReceiver) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 2)
    # The first response comes after the client's 0.5 s timeout, so the client
    # cannot know whether the batch arrived and must resend it unchanged.
    receiver.add_replies(Reply(200, delay=3.0))

    with open_uploader(db_path, receiver.url, timeout=0.5, max_backoff=0.1) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    assert requests[1].header("Idempotency-Key") == requests[0].header(
        "Idempotency-Key"
    )
    assert requests[1].record_ids() == record_ids
    assert result.failures == 1
    assert result.remaining == 0
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_connection_reset_resends_same_key(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 2)
    receiver.add_replies(Reply(reset=True))

    with open_uploader(db_path, receiver.url, max_backoff=0.1) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    assert requests[1].header("Idempotency-Key") == requests[0].header(
        "Idempotency-Key"
    )
    assert requests[1].record_ids() == record_ids
    assert result.failures == 1
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_crash_before_post_resends_assigned_batch(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 3)

    # A process that assigned a batch and stopped before its POST.
    crashed = Uploader(db_path, receiver.url, batch_size=2)
    store = Store(db_path)
    try:
        batch_id = crashed._next_batch(store)
    finally:
        store.close()
        crashed.close()
    assert batch_id is not None
    assert batch_record_ids(db_path, batch_id) == record_ids[:2]
    assert receiver.requests == []

    # The next process uses a larger batch size, which must not regroup the open batch.
    with open_uploader(db_path, receiver.url, batch_size=200) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    assert requests[0].header("Idempotency-Key") == batch_id
    assert requests[0].record_ids() == record_ids[:2]
    assert requests[1].header("Idempotency-Key") != batch_id
    assert requests[1].record_ids() == record_ids[2:]
    assert result.records == 3
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_batch_body_respects_max_batch_bytes(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    store = Store(db_path)
    try:
        with store.transaction() as conn:
            for seq in range(1, 5):
                # Each backslash is 2 characters in raw but 4 bytes once raw is a JSON string.
                payload = {"path": "\\" * 5000, "seq": seq}
                raw = json.dumps(payload)
                record_id = store.insert_record(
                    conn, "paths", seq, raw, raw.encode("utf-8"), RecordKind.JSON
                )
                assert record_id is not None
                store.move(
                    conn,
                    record_id,
                    RecordState.RECEIVED,
                    RecordState.QUEUED,
                    data=json.dumps(payload, separators=(",", ":")),
                    attempts=1,
                )
    finally:
        store.close()
    max_batch_bytes = 50_000

    with open_uploader(
        db_path, receiver.url, max_batch_bytes=max_batch_bytes, compress=False
    ) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert result.records == 4
    for request in receiver.requests:
        assert len(request.raw_body) <= max_batch_bytes


# Retry-After ----------------------------------------------------------------------


def test_retry_after_seconds_delays_resend(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 2)
    receiver.add_replies(Reply(429, retry_after="1"))

    # max_backoff keeps the jittered fallback delay far below 1 s, so a gap of
    # about 1 s can only come from the header.
    with open_uploader(db_path, receiver.url, max_backoff=0.05) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    gap = requests[1].received_at - requests[0].received_at
    assert gap >= 0.9
    assert gap < 5.0
    assert requests[1].header("Idempotency-Key") == requests[0].header(
        "Idempotency-Key"
    )
    assert result.remaining == 0


def test_retry_after_http_date_delays_resend(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 2)
    # HTTP dates have whole seconds, so now + 2 s requests a wait of 1 s to 2 s.
    retry_at = email.utils.formatdate(time.time() + 2, usegmt=True)
    receiver.add_replies(Reply(503, retry_after=retry_at))

    with open_uploader(db_path, receiver.url, max_backoff=0.05) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    requests = receiver.requests
    assert len(requests) == 2
    gap = requests[1].received_at - requests[0].received_at
    assert gap >= 0.9
    assert gap < 5.0
    assert result.remaining == 0


def test_huge_retry_after_keeps_sync_running(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 1)
    receiver.add_replies(Reply(503, retry_after="99999999999"))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run_sync(uploader: Uploader) -> None:
        try:
            uploader.sync(deadline=None, stop=stop)
        except BaseException as exc:
            errors.append(exc)

    # deadline=None with a stop event is how the daemon and `sync` without --once run.
    with open_uploader(db_path, receiver.url) as uploader:
        thread = threading.Thread(target=run_sync, args=(uploader,), daemon=True)
        thread.start()
        assert len(receiver.wait_for_requests(1, timeout=10)) == 1
        # Let sync reach its wait, because a stop set earlier would hide the failure.
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=10)

    assert not thread.is_alive()
    assert errors == []
    assert set(record_states(db_path).values()) == {"queued"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),
        ("garbage", None),
        ("", None),
        ("-1", None),
        ("1.5", None),
        (None, None),
    ],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_future_date() -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0


def test_parse_retry_after_non_ascii_digit() -> None:
    # httpx decodes a header byte 0xB2 as '²' (ISO-8859-1), so a server can send this.
    assert parse_retry_after("\u00b2") is None


def test_parse_retry_after_asctime_date() -> None:
    assert parse_retry_after("Sun Nov  6 08:49:37 1994") == 0.0


# The `appliance sync` command ----------------------------------------------------


def test_sync_gzip_lines_match_records_jsonl(
    tmp_path: Path, data_dir: Path, receiver: HttpReceiver
) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_text(
        '{"sensor": "t1", "value": 21.5}\n'
        '{"sensor": "t2", "value": -3, "note": "µ-range, \\"quoted\\""}\n'
        '{"sensor": "t3", "tags": ["a", "b"], "nested": {"ok": true}}\n',
        encoding="utf-8",
    )
    replay = run_cli(
        "replay", str(source), "--kind", "json", "--data-dir", str(data_dir)
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == "queued=3"

    sync = run_cli(
        "sync", "--once", "--upload-url", receiver.url, "--data-dir", str(data_dir)
    )
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.strip() == "uploaded 3 records in 1 batches; 0 still queued"

    listing = run_cli("records", "--format", "jsonl", "--data-dir", str(data_dir))
    assert listing.returncode == 0, listing.stderr
    listed = [json.loads(line) for line in listing.stdout.splitlines()]
    requests = receiver.requests
    assert len(requests) == 1
    assert requests[0].header("Content-Encoding") == "gzip"
    assert requests[0].header("Content-Type") == "application/x-ndjson"
    uploaded = requests[0].ndjson()
    assert len(uploaded) == 3
    assert len(listed) == 3
    for sent, printed in zip(uploaded, listed, strict=True):
        assert sent["state"] == "queued"
        assert printed["state"] == "uploaded"
        assert {**sent, "state": "uploaded"} == printed

    again = run_cli(
        "sync", "--once", "--upload-url", receiver.url, "--data-dir", str(data_dir)
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "uploaded 0 records in 0 batches; 0 still queued"
    assert len(receiver.requests) == 1


def test_sync_no_gzip_sends_plain_ndjson(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    record_ids = add_queued_records(data_dir / DB_NAME, 3)

    sync = run_cli(
        "sync",
        "--once",
        "--no-gzip",
        "--upload-url",
        receiver.url,
        "--data-dir",
        str(data_dir),
    )

    assert sync.returncode == 0, sync.stderr
    requests = receiver.requests
    assert len(requests) == 1
    assert requests[0].header("Content-Encoding") is None
    assert requests[0].header("Content-Type") == "application/x-ndjson"
    assert requests[0].raw_body.endswith(b"\n")
    lines = requests[0].raw_body.decode("utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == record_ids


def test_sync_batch_size_splits_450_records(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 450)

    sync = run_cli(
        "sync",
        "--once",
        "--batch-size",
        "200",
        "--upload-url",
        receiver.url,
        "--data-dir",
        str(data_dir),
    )

    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.strip() == "uploaded 450 records in 3 batches; 0 still queued"
    requests = receiver.requests
    assert [len(request.record_ids()) for request in requests] == [200, 200, 50]
    keys = [request.header("Idempotency-Key") for request in requests]
    assert None not in keys
    assert len(set(keys)) == 3
    sent_ids = [record_id for request in requests for record_id in request.record_ids()]
    assert sent_ids == record_ids
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_sync_once_http_400_moves_batch_to_dead(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    add_queued_records(db_path, 3)
    receiver.add_replies(Reply(400, body=b"schema mismatch"))

    result = run_cli(
        "sync",
        "--once",
        "--timeout",
        "10",
        "--upload-url",
        receiver.url,
        "--data-dir",
        str(data_dir),
    )

    assert result.returncode == 0, result.stderr
    assert len(receiver.requests) == 1
    assert set(record_states(db_path).values()) == {"dead"}
    store = Store(db_path, readonly=True)
    try:
        errors = {row["error"] for row in store.query("SELECT error FROM records")}
    finally:
        store.close()
    assert len(errors) == 1
    error = errors.pop()
    assert "HTTP 400" in error
    assert "schema mismatch" in error


def test_sync_once_http_401_keeps_records_queued(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 3)
    receiver.add_replies(Reply(401, body=b"bad token"))

    refused = run_cli(
        "sync", "--once", "--upload-url", receiver.url, "--data-dir", str(data_dir)
    )

    assert refused.returncode == 1
    errors = error_lines(refused.stderr)
    assert len(errors) == 1
    assert "HTTP 401" in errors[0]
    assert "token_file" in errors[0]
    assert "3 records still queued" in errors[0]
    assert set(record_states(db_path).values()) == {"queued"}

    # The batch stays open, so the next run resends it under the same key.
    accepted = run_cli(
        "sync", "--once", "--upload-url", receiver.url, "--data-dir", str(data_dir)
    )

    assert accepted.returncode == 0, accepted.stderr
    requests = receiver.requests
    assert len(requests) == 2
    assert requests[1].header("Idempotency-Key") == requests[0].header(
        "Idempotency-Key"
    )
    assert requests[1].record_ids() == record_ids
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_sync_once_connection_refused_keeps_records(data_dir: Path) -> None:
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, 4)

    started = time.monotonic()
    sync = run_cli(
        "sync",
        "--once",
        "--timeout",
        "2",
        "--upload-url",
        unused_port_url(),
        "--data-dir",
        str(data_dir),
    )
    elapsed = time.monotonic() - started

    assert sync.returncode == 1
    errors = error_lines(sync.stderr)
    assert len(errors) == 1
    assert "4 records still queued" in errors[0]
    assert "ConnectError" in errors[0]
    assert elapsed < 20.0
    states = record_states(db_path)
    assert sorted(states) == sorted(record_ids)
    assert set(states.values()) == {"queued"}


def test_sync_once_deadline_error_names_cause(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    add_queued_records(data_dir / DB_NAME, 3)

    # --timeout 0 lets exactly one batch through before the deadline check.
    sync = run_cli(
        "sync",
        "--once",
        "--timeout",
        "0",
        "--batch-size",
        "1",
        "--upload-url",
        receiver.url,
        "--data-dir",
        str(data_dir),
    )

    assert sync.returncode == 1
    assert len(receiver.requests) == 1
    errors = error_lines(sync.stderr)
    assert len(errors) == 1
    assert "2 records still queued" in errors[0]
    assert not errors[0].endswith("None")


def test_sync_without_database_sends_nothing(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()

    sync = run_cli(
        "sync", "--once", "--upload-url", receiver.url, "--data-dir", str(data_dir)
    )

    assert sync.returncode == 0, sync.stderr
    assert "nothing to upload" in sync.stdout
    assert receiver.requests == []
    assert not (data_dir / DB_NAME).exists()


def test_sync_once_timeout_bounds_stalled_request(
    data_dir: Path, receiver: HttpReceiver
) -> None:
    add_queued_records(data_dir / DB_NAME, 1)
    receiver.add_replies(Reply(200, delay=7.0))

    started = time.monotonic()
    sync = run_cli(
        "sync",
        "--once",
        "--timeout",
        "1",
        "--upload-url",
        receiver.url,
        "--data-dir",
        str(data_dir),
    )
    elapsed = time.monotonic() - started

    # Startup takes about a second, so 4.5 s leaves ample room above --timeout 1.
    assert elapsed < 4.5
    assert sync.returncode == 1
