"""Loopback HTTP server for upload tests.

``HttpReceiver`` listens on 127.0.0.1 on a free port and serves each
connection in its own thread. It stores every request with its headers and
its body after gzip decoding, and responds to POSTs from a scripted list of
replies. A reply can set the status and ``Retry-After``, wait before it is
sent, or reset the connection instead of responding. Once the script is
used up, every POST gets ``HTTP 200``.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted response to a POST."""

    status: int = 200
    retry_after: str | None = None
    """Value of the ``Retry-After`` header, or None to send no such header."""
    body: bytes = b""
    delay: float = 0.0
    """Seconds to wait after reading the request before responding."""
    reset: bool = False
    """Close the connection with a TCP reset instead of sending a response."""
    content_type: str = "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver read it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header values by lower-case name."""
    raw_body: bytes
    """Body bytes as sent, still compressed if the client compressed them."""
    body: bytes | None
    """Body after gzip decoding, or None when decoding failed."""
    decode_error: str | None
    received_at: float
    """``time.monotonic()`` when the body had been read."""
    reply: Reply

    def header(self, name: str) -> str | None:
        """Return the value of header ``name`` (any case), or None if it was not sent."""
        return self.headers.get(name.lower())

    def ndjson(self) -> list[dict[str, Any]]:
        """Parse the decoded body as NDJSON and return one object per line.

        Raises:
            ValueError: the body could not be decoded, or a line is not JSON.
        """
        if self.body is None:
            raise ValueError(f"body could not be decoded: {self.decode_error}")
        text = self.body.decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line]

    def record_ids(self) -> list[str]:
        """Return the ``id`` field of every NDJSON line, in body order."""
        return [str(record["id"]) for record in self.ndjson()]


class HttpReceiver:
    """Threaded HTTP server on 127.0.0.1 that stores requests and plays scripted replies.

    Use it as a context manager, or call ``start`` and ``close``.
    """

    def __init__(self, replies: Iterable[Reply] = (), path: str = "/ingest") -> None:
        self.path = path
        self._replies = list(replies)
        self._requests: list[ReceivedRequest] = []
        self._condition = threading.Condition()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="http-receiver",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Return a copy of the requests stored so far, oldest first."""
        with self._condition:
            return list(self._requests)

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake replies that are still waiting, and close the socket."""
        self._closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def add_replies(self, *replies: Reply) -> None:
        """Append replies to the script, which uses them for the next POSTs in order."""
        with self._condition:
            self._replies.extend(replies)

    def wait_for_requests(self, count: int, timeout: float) -> list[ReceivedRequest]:
        """Wait until at least ``count`` requests are stored or ``timeout`` seconds pass.

        Returns the stored requests, which can be fewer than ``count`` on timeout.
        """
        with self._condition:
            self._condition.wait_for(lambda: len(self._requests) >= count, timeout)
            return list(self._requests)

    def _next_reply(self) -> Reply:
        with self._condition:
            return self._replies.pop(0) if self._replies else Reply()

    def _store(self, request: ReceivedRequest) -> None:
        with self._condition:
            self._requests.append(request)
            self._condition.notify_all()


class _Server(http.server.ThreadingHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        receiver: HttpReceiver,
    ) -> None:
        self.receiver = receiver
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between requests, as a real ingest
    # endpoint would, so the client's connection pool is exercised.
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        receiver = self.server.receiver
        raw_body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        body, decode_error = _decode_body(raw_body, headers.get("content-encoding"))
        reply = receiver._next_reply()
        receiver._store(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers=headers,
                raw_body=raw_body,
                body=body,
                decode_error=decode_error,
                received_at=time.monotonic(),
                reply=reply,
            )
        )
        if reply.delay > 0:
            receiver._closing.wait(reply.delay)
        if reply.reset:
            self._reset_connection()
            return
        try:
            self.send_response(reply.status)
            if reply.retry_after is not None:
                self.send_header("Retry-After", reply.retry_after)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first, for example after its read timeout.
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # Skip trailer fields up to the empty line that ends the body.
                while self.rfile.readline().strip():
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.close_connection = True
        # The socket closes once its last file object does. wfile stays open
        # because http.server flushes it after do_POST returns.
        self.rfile.close()
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read the stored requests, so access logs on stderr would only add noise.
        pass


def _decode_body(
    raw_body: bytes, encoding: str | None
) -> tuple[bytes | None, str | None]:
    if encoding is None or encoding.lower() == "identity":
        return raw_body, None
    if encoding.lower() != "gzip":
        return None, f"unsupported Content-Encoding {encoding!r}"
    try:
        return gzip.decompress(raw_body), None
    except (OSError, EOFError, zlib.error) as exc:
        return None, f"invalid gzip body: {exc}"


def unused_port_url(path: str = "/ingest") -> str:
    """Return a URL on 127.0.0.1 whose port had no listener a moment ago.

    The port comes from binding port 0 and closing the socket, so connections
    to it are refused unless another process takes the port in between.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
