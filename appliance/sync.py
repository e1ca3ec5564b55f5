"""Store-and-forward upload of queued records to an HTTP endpoint.

Delivery rule: records leave the outbox in batches. A batch's id is assigned
and committed to its records before the first POST and is sent as the
``Idempotency-Key`` header on every attempt, so a batch resent after a timeout
or a crash carries the same key and the same records, and the server can
de-duplicate it. Records are marked ``uploaded`` only after a 2xx response;
a 2xx body may reject named records, which move to dead with the server's
reason. Transient failures leave the batch queued for the next attempt; other
4xx answers move its records to dead; 401 and 403 stop the run with the
records still queued. docs/sync-protocol.md is the full contract.

Body: NDJSON (``application/x-ndjson``), one record per line in the form that
``appliance records --format jsonl`` prints, optionally gzip-compressed with
``Content-Encoding: gzip``.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import gzip
import json
import logging
import random
import sqlite3
import ssl
import threading
import time
import uuid
from pathlib import Path

import httpx

from appliance.config import SyncConfig
from appliance.errors import (
    PermanentUploadError,
    SetupError,
    TransientUploadError,
    UploadError,
)
from appliance.rate_limit import SlidingWindowLimiter
from appliance.states import RecordState
from appliance.store import Store, record_to_json

logger = logging.getLogger(__name__)

MIN_RETRY_WAIT = 0.5
"""Seconds waited at least after a Retry-After of 0 or a date in the past."""
MAX_RETRY_WAIT = 3600.0
"""Seconds waited at most, whatever Retry-After requests."""
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
GZIP_LEVEL = 6
"""zlib's default level: about as small as 9 on NDJSON, at a fraction of the time."""
CONFIGURATION_STATUS = frozenset({401, 403, 404, 405, 415})
"""4xx statuses that point at the appliance's settings (credentials, URL), not at
the records: sync stops and the records stay queued."""
"""HTTP statuses after which the same batch is sent again later."""


@dataclasses.dataclass
class SyncResult:
    """Outcome of one sync run."""

    batches: int = 0
    """Batches accepted by the sink."""
    records: int = 0
    """Records marked uploaded."""
    failures: int = 0
    """POST attempts that did not succeed."""
    last_error: str | None = None
    remaining: int = 0
    """Records still queued when the run ended."""


class Uploader:
    """Sends queued records to ``url`` in batches.

    Args:
        db_path: the appliance database.
        url: the ingest endpoint.
        batch_size: maximum records per batch.
        max_batch_bytes: maximum uncompressed body size per batch, in bytes.
        compress: gzip the body.
        timeout: seconds allowed per HTTP request.
        max_backoff: cap, in seconds, on the delay between failed attempts.
        token_file: file holding a bearer token; must not be readable by
            group or others.
        ca_bundle: CA certificates to verify TLS with, instead of the system's.
        limiter: shared request and byte limits; None for no limit.

    Raises:
        SetupError: the token file is missing, empty or readable by others.
    """

    def __init__(
        self,
        db_path: Path,
        url: str,
        batch_size: int = 1000,
        max_batch_bytes: int = 1_000_000,
        compress: bool = True,
        timeout: float = 30.0,
        max_backoff: float = 30.0,
        token_file: Path | None = None,
        ca_bundle: Path | None = None,
        limiter: SlidingWindowLimiter | None = None,
    ) -> None:
        self.db_path = db_path
        self.url = url
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.compress = compress
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.limiter = limiter or SlidingWindowLimiter()
        self._lines: tuple[str, dict[str, bytes]] = ("", {})
        self._headers = {}
        if token_file is not None:
            self._headers["Authorization"] = f"Bearer {read_token(token_file)}"
        verify: bool | ssl.SSLContext = True
        if ca_bundle is not None:
            if not ca_bundle.is_file():
                raise SetupError(
                    f"CA bundle {str(ca_bundle)!r} not found; set [sync] ca_bundle "
                    "to a PEM file or remove it to use the system's certificates"
                )
            try:
                verify = ssl.create_default_context(cafile=str(ca_bundle))
            except (ssl.SSLError, OSError) as exc:
                raise SetupError(
                    f"CA bundle {str(ca_bundle)!r} cannot be used ({exc}); it must "
                    "hold PEM certificates"
                ) from exc
        self._client = httpx.Client(timeout=timeout, verify=verify)

    def probe(self, timeout: float = 5.0) -> bool:
        """Return True when the sink answers at all (any HTTP status).

        Probing the sink itself tells whether uploads can work; an interface
        being up does not.
        """
        try:
            self._client.head(self.url, headers=self._headers, timeout=timeout)
        except httpx.HTTPError as exc:
            logger.debug("sink %s unreachable: %s", self.url, exc)
            return False
        return True

    def close(self) -> None:
        self._client.close()

    def sync(
        self, deadline: float | None, stop: threading.Event | None = None
    ) -> SyncResult:
        """Upload queued records until none remain, ``deadline`` passes or ``stop`` is set.

        Transient failures are retried with capped exponential backoff and full
        jitter, or after the server's ``Retry-After``. A permanent failure ends
        the run with the batch still queued.
        """
        result = SyncResult()
        store = Store(self.db_path)
        failures_in_row = 0
        try:
            while stop is None or not stop.is_set():
                batch_id = self._next_batch(store)
                if batch_id is None:
                    break
                try:
                    count = self._send(store, batch_id, deadline, stop)
                except PermanentUploadError as exc:
                    result.failures += 1
                    result.last_error = str(exc)
                    if exc.status in CONFIGURATION_STATUS or exc.status is None:
                        # The configuration is at fault, not the records.
                        logger.error("sync stopped: %s", exc)
                        break
                    if exc.status == 413:
                        self._split(store, batch_id, str(exc))
                        continue
                    self._dead_batch(store, batch_id, str(exc))
                    continue
                except TransientUploadError as exc:
                    result.failures += 1
                    result.last_error = str(exc)
                    failures_in_row += 1
                    with store.transaction() as conn:
                        store.add_sync_counts(conn, retries=1)
                    wait = self._retry_wait(exc, failures_in_row)
                    if deadline is not None and time.monotonic() + wait > deadline:
                        logger.warning(
                            "batch %s failed, deadline reached: %s", batch_id, exc
                        )
                        break
                    logger.warning(
                        "batch %s failed, retrying in %.1f s: %s", batch_id, wait, exc
                    )
                    if stop is not None:
                        if stop.wait(wait):
                            break
                    else:
                        time.sleep(wait)
                    continue
                failures_in_row = 0
                if count:
                    result.batches += 1
                    result.records += count
                if deadline is not None and time.monotonic() > deadline:
                    break
            result.remaining = store.state_counts()[RecordState.QUEUED]
        finally:
            store.close()
        return result

    def _retry_wait(self, exc: TransientUploadError, failures_in_row: int) -> float:
        """Return seconds to wait before resending after a transient failure.

        The server's ``Retry-After`` wins, clamped to [MIN_RETRY_WAIT,
        MAX_RETRY_WAIT] so that neither ``0`` nor a far-future date spins or
        stalls the uploader. Without it, the wait is capped exponential backoff
        with full jitter.
        """
        if exc.retry_after is not None:
            return min(max(exc.retry_after, MIN_RETRY_WAIT), MAX_RETRY_WAIT)
        return random.uniform(0, min(self.max_backoff, 0.5 * 2**failures_in_row))

    def _next_batch(self, store: Store) -> str | None:
        """Return an open batch to resend, or assign queued records to a new one."""
        # Open batches are few, so start from the batches table; scanning the
        # queued records for a batch id would cost a pass over the outbox.
        rows = store.query(
            "SELECT b.id FROM batches b WHERE b.delivered_at IS NULL AND EXISTS"
            " (SELECT 1 FROM records r WHERE r.batch_id = b.id AND r.state = ?)"
            " ORDER BY b.created_at LIMIT 1",
            (str(RecordState.QUEUED),),
        )
        if rows:
            return str(rows[0]["id"])
        candidates = store.query(
            "SELECT * FROM records WHERE state = ? AND batch_id IS NULL"
            " ORDER BY received_at, link, seq LIMIT ?",
            (str(RecordState.QUEUED), self.batch_size),
        )
        if not candidates:
            return None
        chosen, total = [], 0
        lines: dict[str, bytes] = {}
        for row in candidates:
            line = ndjson_line(row)
            if chosen and total + len(line) > self.max_batch_bytes:
                break
            chosen.append(row["id"])
            lines[row["id"]] = line
            total += len(line)
        batch_id = str(uuid.uuid4())
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO batches (id, created_at, attempts) VALUES (?, ?, 0)",
                (batch_id, time.time()),
            )
            marks = ",".join("?" * len(chosen))
            conn.execute(
                f"UPDATE records SET batch_id = ? WHERE id IN ({marks})"
                " AND state = ? AND batch_id IS NULL",
                (batch_id, *chosen, str(RecordState.QUEUED)),
            )
        # The first send reuses the encoded lines; a resend encodes afresh.
        self._lines = (batch_id, lines)
        return batch_id

    def _send(
        self,
        store: Store,
        batch_id: str,
        deadline: float | None,
        stop: threading.Event | None = None,
    ) -> int:
        rows = store.query(
            "SELECT * FROM records WHERE batch_id = ? AND state = ?"
            " ORDER BY received_at, link, seq",
            (batch_id, str(RecordState.QUEUED)),
        )
        cached_id, cached = self._lines
        if cached_id != batch_id:
            cached = {}
        body = b"".join(cached.get(row["id"]) or ndjson_line(row) for row in rows)
        self._lines = ("", {})
        headers = {
            "Content-Type": "application/x-ndjson",
            "Idempotency-Key": batch_id,
            **self._headers,
        }
        if self.compress:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        waited = self.limiter.acquire(len(body), stop)
        if waited:
            with store.transaction() as conn:
                store.add_sync_counts(conn, rate_limit_wait_s=waited)
        started = time.perf_counter()
        status: int | None = None
        try:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, max(0.1, deadline - time.monotonic()))
            response = self._client.post(
                self.url, content=body, headers=headers, timeout=timeout
            )
            status = response.status_code
            self._check(response, batch_id)
        except UploadError as exc:
            self._record_attempt(store, batch_id, status, str(exc))
            raise
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            self._record_attempt(store, batch_id, None, f"{type(exc).__name__}: {exc}")
            raise PermanentUploadError(
                f"upload URL {self.url!r} is invalid ({exc}): pass an http:// or "
                "https:// URL with --upload-url",
                batch_id,
            ) from exc
        except httpx.HTTPError as exc:
            self._record_attempt(store, batch_id, None, f"{type(exc).__name__}: {exc}")
            raise TransientUploadError(
                f"POST {self.url} failed: {type(exc).__name__}: {exc}", batch_id
            ) from exc

        rejected, duplicates = parse_acceptance(response)
        now = time.time()
        with store.transaction() as conn:
            conn.execute(
                "UPDATE batches SET attempts = attempts + 1, last_status = ?,"
                " delivered_at = ? WHERE id = ?",
                (status, now, batch_id),
            )
            ids = [row["id"] for row in rows]
            refused = 0
            for record_id in ids:
                if record_id in rejected:
                    reason = f"rejected by the sink: {rejected[record_id]}"[:500]
                    if store.move(
                        conn,
                        record_id,
                        RecordState.QUEUED,
                        RecordState.DEAD,
                        error=reason,
                    ):
                        refused += 1
                        store.add_event(
                            conn,
                            record_id,
                            "upload",
                            RecordState.QUEUED,
                            RecordState.DEAD,
                            1,
                            time.perf_counter() - started,
                            error=reason,
                            detail={"batch_id": batch_id, "status": status},
                        )
                    continue
            # One UPDATE and one batch of event rows for the accepted records:
            # per-record statements were the largest cost of a sync.
            accepted = [record_id for record_id in ids if record_id not in rejected]
            moved = store.move_many(
                conn,
                accepted,
                RecordState.QUEUED,
                RecordState.UPLOADED,
                uploaded_at=now,
            )
            store.add_events(
                conn,
                moved,
                "upload",
                RecordState.QUEUED,
                RecordState.UPLOADED,
                1,
                time.perf_counter() - started,
                detail={"batch_id": batch_id, "status": status},
            )
            store.add_sync_counts(
                conn,
                batches=1,
                duplicates=len(duplicates & set(ids)),
                rejected=refused,
            )
            store.set_sync_state(conn, last_success_at=now)
        if refused:
            logger.warning(
                "batch %s: the sink rejected %d records; they are dead",
                batch_id,
                refused,
            )
        logger.info(
            "batch %s: %d records uploaded (HTTP %s, %d bytes, %.2f s)",
            batch_id,
            len(rows) - refused,
            status,
            len(body),
            time.perf_counter() - started,
        )
        return len(rows) - refused

    def _check(self, response: httpx.Response, batch_id: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        excerpt = response.text[:200]
        message = f"POST {self.url} answered HTTP {status}: {excerpt!r}"
        if status in RETRYABLE_STATUS:
            raise TransientUploadError(
                message,
                batch_id,
                status,
                parse_retry_after(response.headers.get("Retry-After")),
            )
        if status in (401, 403):
            message += (
                "; the sink refused the credentials: check [sync] token_file; "
                "the records stay queued"
            )
        elif status in CONFIGURATION_STATUS:
            message += (
                "; the URL or the request format does not match the sink: check "
                "--upload-url or [sync] url; the records stay queued"
            )
        raise PermanentUploadError(message, batch_id, status)

    def _dead_batch(self, store: Store, batch_id: str, reason: str) -> None:
        """Move a batch the sink can never accept to dead, with the reason."""
        moved = 0
        with store.transaction() as conn:
            rows = conn.execute(
                "SELECT id FROM records WHERE batch_id = ? AND state = ?",
                (batch_id, str(RecordState.QUEUED)),
            ).fetchall()
            for row in rows:
                if store.move(
                    conn,
                    row["id"],
                    RecordState.QUEUED,
                    RecordState.DEAD,
                    error=reason[:500],
                ):
                    moved += 1
                    store.add_event(
                        conn,
                        row["id"],
                        "upload",
                        RecordState.QUEUED,
                        RecordState.DEAD,
                        1,
                        0.0,
                        error=reason[:500],
                        detail={"batch_id": batch_id},
                    )
            store.add_sync_counts(conn, rejected=moved)
        logger.error("batch %s: %d records moved to dead: %s", batch_id, moved, reason)

    def _split(self, store: Store, batch_id: str, reason: str) -> None:
        """Answer a 413: halve the batch size and release the batch to be re-cut.

        A batch of one record that is still too large can never go, so it
        moves to dead.
        """
        rows = store.query(
            "SELECT id FROM records WHERE batch_id = ? AND state = ?",
            (batch_id, str(RecordState.QUEUED)),
        )
        if len(rows) <= 1:
            self._dead_batch(store, batch_id, reason)
            return
        self.batch_size = max(1, len(rows) // 2)
        self.max_batch_bytes = max(1024, self.max_batch_bytes // 2)
        with store.transaction() as conn:
            conn.execute(
                "UPDATE records SET batch_id = NULL WHERE batch_id = ? AND state = ?",
                (batch_id, str(RecordState.QUEUED)),
            )
        logger.warning(
            "batch %s too large for the sink; resending in batches of %d",
            batch_id,
            self.batch_size,
        )

    @staticmethod
    def _record_attempt(
        store: Store, batch_id: str, status: int | None, error: str
    ) -> None:
        with store.transaction() as conn:
            conn.execute(
                "UPDATE batches SET attempts = attempts + 1, last_status = ?,"
                " last_error = ? WHERE id = ?",
                (status, error[:500], batch_id),
            )
            store.set_sync_state(
                conn, last_error=error[:500], last_error_at=time.time()
            )


def make_uploader(
    db_path: Path,
    url: str,
    config: SyncConfig,
    batch_size: int | None = None,
    compress: bool | None = None,
) -> Uploader:
    """Build an uploader from the ``[sync]`` configuration, with overrides."""
    return Uploader(
        db_path,
        url,
        batch_size=batch_size or config.batch_records,
        max_batch_bytes=config.batch_bytes,
        compress=config.gzip if compress is None else compress,
        timeout=config.timeout,
        max_backoff=config.max_backoff,
        token_file=config.token_file,
        ca_bundle=config.ca_bundle,
        limiter=SlidingWindowLimiter(
            config.requests_per_minute, config.bytes_per_minute
        ),
    )


def read_token(path: Path) -> str:
    """Return the bearer token in ``path``.

    Raises:
        SetupError: the file is missing, empty, or readable by group or others.
    """
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SetupError(
            f"token file {str(path)!r} cannot be read ({exc.strerror}); create it "
            "with the bearer token on one line and mode 0600"
        ) from exc
    if mode & 0o077:
        raise SetupError(
            f"token file {str(path)!r} has mode {mode & 0o777:o}; other users could "
            f"read the token: run chmod 600 {path}"
        )
    if not token:
        raise SetupError(f"token file {str(path)!r} is empty; write the token into it")
    return token


def parse_acceptance(response: httpx.Response) -> tuple[dict[str, str], set[str]]:
    """Return the records a 2xx body rejects (id to reason) and reports as duplicates.

    Any body that is not the JSON object of docs/sync-protocol.md accepts the
    whole batch.
    """
    if "json" not in response.headers.get("Content-Type", ""):
        return {}, set()
    try:
        body = response.json()
    except ValueError:
        return {}, set()
    if not isinstance(body, dict):
        return {}, set()
    rejected: dict[str, str] = {}
    for item in body.get("rejected") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            rejected[item["id"]] = str(item.get("reason") or "no reason given")[:300]
    duplicates = {d for d in body.get("duplicates") or [] if isinstance(d, str)}
    return rejected, duplicates


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` header requests, or None if absent or invalid.

    Accepts delta-seconds and HTTP dates (RFC 9110, section 10.2.3); a date in
    the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # The obsolete asctime form carries no zone; HTTP dates are GMT.
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def ndjson_line(row: sqlite3.Row) -> bytes:
    """Return one record as an NDJSON line, as ``records --format jsonl`` prints it.

    The ``data`` column already holds compact JSON, so it is spliced in as
    text rather than parsed and encoded again; ``data`` comes last.
    """
    fields = record_to_json(row, with_data=False)
    head = json.dumps(fields, ensure_ascii=False)
    data = row["data"] or "null"
    return f'{head[:-1]}, "data": {data}}}\n'.encode()
