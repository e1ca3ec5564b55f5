"""Reference HTTP sink of the sync protocol (docs/sync-protocol.md), for demos and tests.

``Collector`` serves ``POST /ingest`` for NDJSON batches, ``HEAD`` on any path
for the appliance's connectivity probe and ``GET /stats`` for counts. Records
go to the collector's own SQLite file, never to the appliance database.

De-duplication: a batch's ``Idempotency-Key``, its record ids and the response
it got are committed in the same transaction as its new records. A batch resent
with that key therefore gets the stored response again, marked with the header
``Idempotent-Replayed: true``, and stores nothing. A batch that failed before
the commit left nothing behind. A record id is stored at most once (it is the
primary key), whichever batch carries it again. Only 2xx responses are stored,
so a request rejected with 4xx can be resent with the same key once its cause
is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import http.server
import ipaddress
import json
import logging
import re
import socket
import sqlite3
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from appliance.errors import SetupError, StoreError

logger = logging.getLogger(__name__)

UPLOAD_PATH = "/ingest"
STATS_PATH = "/stats"
DEFAULT_MAX_BATCH_BYTES = 16 * 2**20
"""Largest request body accepted after gzip decoding, in bytes (16 MiB)."""
IDLE_TIMEOUT_S = 60.0
"""Seconds an open connection may stay silent before the collector closes it."""
MAX_KEY_LENGTH = 255
"""Longest ``Idempotency-Key`` accepted, in characters."""
APPLICATION_ID = 0x46524331
"""SQLite ``application_id`` of a collector database (ASCII "FRC1")."""
BUSY_TIMEOUT_MS = 10_000

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    idempotency_key TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    record_ids TEXT NOT NULL,
    response TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    replays INTEGER NOT NULL DEFAULT 0
);
"""
# records.batch_id is the Idempotency-Key of the batch that first carried the
# record, records.received_at is Unix time in seconds, and records.json is the
# NDJSON line as received. batches.record_ids is a JSON array of the batch's
# ids in body order, and batches.response is the JSON body sent for it.


@dataclasses.dataclass(frozen=True)
class ParsedRecord:
    """One NDJSON line of a batch."""

    record_id: Any
    """The ``id`` value as sent, of any JSON type."""
    text: str
    """The line without its line ending."""
    problem: str | None
    """Reason for rejecting the record, or None when it can be stored."""


@dataclasses.dataclass(frozen=True)
class BatchResponse:
    """JSON body for one accepted batch, and whether it was replayed."""

    body: dict[str, Any]
    """``{"accepted": N, "duplicates": [ids], "rejected": [{"id", "reason"}]}``."""
    replayed: bool
    """True when the body was stored for an earlier request with the same key."""


class RequestError(Exception):
    """Error that the HTTP handler sends as ``status`` with an ``{"error": message}`` body.

    It never leaves the collector. ``close`` is set when the request body was not read, because the
    connection cannot carry another request after it.
    """

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


class CollectorStore:
    """The collector's SQLite file: one row per record id and one per batch key.

    One connection is shared by the server's threads behind a lock, because every
    request writes and SQLite serializes writers anyway.

    Raises:
        SetupError: the file is not a collector database.
        StoreError: SQLite cannot open or initialise the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open database {str(path)!r}: {exc}", path
            ) from exc
        try:
            self._initialise()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(
                f"cannot initialise database {str(path)!r}: {exc}", path
            ) from exc
        except SetupError:
            self._conn.close()
            raise

    def _initialise(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL makes each commit durable before the 2xx response is sent, so an
        # accepted batch survives a power cut of the collector's host.
        conn.execute("PRAGMA synchronous = FULL")
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()[0]
        if application_id != APPLICATION_ID and (application_id != 0 or tables):
            raise SetupError(
                f"{str(self.path)!r} is not a collector database (it has other "
                "tables); pass a new file with --db"
            )
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def close(self) -> None:
        """Close the connection after any transaction in progress; safe to call twice."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(
                f"database {str(self.path)!r} failed: {exc}", self.path
            ) from exc

    def ingest(self, key: str, records: Sequence[ParsedRecord]) -> BatchResponse:
        """Store the new records of one batch, or replay the response stored for ``key``.

        Raises:
            RequestError: 422 when ``key`` was used before for a batch that did
                not contain every record id of this one.
            StoreError: SQLite failed; nothing of the batch is stored.
        """
        record_ids = [record.record_id for record in records]
        with self._lock, self._transaction() as conn:
            row = conn.execute(
                "SELECT record_ids, response FROM batches WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
            if row is not None:
                return self._replay(conn, key, record_ids, row)
            return self._store_batch(conn, key, records)

    def _replay(
        self,
        conn: sqlite3.Connection,
        key: str,
        record_ids: list[Any],
        row: tuple[str, str],
    ) -> BatchResponse:
        # A resend may carry fewer records than the first request (the appliance
        # resends only those still queued), but never others.
        earlier = {_id_key(value) for value in json.loads(row[0])}
        unknown = [value for value in record_ids if _id_key(value) not in earlier]
        if unknown:
            raise RequestError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"Idempotency-Key {key!r} was already used for a batch without the "
                f"records {unknown[:5]!r}; send new records under a new key",
            )
        conn.execute(
            "UPDATE batches SET replays = replays + 1 WHERE idempotency_key = ?",
            (key,),
        )
        return BatchResponse(json.loads(row[1]), replayed=True)

    def _store_batch(
        self, conn: sqlite3.Connection, key: str, records: Sequence[ParsedRecord]
    ) -> BatchResponse:
        now = time.time()
        accepted = 0
        duplicates: list[str] = []
        rejected: list[dict[str, Any]] = []
        for record in records:
            if record.problem is not None:
                rejected.append({"id": record.record_id, "reason": record.problem})
                continue
            cursor = conn.execute(
                "INSERT OR IGNORE INTO records (id, batch_id, received_at, json)"
                " VALUES (?, ?, ?, ?)",
                (record.record_id, key, now, record.text),
            )
            if cursor.rowcount == 1:
                accepted += 1
            else:
                duplicates.append(record.record_id)

        body = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
        conn.execute(
            "INSERT INTO batches (idempotency_key, received_at, record_ids, response,"
            " accepted, duplicates, rejected) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                now,
                json.dumps([record.record_id for record in records]),
                json.dumps(body),
                accepted,
                len(duplicates),
                len(rejected),
            ),
        )
        return BatchResponse(body, replayed=False)

    def stats(self) -> dict[str, int]:
        """Return counts of stored records and batches and of reported outcomes.

        Raises:
            StoreError: SQLite failed.
        """
        with self._lock, self._transaction() as conn:
            records = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            batches, duplicates, rejected, replays = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(duplicates), 0),"
                " COALESCE(SUM(rejected), 0), COALESCE(SUM(replays), 0) FROM batches"
            ).fetchone()
        return {
            "records": records,
            "batches": batches,
            "duplicates": duplicates,
            "rejected": rejected,
            "replays": replays,
        }


def _id_key(value: Any) -> str:
    # Ids are compared by their JSON text, so that a non-string id can be too.
    return json.dumps(value, sort_keys=True)


def parse_ndjson(body: bytes) -> list[ParsedRecord]:
    """Split a decoded NDJSON body into records and check each record's ``id``.

    A record whose ``id`` is not a non-empty string, or is a string but not a
    UUID, is returned with a ``problem`` and rejected by name. Blank lines are
    skipped.

    Raises:
        RequestError: 400 when the body is not UTF-8, has no record, or a line is
            not a JSON object with an ``id`` that can name it in a rejection.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"body is not UTF-8 NDJSON: {exc}"
        ) from exc

    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        records.append(_parse_line(number, line))
    if not records:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body contains no NDJSON record")
    return records


def _parse_line(number: int, line: str) -> ParsedRecord:
    try:
        value = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"line {number} is not JSON: {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"line {number} is a JSON {type(value).__name__}, not an object",
        )
    record_id = value.get("id")
    if record_id is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"line {number} has no id")

    problem = None
    if not isinstance(record_id, str) or not record_id:
        problem = f"id must be a non-empty string, got {record_id!r}"
    elif not _UUID.fullmatch(record_id):
        problem = f"id {record_id!r} is not a UUID"
    return ParsedRecord(record_id=record_id, text=line, problem=problem)


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not a JSON value")


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """Return the request body after ``Content-Encoding`` decoding, at most ``limit`` bytes.

    Raises:
        RequestError: 415 for an encoding other than gzip or identity, 413 when
            the decoded body exceeds ``limit``, 400 for invalid gzip data.
    """
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        if len(raw) > limit:
            raise _too_large(limit)
        return raw
    if name != "gzip":
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding!r} is not supported; send gzip or identity",
        )

    output = bytearray()
    data = raw
    # A gzip file may hold several members (RFC 1952, section 2.2), so each
    # member gets its own decompressor. max_length stops a small body from
    # expanding past the limit in memory.
    while data:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            output += decompressor.decompress(data, limit + 1 - len(output))
        except zlib.error as exc:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"body is not valid gzip: {exc}"
            ) from exc
        if len(output) > limit:
            raise _too_large(limit)
        if not decompressor.eof:
            raise RequestError(HTTPStatus.BAD_REQUEST, "gzip body is truncated")
        data = decompressor.unused_data
    return bytes(output)


def _too_large(limit: int) -> RequestError:
    return RequestError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"batch is larger than {limit} bytes after decoding; send fewer records",
        close=True,
    )


class Collector:
    """The reference sink: a threaded HTTP server over a ``CollectorStore``.

    Use it as a context manager, or call ``start`` and ``close``.

    Args:
        db_path: the collector's SQLite file; created with its tables when missing.
        host: address to listen on. The server speaks plain HTTP.
        port: TCP port; 0 picks a free one, which ``port`` then returns.
        token: bearer token that POST and ``GET /stats`` must carry, or None to
            require none. ``HEAD`` never needs it.
        max_batch_bytes: largest request body after gzip decoding, in bytes.

    Raises:
        SetupError: the address cannot be bound, or ``db_path`` is not a
            collector database.
        StoreError: the database cannot be opened.
    """

    def __init__(
        self,
        db_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self.token = token
        self.max_batch_bytes = max_batch_bytes
        self.store = CollectorStore(db_path)
        self._responses: Counter[int] = Counter()
        self._responses_lock = threading.Lock()
        self._closed = False
        try:
            self._server = _HttpServer(host, port, self)
        except OSError as exc:
            self.store.close()
            raise SetupError(
                f"cannot listen on {host}:{port}: {exc}; pick another --port or --host"
            ) from exc
        # Kept apart from the socket, so that url still works after close().
        bound = self._server.socket.getsockname()
        self._host, self._port = str(bound[0]), int(bound[1])
        if not _is_loopback(host):
            logger.warning(
                "collector listens on %s, which is not a loopback address; it "
                "speaks plain HTTP, so tokens and records cross the network unencrypted",
                host,
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="collector",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        host = self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The upload URL, for ``--upload-url`` or ``[sync] url``."""
        return self.base_url + UPLOAD_PATH

    @property
    def stats_url(self) -> str:
        return self.base_url + STATS_PATH

    def start(self) -> Collector:
        """Serve requests on a background thread."""
        self._thread.start()
        logger.info("collector listening on %s, database %s", self.url, self.store.path)
        return self

    def close(self) -> None:
        """Stop serving and close the socket and the database; safe to call twice.

        A request still being handled finishes its transaction first, and later
        ones on open connections get 503.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        self.store.close()
        logger.info("collector on %s stopped", self.url)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """Return the store's counts and the number of responses per HTTP status.

        Responses are counted since this server started; the other counts cover
        the whole database.
        """
        counts: dict[str, Any] = dict(self.store.stats())
        with self._responses_lock:
            counts["responses"] = {
                str(status): n for status, n in sorted(self._responses.items())
            }
        return counts

    def count_response(self, status: int) -> None:
        with self._responses_lock:
            self._responses[status] += 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.collector = collector
        super().__init__((host, port), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between batches, as the uploader expects.
    protocol_version = "HTTP/1.1"
    server_version = "field-relay-collector"
    timeout = IDLE_TIMEOUT_S
    server: _HttpServer

    def do_HEAD(self) -> None:
        # The appliance's connectivity probe needs any response; 204 has no body.
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()
        self.server.collector.count_response(HTTPStatus.NO_CONTENT)

    def do_GET(self) -> None:
        self._respond(self._get)

    def do_POST(self) -> None:
        self._respond(self._post)

    def _get(self) -> tuple[HTTPStatus, dict[str, Any], dict[str, str]]:
        path = urlsplit(self.path).path
        if path != STATS_PATH:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"nothing to GET at {path!r}; counts are at {STATS_PATH}",
            )
        self._check_token()
        return HTTPStatus.OK, self.server.collector.stats(), {}

    def _post(self) -> tuple[HTTPStatus, dict[str, Any], dict[str, str]]:
        collector = self.server.collector
        path = urlsplit(self.path).path
        if path != UPLOAD_PATH:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"no upload endpoint at {path!r}; POST batches to {UPLOAD_PATH}",
                close=True,
            )
        self._check_token()
        key = self._idempotency_key()
        self._check_content_type()

        raw = self._read_body(collector.max_batch_bytes)
        body = decode_body(
            raw, self.headers.get("Content-Encoding"), collector.max_batch_bytes
        )
        records = parse_ndjson(body)
        outcome = collector.store.ingest(key, records)

        result = outcome.body
        logger.info(
            "batch %s %s: %d accepted, %d duplicates, %d rejected (%d bytes received)",
            key,
            "replayed" if outcome.replayed else "stored",
            result["accepted"],
            len(result["duplicates"]),
            len(result["rejected"]),
            len(raw),
        )
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
        return HTTPStatus.OK, result, headers

    def _check_token(self) -> None:
        token = self.server.collector.token
        if token is None:
            return
        header = self.headers.get("Authorization")
        if header is None:
            raise RequestError(
                HTTPStatus.UNAUTHORIZED,
                "missing Authorization header; send Authorization: Bearer <token>",
                close=True,
                headers={"WWW-Authenticate": 'Bearer realm="collector"'},
            )
        scheme, _, credentials = header.partition(" ")
        matches = hmac.compare_digest(
            credentials.strip().encode("utf-8"), token.encode("utf-8")
        )
        if scheme.lower() != "bearer" or not matches:
            raise RequestError(
                HTTPStatus.UNAUTHORIZED,
                "bearer token is invalid; check the token file of both sides",
                close=True,
                headers={
                    "WWW-Authenticate": 'Bearer realm="collector", error="invalid_token"'
                },
            )

    def _idempotency_key(self) -> str:
        key = self.headers.get("Idempotency-Key", "").strip()
        if not key:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "missing Idempotency-Key header; send the batch id",
                close=True,
            )
        if len(key) > MAX_KEY_LENGTH:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"Idempotency-Key is {len(key)} characters long; the maximum is "
                f"{MAX_KEY_LENGTH}",
                close=True,
            )
        return key

    def _check_content_type(self) -> None:
        content_type = self.headers.get("Content-Type")
        if content_type is None:
            return
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != "application/x-ndjson":
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type!r} is not supported; send "
                "application/x-ndjson",
                close=True,
            )

    def _read_body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked":
            return self._read_chunked(limit)
        header = self.headers.get("Content-Length")
        if header is None:
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "send Content-Length or a chunked body",
                close=True,
            )
        if not header.strip().isdigit():
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"Content-Length {header!r} is not a number",
                close=True,
            )
        length = int(header)
        if length > limit:
            raise _too_large(limit)
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"body ended after {len(body)} of {length} bytes",
                close=True,
            )
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks = bytearray()
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"invalid chunk size {line!r}", close=True
                ) from None
            if size == 0:
                # Skip trailer fields up to the empty line that ends the body.
                while self.rfile.readline(8192).strip():
                    pass
                return bytes(chunks)
            if len(chunks) + size > limit:
                raise _too_large(limit)
            chunks += self.rfile.read(size)
            self.rfile.readline(8)

    def _respond(
        self,
        action: Callable[[], tuple[HTTPStatus, dict[str, Any], dict[str, str]]],
    ) -> None:
        collector = self.server.collector
        close = False
        try:
            if collector.closed:
                raise RequestError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "collector is shutting down",
                    close=True,
                    headers={"Retry-After": "5"},
                )
            status, payload, headers = action()
        except RequestError as exc:
            logger.warning(
                "%s %s from %s failed with HTTP %d: %s",
                self.command,
                self.path,
                self.client_address[0],
                exc.status,
                exc.message,
            )
            status, payload, headers = exc.status, {"error": exc.message}, exc.headers
            close = exc.close
        except StoreError as exc:
            # The appliance treats 500 as transient and resends the same batch.
            logger.error("%s %s failed: %s", self.command, self.path, exc)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            payload, headers = {"error": "the collector's database failed"}, {}
        self._send_json(status, payload, headers, close)

    def _send_json(
        self,
        status: HTTPStatus,
        payload: dict[str, Any],
        headers: dict[str, str],
        close: bool,
    ) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first, for example after its read timeout. A
            # batch it sent is stored all the same and replayed when resent.
            self.close_connection = True
        self.server.collector.count_response(status)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.client_address[0], *args)
