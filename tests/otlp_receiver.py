"""A loopback OTLP/HTTP receiver for telemetry tests.

``OtlpReceiver`` listens on 127.0.0.1 and decodes ``/v1/traces`` and
``/v1/metrics`` POSTs (protobuf, optionally gzip) with opentelemetry-proto.
It keeps every span with its ids, parent, name and attributes, and every
metric name. ``stop`` closes the listening socket so clients get connection
refused, and ``start`` listens again on the same port. Setting ``status`` makes it
respond to every request with that HTTP status instead of 200.

``python -m tests.otlp_receiver`` runs one in its own process, for benchmarks
that must not share their interpreter with the collector: it prints the port
and serves until it is terminated.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import sys
import threading
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector received it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    """Empty for a root span."""
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpReceiver:
    """Collects OTLP/HTTP protobuf exports on a loopback port."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metric_names: list[str] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        """Path and lower-case headers of every request."""
        self.status = 200
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        """Listen on the remembered port, or a free one the first time."""
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                payload = receiver._accept(self.path, headers, body)
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; later connections are refused until ``start``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        with self._lock:
            self.requests.append((path, headers))
            if self.status != 200:
                return b""
            if path.endswith("/v1/traces"):
                self._add_spans(ExportTraceServiceRequest.FromString(body))
                return ExportTraceServiceResponse().SerializeToString()
            if path.endswith("/v1/metrics"):
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        self.metric_names += [m.name for m in scope_metrics.metrics]
                return ExportMetricsServiceResponse().SerializeToString()
        return b""

    def _add_spans(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            status_code=span.status.code,
                        )
                    )

    def received(self) -> list[ReceivedSpan]:
        """Return a copy of the spans received so far."""
        with self._lock:
            return list(self.spans)


def main() -> int:
    receiver = OtlpReceiver().start()
    print(receiver.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
