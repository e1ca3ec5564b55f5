"""Fault-injecting HTTP sink for upload tests.

``FaultServer`` listens on 127.0.0.1 and plays the sink side of
docs/sync-protocol.md. It stores the records of each NDJSON batch, responds with
``{"accepted": N, "duplicates": [...], "rejected": [...]}`` and, unless built
with ``dedupe=False``, de-duplicates batches by ``Idempotency-Key`` and records
by ``id``. Each POST takes the next ``Fault`` of a script, which decides whether
the batch is stored and how the response goes wrong: an error status with or
without ``Retry-After``, a delay past the client's timeout, a TCP reset, a
truncated body, or records rejected by name or at random. Once the script is
used up, every POST gets the default fault, which accepts the batch.
``set_reachable(False)`` closes the listening socket and every open connection,
and ``set_reachable(True)`` listens on the same port again.

``accepted`` counts how often each record id was stored. With de-duplication
every count is at most 1, and without it a count above 1 shows that the client
sent a record again after the server had stored it.

Unlike ``tests.http_receiver``, which plays fixed replies and never parses the
records, this server keeps the state that exactly-once checks need.
"""

from __future__ import annotations

import dataclasses
import email.utils
import gzip
import http.server
import itertools
import json
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

MISSING_BYTES = 64
"""Bytes that a truncated response promises in ``Content-Length`` but never sends."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """How the server handles one POST. The default stores the batch and responds 200."""

    status: int = 200
    retry_after: str | None = None
    """Value of the ``Retry-After`` header, or None to send no such header."""
    body: bytes | None = None
    """Body sent as ``text/plain`` in place of the JSON result, or None for the
    JSON result on a 2xx status and an empty body otherwise."""
    store: bool | None = None
    """Whether the batch is stored before the response. None stores it exactly
    when ``status`` is 2xx, so ``Fault(reset=True)`` is a response lost after
    the commit and ``Fault(reset=True, store=False)`` one lost before it."""
    delay: float = 0.0
    """Seconds to wait after reading the request before responding."""
    reset: bool = False
    """Close the connection with a TCP reset instead of responding."""
    truncate: bool = False
    """Send a ``Content-Length`` ``MISSING_BYTES`` larger than the body, then close."""
    reject_ids: frozenset[str] = frozenset()
    """Record ids to name in ``rejected`` when they are in the batch."""
    reject_fraction: float = 0.0
    """Share of the batch's other records to reject at random (0 to 1), drawn
    from the server's seeded generator."""
    reject_reason: str = "rejected by the fault script"

    def stores_batch(self) -> bool:
        if self.store is not None:
            return self.store
        return 200 <= self.status < 300


def retry_after_date(seconds: float) -> str:
    """Return an HTTP date (IMF-fixdate) ``seconds`` from now, for ``Retry-After``.

    HTTP dates count whole seconds, so the wait a client derives from the date
    can be up to one second shorter than ``seconds``.
    """
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


def reject(*record_ids: str, reason: str = "rejected by the fault script") -> Fault:
    """Return a fault that stores the batch except ``record_ids``, named in ``rejected``."""
    return Fault(reject_ids=frozenset(record_ids), reject_reason=reason)


@dataclasses.dataclass(frozen=True)
class HandledRequest:
    """One request as the server read and handled it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header values by lower-case name."""
    record_ids: list[str]
    """The ``id`` of every NDJSON line, in body order; empty for HEAD or a bad body."""
    body_error: str | None
    """Why the body could not be read as gzip or NDJSON, or None."""
    fault: Fault | None
    """The fault applied, or None for HEAD and for a POST to another path."""
    received_at: float
    """``time.monotonic()`` when the body had been read."""

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


class FaultServer:
    """Threaded HTTP sink on 127.0.0.1 that stores batches and plays scripted faults.

    Use it as a context manager, or call ``start`` and ``close``.

    Args:
        script: faults for the next POSTs, in order; an endless iterator is allowed.
        default: the fault for every POST after the script.
        dedupe: de-duplicate by ``Idempotency-Key`` and record id, as the contract
            requires; False makes a sink that stores every copy it is sent.
        seed: seed of the generator behind ``Fault.reject_fraction``.
        path: the upload path; POSTs elsewhere get 404.
    """

    def __init__(
        self,
        script: Iterable[Fault] = (),
        default: Fault = Fault(),
        dedupe: bool = True,
        seed: int = 0,
        path: str = "/ingest",
    ) -> None:
        self.path = path
        self.dedupe = dedupe
        self._default = default
        self._script: Iterator[Fault] = iter(script)
        self._random = random.Random(seed)
        self._condition = threading.Condition()
        self._requests: list[HandledRequest] = []
        self._accepted: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._rejected: dict[str, str] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._replays = 0
        self._closed = False
        self._server = _Server(("127.0.0.1", 0), self)
        self._port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    @property
    def reachable(self) -> bool:
        return self._thread is not None

    def start(self) -> FaultServer:
        self._serve()
        return self

    def close(self) -> None:
        """Stop serving, wake delayed responses and close every socket; safe to call twice."""
        self._closed = True
        self._stop_serving()
        self._server.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def set_reachable(self, reachable: bool) -> None:
        """Close the listening socket and open connections, or listen on the same port again.

        While unreachable, connections to the port are refused. Raises OSError if
        another process took the port in between.
        """
        if reachable == self.reachable or self._closed:
            return
        if not reachable:
            self._stop_serving()
            self._server.server_close()
            return
        self._server = _Server(("127.0.0.1", self._port), self)
        self._serve()

    def _serve(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fault-server-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _stop_serving(self) -> None:
        server, thread = self._server, self._thread
        self._thread = None
        server.stopping.set()
        if thread is not None and thread.is_alive():
            server.shutdown()
            thread.join(timeout=5)
        server.close_connections()

    # Script ------------------------------------------------------------------

    def add_faults(self, *faults: Fault) -> None:
        """Append faults to the script; after an endless script they are never reached."""
        with self._condition:
            self._script = itertools.chain(self._script, faults)

    def _next_fault(self) -> Fault:
        with self._condition:
            return next(self._script, self._default)

    # Results -----------------------------------------------------------------

    @property
    def requests(self) -> list[HandledRequest]:
        """Return a copy of the requests handled so far, oldest first."""
        with self._condition:
            return list(self._requests)

    @property
    def accepted(self) -> Counter[str]:
        """Return how often each record id was stored."""
        with self._condition:
            return Counter(self._accepted)

    @property
    def duplicates(self) -> Counter[str]:
        """Return how often each record id was named in ``duplicates``."""
        with self._condition:
            return Counter(self._duplicates)

    @property
    def rejected(self) -> dict[str, str]:
        """Return the reason of the latest rejection of each rejected record id."""
        with self._condition:
            return dict(self._rejected)

    @property
    def replays(self) -> int:
        """Return how many POSTs got the stored result of an earlier batch with their key."""
        with self._condition:
            return self._replays

    def wait_for_requests(self, count: int, timeout: float) -> list[HandledRequest]:
        """Wait until at least ``count`` requests are handled or ``timeout`` seconds pass.

        Returns the handled requests, which can be fewer than ``count`` on timeout.
        """
        with self._condition:
            self._condition.wait_for(lambda: len(self._requests) >= count, timeout)
            return list(self._requests)

    def wait_for_accepted(self, record_ids: Iterable[str], timeout: float) -> bool:
        """Wait until every id in ``record_ids`` is stored; return False on timeout."""
        expected = set(record_ids)
        with self._condition:
            return self._condition.wait_for(
                lambda: expected.issubset(self._accepted), timeout
            )

    # Batches -----------------------------------------------------------------

    def _log(self, request: HandledRequest) -> None:
        with self._condition:
            self._requests.append(request)
            self._condition.notify_all()

    def _store_batch(
        self, key: str | None, record_ids: list[str], fault: Fault
    ) -> dict[str, Any]:
        """Store the batch's records under ``fault`` and return the JSON result."""
        with self._condition:
            if self.dedupe and key is not None and key in self._results:
                self._replays += 1
                return self._results[key]

            accepted, duplicates, rejected = 0, [], []
            for record_id in record_ids:
                if self._is_rejected(record_id, fault):
                    rejected.append({"id": record_id, "reason": fault.reject_reason})
                    self._rejected[record_id] = fault.reject_reason
                elif self.dedupe and record_id in self._accepted:
                    duplicates.append(record_id)
                    self._duplicates[record_id] += 1
                else:
                    accepted += 1
                    self._accepted[record_id] += 1

            result = {
                "accepted": accepted,
                "duplicates": duplicates,
                "rejected": rejected,
            }
            if self.dedupe and key is not None:
                self._results[key] = result
            self._condition.notify_all()
            return result

    def _is_rejected(self, record_id: str, fault: Fault) -> bool:
        if record_id in fault.reject_ids:
            return True
        return (
            fault.reject_fraction > 0 and self._random.random() < fault.reject_fraction
        )


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: FaultServer) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        """Set when this listener closes, to cut short delayed responses."""
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        # A client keeps idle connections in its pool; without this it would
        # still reach the server through them after the listener closed.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between batches, so the client's
    # connection pool and its stale connections are exercised.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, is_open=True)

    def finish(self) -> None:
        self.server.track(self.connection, is_open=False)
        try:
            super().finish()
        except OSError:
            # The socket was shut down by set_reachable(False) or a reset.
            pass

    def do_HEAD(self) -> None:
        self.server.owner._log(self._handled([], None, None))
        self.send_response(204)
        self.end_headers()

    def do_POST(self) -> None:
        owner = self.server.owner
        try:
            raw_body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        record_ids, body_error = _parse_record_ids(
            raw_body, self.headers.get("Content-Encoding")
        )
        if self.path.split("?")[0] != owner.path:
            owner._log(self._handled(record_ids, body_error, None))
            self._respond(404, b"no upload endpoint here", "text/plain")
            return
        fault = owner._next_fault()
        owner._log(self._handled(record_ids, body_error, fault))

        if fault.stores_batch() and body_error is not None:
            self._respond(400, body_error.encode("utf-8"), "text/plain")
            return
        result = None
        if fault.stores_batch():
            key = self.headers.get("Idempotency-Key")
            result = owner._store_batch(key, record_ids, fault)

        if fault.delay > 0 and self.server.stopping.wait(fault.delay):
            self.close_connection = True
            return
        if fault.reset:
            self._reset_connection()
            return
        if fault.body is not None:
            body, content_type = fault.body, "text/plain; charset=utf-8"
        elif result is not None and 200 <= fault.status < 300:
            body, content_type = json.dumps(result).encode("utf-8"), "application/json"
        else:
            body, content_type = b"", "text/plain; charset=utf-8"
        self._respond(
            fault.status, body, content_type, fault.retry_after, fault.truncate
        )

    def _handled(
        self, record_ids: list[str], body_error: str | None, fault: Fault | None
    ) -> HandledRequest:
        return HandledRequest(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            record_ids=record_ids,
            body_error=body_error,
            fault=fault,
            received_at=time.monotonic(),
        )

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: str,
        retry_after: str | None = None,
        truncate: bool = False,
    ) -> None:
        try:
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Type", content_type)
            length = len(body) + (MISSING_BYTES if truncate else 0)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            # The client gave up first, for example after its read timeout.
            pass
        if truncate:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.close_connection = True
        self.rfile.close()
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read HandledRequest entries, so access logs would only add noise.
        pass


def _parse_record_ids(
    raw_body: bytes, encoding: str | None
) -> tuple[list[str], str | None]:
    """Return the ids of an NDJSON body, or an empty list and the reason it is invalid."""
    body = raw_body
    if encoding is not None and encoding.lower() == "gzip":
        try:
            body = gzip.decompress(raw_body)
        except (OSError, EOFError, zlib.error) as exc:
            return [], f"invalid gzip body: {exc}"
    elif encoding is not None and encoding.lower() != "identity":
        return [], f"unsupported Content-Encoding {encoding!r}"
    record_ids = []
    try:
        for number, line in enumerate(body.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                return [], f"line {number} is not a JSON object with a string id"
            record_ids.append(record["id"])
    except (UnicodeDecodeError, ValueError) as exc:
        return [], f"body is not NDJSON: {exc}"
    return record_ids, None
