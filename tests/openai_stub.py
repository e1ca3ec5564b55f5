"""A scriptable OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

``OpenAIStub`` serves ``POST /v1/chat/completions``. Each request takes the
next ``Reply`` of a script: a fixed record, an error status with or without
``Retry-After``, a delay, or a body that is no chat completion. After the script
every request gets the default reply, a valid ``log_event`` record. The stub can
also:

- reject ``response_format`` with a 400 (or 422) naming it, as servers without
  structured output do;
- hold every response until ``release`` (a stalled server);
- enforce its own requests-per-minute and tokens-per-minute limits and return
  429 with ``Retry-After`` past them, logging what each window held;
- forward requests to an upstream server (``python -m llama_cpp.server``), so
  it is a rate-limiting proxy in front of a real model.

Usage in replies is counted by the stub itself: prompt tokens as the messages'
characters over 4 plus 4 per message, completion tokens as the content's
characters over 4. These are deliberately cruder than a tokenizer; tests only
need numbers that are stable and consistent.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import httpx

DEFAULT_RECORD: dict[str, Any] = {
    "severity": "critical",
    "component": "KERNEL",
    "event_type": "hardware",
    "summary": "A data TLB error interrupt stopped the node.",
    "action_required": True,
    "suggested_action": "Check the node's memory and replace the node card.",
}
"""The ``log_event`` object the stub returns unless a reply names another."""
WINDOW_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Reply:
    """Response to one request; the default is a 200 with the default record."""

    status: int = 200
    content: str | None = None
    """Assistant message content; None sends the stub's default record as JSON."""
    retry_after: str | None = None
    """Value of the ``Retry-After`` header, or None to send none."""
    delay: float = 0.0
    """Seconds to wait before responding."""
    body: bytes | None = None
    """Raw body sent in place of the JSON reply (any status)."""
    usage: bool = True
    """Whether a 200 reply carries ``usage``."""
    finish_reason: str = "stop"


@dataclasses.dataclass(frozen=True)
class StubRequest:
    """One request as the stub handled it."""

    at: float
    """The stub's clock when the body had been read."""
    body: dict[str, Any]
    headers: dict[str, str]
    """Header values by lower-case name."""
    status: int
    tokens: int
    """Tokens the stub's limiter counted: prompt estimate plus ``max_tokens``."""
    limited: bool
    """True when the stub's own limits returned 429."""


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Return the stub's prompt token count for ``messages``."""
    chars = sum(len(str(message.get("content", ""))) for message in messages)
    return math.ceil(chars / 4) + 4 * len(messages)


class OpenAIStub:
    """Threaded OpenAI-compatible server on 127.0.0.1; a context manager.

    Args:
        script: replies for the next requests, in order.
        record: the default reply's ``log_event`` content.
        reject_response_format: respond to any request with ``response_format``
            with ``reject_status`` and an error naming the field.
        reject_status: 400 (OpenAI-style) or 422 (FastAPI validation).
        requests_per_minute: the stub's own request limit; 0 for none.
        tokens_per_minute: the stub's own token limit; 0 for none.
        limit_retry_after: ``Retry-After`` seconds sent with a limit's 429.
        upstream: base URL of a real server to forward to, ending in /v1.
        api_key: require this bearer token and return 401 otherwise, quoting the
            token it got, as some hosted APIs do.
        clock: monotonic seconds for the limit window and ``StubRequest.at``;
            tests with a fake clock pass theirs.
    """

    def __init__(
        self,
        script: Iterable[Reply] = (),
        record: dict[str, Any] | None = None,
        reject_response_format: bool = False,
        reject_status: int = 400,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        limit_retry_after: int = 1,
        upstream: str | None = None,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.record = dict(record or DEFAULT_RECORD)
        self.reject_response_format = reject_response_format
        self.reject_status = reject_status
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.limit_retry_after = limit_retry_after
        self.upstream = upstream
        self.api_key = api_key
        self.clock = clock
        self.requests: list[StubRequest] = []
        self.waiting = 0
        """Requests currently held by ``hold``."""
        self._script: Iterator[Reply] = iter(script)
        self._lock = threading.Lock()
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._gate = threading.Event()
        self._gate.set()
        self._closed = False
        self._server = self._make_server(0)
        self._port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    # Life cycle ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to configure as ``[review] base_url``."""
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> OpenAIStub:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="openai-stub", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and wake held responses; safe to call twice."""
        self._closed = True
        self._gate.set()
        self._stop_serving()

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def set_reachable(self, reachable: bool) -> None:
        """Close the listening socket (connections are refused), or listen on
        the same port again."""
        if reachable == (self._thread is not None) or self._closed:
            return
        if not reachable:
            self._stop_serving()
            return
        self._server = self._make_server(self._port)
        self.start()

    def hold(self) -> None:
        """Make every response wait until ``release``: a stalled server."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def _make_server(self, port: int) -> http.server.ThreadingHTTPServer:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                stub._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        return server

    def _stop_serving(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    # Limits --------------------------------------------------------------------

    def window_peaks(self) -> tuple[int, int]:
        """Return the most requests and tokens that any 60-second window held
        among the requests this stub let through."""
        passed = [r for r in self.requests if not r.limited]
        peak_requests = peak_tokens = 0
        for index, first in enumerate(passed):
            inside = [r for r in passed[index:] if r.at < first.at + WINDOW_SECONDS]
            peak_requests = max(peak_requests, len(inside))
            peak_tokens = max(peak_tokens, sum(r.tokens for r in inside))
        return peak_requests, peak_tokens

    def _over_limit(self, tokens: int, now: float) -> bool:
        """Count a request in the window unless it would pass a limit."""
        with self._lock:
            while self._window and self._window[0][0] <= now - WINDOW_SECONDS:
                self._window.popleft()
            count = len(self._window)
            used = sum(size for _, size in self._window)
            if self.requests_per_minute and count + 1 > self.requests_per_minute:
                return True
            if self.tokens_per_minute and used + tokens > self.tokens_per_minute:
                return True
            self._window.append((now, tokens))
            return False

    # Requests ------------------------------------------------------------------

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        request = self._read(handler)
        if request is None:
            return
        body, headers, now, tokens = request

        if self._reject_key(handler, body, headers, now, tokens):
            return
        if self._reject_over_limit(handler, body, headers, now, tokens):
            return

        with self._lock:
            reply = next(self._script, Reply())
        if reply.delay:
            time.sleep(reply.delay)
        with self._lock:
            self.waiting += 1
        self._gate.wait()
        with self._lock:
            self.waiting -= 1

        if self.reject_response_format and "response_format" in body:
            self._record(now, body, headers, self.reject_status, tokens, False)
            error = {
                "message": "response_format of type json_schema is not supported",
                "type": "invalid_request_error",
                "param": "response_format",
            }
            self._send(handler, self.reject_status, {"error": error})
            return
        if self.upstream is not None and reply == Reply():
            self._forward(handler, body, headers, now, tokens)
            return
        self._record(now, body, headers, reply.status, tokens, limited=False)
        self._reply(handler, body, reply)

    def _read(
        self, handler: http.server.BaseHTTPRequestHandler
    ) -> tuple[dict[str, Any], dict[str, str], float, int] | None:
        """Read a request; return its body, headers, arrival time and tokens, or
        None after sending a 404 or 400."""
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        now = self.clock()
        if handler.path.rstrip("/") != "/v1/chat/completions":
            self._send(handler, 404, {"error": {"message": "not found"}})
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(handler, 400, {"error": {"message": "body is not JSON"}})
            return None
        messages = body.get("messages", [])
        tokens = count_prompt_tokens(messages) + int(body.get("max_tokens") or 0)
        return body, headers, now, tokens

    def _reject_key(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        body: dict[str, Any],
        headers: dict[str, str],
        now: float,
        tokens: int,
    ) -> bool:
        if self.api_key is None:
            return False
        given = headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return False
        self._record(now, body, headers, 401, tokens, limited=False)
        message = f"Incorrect API key provided: {given.removeprefix('Bearer ')}"
        self._send(handler, 401, {"error": {"message": message}})
        return True

    def _reject_over_limit(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        body: dict[str, Any],
        headers: dict[str, str],
        now: float,
        tokens: int,
    ) -> bool:
        if not self._over_limit(tokens, now):
            return False
        self._record(now, body, headers, 429, tokens, limited=True)
        self._send(
            handler,
            429,
            {"error": {"message": "rate limit exceeded", "type": "rate_limit"}},
            {"Retry-After": str(self.limit_retry_after)},
        )
        return True

    def _reply(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        body: dict[str, Any],
        reply: Reply,
    ) -> None:
        extra = {"Retry-After": reply.retry_after} if reply.retry_after else {}
        if reply.body is not None:
            self._send_raw(handler, reply.status, reply.body, "text/plain", extra)
            return
        if reply.status != 200:
            error = {"message": f"scripted HTTP {reply.status}", "type": "server_error"}
            self._send(handler, reply.status, {"error": error}, extra)
            return
        content = reply.content
        if content is None:
            content = json.dumps(self.record)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.usage:
            prompt = count_prompt_tokens(body.get("messages", []))
            completion = math.ceil(len(content) / 4)
            payload["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        self._send(handler, 200, payload, extra)

    def _forward(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        body: dict[str, Any],
        headers: dict[str, str],
        now: float,
        tokens: int,
    ) -> None:
        assert self.upstream is not None
        response = httpx.post(
            self.upstream.rstrip("/") + "/chat/completions", json=body, timeout=600
        )
        self._record(now, body, headers, response.status_code, tokens, limited=False)
        self._send_raw(
            handler,
            response.status_code,
            response.content,
            response.headers.get("Content-Type", "application/json"),
            {},
        )

    def _record(
        self,
        now: float,
        body: dict[str, Any],
        headers: dict[str, str],
        status: int,
        tokens: int,
        limited: bool,
    ) -> None:
        with self._lock:
            self.requests.append(
                StubRequest(now, body, headers, status, tokens, limited)
            )

    def _send(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        extra: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        self._send_raw(handler, status, data, "application/json", extra or {})

    @staticmethod
    def _send_raw(
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        data: bytes,
        content_type: str,
        extra: dict[str, str],
    ) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout passed), so no one reads the response.
            return
