"""The reference sink ``appliance collector`` against docs/sync-protocol.md.

Every test talks HTTP to a real ``Collector`` on 127.0.0.1 and reads its real
SQLite file. The CLI tests run the installed ``appliance`` command in a
subprocess and stop it with a signal.
"""

from __future__ import annotations

import gzip
import json
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.collector import Collector
from appliance.errors import SetupError
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader

APPLIANCE = Path(sys.executable).parent / "appliance"
CLI_TIMEOUT = 30.0
"""Seconds a collector subprocess may take to start or to stop."""
TOKEN = "s3cret-token.v1"

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
    # The appliance's Uploader builds its own httpx client, which honours proxy
    # variables and would send loopback requests elsewhere.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture
def collector(db_path: Path) -> Iterator[Collector]:
    with Collector(db_path) as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        yield http


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def new_ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def ndjson(record_ids: list[Any]) -> bytes:
    """Return an NDJSON body with one small record per id, in order."""
    lines = [
        json.dumps({"id": record_id, "value": n})
        for n, record_id in enumerate(record_ids)
    ]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def post_batch(
    client: httpx.Client,
    url: str,
    body: bytes,
    key: str | None = None,
    **headers: str,
) -> httpx.Response:
    """POST ``body`` as NDJSON under ``key`` (a new UUID when None)."""
    sent = {
        "Content-Type": "application/x-ndjson",
        "Idempotency-Key": key or str(uuid.uuid4()),
    }
    sent.update({name.replace("_", "-"): value for name, value in headers.items()})
    return client.post(url, content=body, headers=sent)


def stored_rows(db_path: Path) -> dict[str, sqlite3.Row]:
    """Return the collector's record rows by id."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {row["id"]: row for row in conn.execute("SELECT * FROM records")}
    finally:
        conn.close()


# Accepting and de-duplicating --------------------------------------------------


def test_new_batch_stores_each_record(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(3)
    body = ndjson(record_ids)
    before = time.time()

    response = post_batch(client, collector.url, body, key="batch-1")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"accepted": 3, "duplicates": [], "rejected": []}
    assert "Idempotent-Replayed" not in response.headers
    rows = stored_rows(db_path)
    assert sorted(rows) == sorted(record_ids)
    lines = body.decode().splitlines()
    for line, record_id in zip(lines, record_ids, strict=True):
        assert rows[record_id]["json"] == line
        assert rows[record_id]["batch_id"] == "batch-1"
        assert before <= rows[record_id]["received_at"] <= time.time()


def test_database_uses_wal(collector: Collector, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    assert mode == "wal"


def test_resent_key_replays_same_response(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(2)
    body = ndjson([*record_ids, "not-a-uuid"])
    first = post_batch(client, collector.url, body, key="batch-1")

    second = post_batch(client, collector.url, body, key="batch-1")

    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert sorted(stored_rows(db_path)) == sorted(record_ids)
    assert collector.stats()["replays"] == 1


def test_resent_key_with_fewer_records_replays(
    collector: Collector, client: httpx.Client
) -> None:
    record_ids = new_ids(3)
    first = post_batch(client, collector.url, ndjson(record_ids), key="batch-1")

    # The appliance resends only the records of a batch that are still queued.
    second = post_batch(client, collector.url, ndjson(record_ids[:2]), key="batch-1")

    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"


def test_reused_key_with_new_record_gets_422(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(2)
    post_batch(client, collector.url, ndjson(record_ids[:1]), key="batch-1")

    response = post_batch(client, collector.url, ndjson(record_ids), key="batch-1")

    assert response.status_code == 422
    assert record_ids[1] in response.json()["error"]
    assert record_ids[1] not in stored_rows(db_path)
    assert collector.stats()["replays"] == 0


def test_known_id_in_new_batch_is_duplicate(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    first_ids = new_ids(2)
    later_id = new_ids(1)[0]
    post_batch(client, collector.url, ndjson(first_ids), key="batch-1")

    response = post_batch(
        client, collector.url, ndjson([first_ids[1], later_id]), key="batch-2"
    )

    assert response.status_code == 200
    assert response.json() == {
        "accepted": 1,
        "duplicates": [first_ids[1]],
        "rejected": [],
    }
    rows = stored_rows(db_path)
    assert len(rows) == 3
    assert rows[first_ids[1]]["batch_id"] == "batch-1"
    assert rows[later_id]["batch_id"] == "batch-2"


def test_repeated_id_within_batch_is_duplicate(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_id = new_ids(1)[0]

    response = post_batch(client, collector.url, ndjson([record_id, record_id]))

    assert response.json() == {"accepted": 1, "duplicates": [record_id], "rejected": []}
    assert list(stored_rows(db_path)) == [record_id]


def test_concurrent_resends_store_batch_once(
    collector: Collector, db_path: Path
) -> None:
    record_ids = new_ids(20)
    body = ndjson(record_ids)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as http:
            response = post_batch(http, collector.url, body, key="batch-1")
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json() == responses[0].json() for r in responses)
    replayed = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
    assert len(replayed) == 5
    assert len(stored_rows(db_path)) == 20
    assert collector.stats()["batches"] == 1


def test_reopened_database_remembers_keys(db_path: Path, client: httpx.Client) -> None:
    record_ids = new_ids(2)
    with Collector(db_path) as first_run:
        first = post_batch(client, first_run.url, ndjson(record_ids), key="batch-1")

    with Collector(db_path) as second_run:
        again = post_batch(client, second_run.url, ndjson(record_ids), key="batch-1")
        stats = second_run.stats()

    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert stats["records"] == 2


def test_foreign_database_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (id TEXT PRIMARY KEY)")
    conn.close()

    with pytest.raises(SetupError, match="not a collector database"):
        Collector(path)


# Validating bodies -------------------------------------------------------------


def test_bad_ids_are_rejected_by_name(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    good_id = new_ids(1)[0]

    response = post_batch(client, collector.url, ndjson([good_id, "sensor-7", 42, ""]))

    assert response.status_code == 200
    result = response.json()
    assert result["accepted"] == 1
    assert result["duplicates"] == []
    assert [item["id"] for item in result["rejected"]] == ["sensor-7", 42, ""]
    assert "not a UUID" in result["rejected"][0]["reason"]
    assert "non-empty string" in result["rejected"][1]["reason"]
    assert "non-empty string" in result["rejected"][2]["reason"]
    assert list(stored_rows(db_path)) == [good_id]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json\n", "line 1 is not JSON"),
        (ndjson(new_ids(1)) + b"[1, 2]\n", "line 2 is a JSON list"),
        (b'{"value": 1}\n', "line 1 has no id"),
        (b'{"id": null}\n', "line 1 has no id"),
        (b'{"id": "a", "value": NaN}\n', "line 1 is not JSON"),
        (b"\xff\xfe{}\n", "not UTF-8"),
        (b"\n\n", "no NDJSON record"),
    ],
)
def test_body_not_ndjson_gets_400(
    collector: Collector, client: httpx.Client, db_path: Path, body: bytes, message: str
) -> None:
    response = post_batch(client, collector.url, body)

    assert response.status_code == 400
    assert message in response.json()["error"]
    assert stored_rows(db_path) == {}


def test_key_of_400_batch_stays_usable(
    collector: Collector, client: httpx.Client
) -> None:
    record_ids = new_ids(1)
    refused = post_batch(client, collector.url, b"not json\n", key="batch-1")

    response = post_batch(client, collector.url, ndjson(record_ids), key="batch-1")

    assert refused.status_code == 400
    assert response.status_code == 200
    assert response.json()["accepted"] == 1


def test_crlf_lines_and_blank_lines_are_read(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(2)
    body = ndjson(record_ids).replace(b"\n", b"\r\n\n")

    response = post_batch(client, collector.url, body)

    assert response.json()["accepted"] == 2
    assert all(not row["json"].endswith("\r") for row in stored_rows(db_path).values())


def test_gzip_body_is_decoded(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(4)
    # Two gzip members in one body, which RFC 1952 allows.
    body = gzip.compress(ndjson(record_ids[:2])) + gzip.compress(ndjson(record_ids[2:]))

    response = post_batch(client, collector.url, body, Content_Encoding="gzip")

    assert response.status_code == 200
    assert response.json()["accepted"] == 4
    assert sorted(stored_rows(db_path)) == sorted(record_ids)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"plain text", "not valid gzip"),
        (gzip.compress(b'{"id": "a"}\n')[:-6], "truncated"),
        (gzip.compress(b'{"id": "a"}\n') + b"junk", "not valid gzip"),
    ],
)
def test_invalid_gzip_gets_400(
    collector: Collector, client: httpx.Client, body: bytes, message: str
) -> None:
    response = post_batch(client, collector.url, body, Content_Encoding="gzip")

    assert response.status_code == 400
    assert message in response.json()["error"]


def test_unknown_encoding_gets_415(collector: Collector, client: httpx.Client) -> None:
    response = post_batch(client, collector.url, b"xx", Content_Encoding="br")

    assert response.status_code == 415
    assert "'br'" in response.json()["error"]


def test_wrong_content_type_gets_415(
    collector: Collector, client: httpx.Client
) -> None:
    body = ndjson(new_ids(1))

    response = post_batch(client, collector.url, body, Content_Type="application/json")

    assert response.status_code == 415
    assert "application/x-ndjson" in response.json()["error"]


def test_missing_key_gets_400(collector: Collector, client: httpx.Client) -> None:
    response = client.post(
        collector.url,
        content=ndjson(new_ids(1)),
        headers={"Content-Type": "application/x-ndjson"},
    )

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]


def test_other_path_gets_404(collector: Collector, client: httpx.Client) -> None:
    response = post_batch(client, collector.base_url + "/upload", ndjson(new_ids(1)))

    assert response.status_code == 404
    assert "/ingest" in response.json()["error"]


def test_batch_over_limit_gets_413(db_path: Path, client: httpx.Client) -> None:
    record = {"id": str(uuid.uuid4()), "raw": "x" * 4000}
    body = json.dumps(record).encode() + b"\n"

    with Collector(db_path, max_batch_bytes=2048) as small:
        plain = post_batch(client, small.url, body)
        # Compressed, the body fits the limit, but decoded it does not.
        packed = gzip.compress(body)
        assert len(packed) < 2048
        compressed = post_batch(client, small.url, packed, Content_Encoding="gzip")
        records = small.stats()["records"]

    assert plain.status_code == 413
    assert compressed.status_code == 413
    assert "2048 bytes" in compressed.json()["error"]
    assert records == 0


def test_chunked_body_is_read(
    collector: Collector, client: httpx.Client, db_path: Path
) -> None:
    record_ids = new_ids(3)
    body = ndjson(record_ids)

    # An iterator makes httpx send Transfer-Encoding: chunked.
    response = client.post(
        collector.url,
        content=iter([body[:10], body[10:]]),
        headers={
            "Content-Type": "application/x-ndjson",
            "Idempotency-Key": "batch-1",
        },
    )

    assert response.status_code == 200
    assert response.json()["accepted"] == 3


# Token, probe and stats --------------------------------------------------------


@pytest.fixture
def guarded(db_path: Path) -> Iterator[Collector]:
    with Collector(db_path, token=TOKEN) as server:
        yield server


def test_token_missing_gets_401(guarded: Collector, client: httpx.Client) -> None:
    response = post_batch(client, guarded.url, ndjson(new_ids(1)))

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization" in response.json()["error"]


@pytest.mark.parametrize("header", ["Bearer wrong-token", f"Basic {TOKEN}", "Bearer"])
def test_token_wrong_gets_401(
    guarded: Collector, client: httpx.Client, db_path: Path, header: str
) -> None:
    response = post_batch(client, guarded.url, ndjson(new_ids(1)), Authorization=header)

    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert TOKEN not in response.text
    assert stored_rows(db_path) == {}


def test_token_right_is_accepted(guarded: Collector, client: httpx.Client) -> None:
    response = post_batch(
        client, guarded.url, ndjson(new_ids(2)), Authorization=f"Bearer {TOKEN}"
    )

    assert response.status_code == 200
    assert response.json()["accepted"] == 2


def test_stats_requires_token(guarded: Collector, client: httpx.Client) -> None:
    refused = client.get(guarded.stats_url)
    allowed = client.get(
        guarded.stats_url, headers={"Authorization": f"Bearer {TOKEN}"}
    )

    assert refused.status_code == 401
    assert allowed.status_code == 200


@pytest.mark.parametrize("path", ["/ingest", "/", "/stats"])
def test_head_returns_204_without_token(
    guarded: Collector, client: httpx.Client, path: str
) -> None:
    response = client.head(guarded.base_url + path)

    assert response.status_code == 204
    assert response.content == b""


def test_stats_counts_outcomes(collector: Collector, client: httpx.Client) -> None:
    record_ids = new_ids(3)
    post_batch(client, collector.url, ndjson(record_ids[:2]), key="batch-1")
    post_batch(client, collector.url, ndjson(record_ids[:2]), key="batch-1")
    post_batch(client, collector.url, ndjson([record_ids[1], record_ids[2], "bad"]))
    post_batch(client, collector.url, b"not json\n")
    client.head(collector.url)

    response = client.get(collector.stats_url)

    assert response.status_code == 200
    assert response.json() == {
        "records": 3,
        "batches": 2,
        "duplicates": 1,
        "rejected": 1,
        "replays": 1,
        "responses": {"200": 3, "204": 1, "400": 1},
    }


def test_unknown_get_path_gets_404(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.base_url + "/records")

    assert response.status_code == 404
    assert "/stats" in response.json()["error"]


def test_port_in_use_raises_setup_error(db_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(SetupError, match="cannot listen"):
            Collector(db_path, port=port)


# With the appliance's uploader -------------------------------------------------


def add_queued_records(db_path: Path, count: int) -> list[str]:
    """Insert ``count`` JSON records straight into the queued state; return their ids."""
    store = Store(db_path)
    try:
        record_ids = []
        with store.transaction() as conn:
            for seq in range(1, count + 1):
                raw = json.dumps({"sensor": "t1", "seq": seq})
                record_id = store.insert_record(
                    conn, "sensor-a", seq, raw, raw.encode(), RecordKind.JSON
                )
                assert record_id is not None
                store.move(
                    conn,
                    record_id,
                    RecordState.RECEIVED,
                    RecordState.QUEUED,
                    data=raw,
                    attempts=1,
                )
                record_ids.append(record_id)
        return record_ids
    finally:
        store.close()


def test_uploader_delivers_to_collector(
    tmp_path: Path, token_file: Path, db_path: Path
) -> None:
    appliance_db = tmp_path / "data" / DB_NAME
    appliance_db.parent.mkdir()
    record_ids = add_queued_records(appliance_db, 25)

    with Collector(db_path, token=TOKEN) as server:
        uploader = Uploader(
            appliance_db, server.url, batch_size=10, token_file=token_file
        )
        try:
            reachable = uploader.probe(timeout=5.0)
            result = uploader.sync(deadline=time.monotonic() + 20)
        finally:
            uploader.close()
        stats = server.stats()

    assert reachable
    assert result.records == 25
    assert result.remaining == 0
    assert sorted(stored_rows(db_path)) == sorted(record_ids)
    assert stats["batches"] == 3
    stored = json.loads(stored_rows(db_path)[record_ids[0]]["json"])
    assert stored["id"] == record_ids[0]
    assert stored["link"] == "sensor-a"


# The CLI -----------------------------------------------------------------------


def start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``appliance collector`` and return it with the upload URL it printed."""
    process = subprocess.Popen(
        [str(APPLIANCE), "collector", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], CLI_TIMEOUT)
    if not ready:
        process.kill()
        process.wait()
        pytest.fail(f"collector printed nothing within {CLI_TIMEOUT} s")
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/ingest", line)
    if match is None:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"no upload URL in {line!r}; stderr: {stderr}")
    return process, match.group(0)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signal(
    tmp_path: Path, token_file: Path, client: httpx.Client, stop_signal: int
) -> None:
    db_path = tmp_path / "cli.db"
    process, url = start_cli(
        "--port", "0", "--db", str(db_path), "--token-file", str(token_file)
    )
    try:
        upload = post_batch(
            client, url, ndjson(new_ids(2)), Authorization=f"Bearer {TOKEN}"
        )
        probe = client.head(url)
    finally:
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)

    assert upload.status_code == 200
    assert upload.json()["accepted"] == 2
    assert probe.status_code == 204
    assert process.returncode == 0, stderr
    assert stdout == ""
    assert f"stopping on {signal.Signals(stop_signal).name}" in stderr
    assert "Traceback" not in stderr
    assert len(stored_rows(db_path)) == 2


def test_cli_open_token_file_fails(tmp_path: Path, token_file: Path) -> None:
    token_file.chmod(0o644)

    result = subprocess.run(
        [
            str(APPLIANCE),
            "collector",
            "--port",
            "0",
            "--db",
            str(tmp_path / "cli.db"),
            "--token-file",
            str(token_file),
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "chmod 600" in errors[0]
    assert result.stdout == ""
