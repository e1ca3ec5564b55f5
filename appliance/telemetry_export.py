"""Offline-first telemetry export: spans and metrics pass through the spool.

Finished spans and collected metrics go to an in-memory queue, which costs the
pipeline thread one list append. The ``telemetry-export`` thread writes the
queue to the spool about once a second (``FLUSH_INTERVAL``) and sends spooled
batches, oldest first, with OpenTelemetry's OTLP/HTTP protobuf exporters. A
batch leaves the spool only once the collector accepted it (or rejected it as
invalid with HTTP 400 or 413, which a resend cannot fix). While the collector
is unreachable, attempts back off exponentially with jitter up to
``EXPORT_POLICY.maximum_interval``; the spool bound decides what is dropped.
Delivery is at least once: a batch whose response is lost after the collector
stored it is sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests
from google.protobuf.message import DecodeError
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import format_span_id, format_trace_id

from appliance.errors import StoreError
from appliance.retry import RetryPolicy
from appliance.telemetry_codec import (
    metrics_from_bytes,
    metrics_to_bytes,
    spans_from_bytes,
    spans_to_bytes,
)
from appliance.telemetry_spool import METRICS, TRACES, Batch, SpanRow, TelemetrySpool

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
"""Seconds between writes of queued telemetry to the spool."""
MAX_QUEUED_SPANS = 20_000
"""Spans held in memory between spool writes; past this the oldest are dropped
and counted. Only reached when the spool cannot be written (disk full)."""
MAX_QUEUED_METRICS = 100
"""Metric collections held in memory while the spool cannot be written."""
SPANS_PER_BATCH = 512
"""Spans per spooled batch, which keeps each export request far below the
exporter's 64 MiB request limit."""
BATCHES_PER_ROUND = 16
"""Batches sent per round before the queue is written to the spool again."""
REJECTED_STATUS = frozenset({400, 413})
"""HTTP statuses after which a batch is deleted, because a resend gets the same
response."""
EXPORT_POLICY = RetryPolicy(
    initial_interval=1.0,
    backoff_coefficient=2.0,
    maximum_interval=60.0,
    maximum_attempts=0,
)
"""Backoff between export attempts while the collector is unreachable."""
DRIFT_ATTRIBUTE = "field_relay.drift.sample"

# The exporters log every failed request at ERROR level and every retry. This
# module logs the first failure, the recovery and each rejected batch itself,
# with the HTTP status or connection error, so their lines would repeat it.
logging.getLogger("opentelemetry.exporter.otlp.common.http").setLevel(logging.CRITICAL)


class RecordingSession(requests.Session):
    """A requests session that keeps the outcome of its last request.

    The OTLP exporters report only success or failure; the session gives the
    HTTP status or connection error behind a failure.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_status: int | None = None
        self.last_error: str | None = None

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:  # type: ignore[override]
        self.last_status = None
        self.last_error = None
        try:
            response = super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]
        except requests.RequestException as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        self.last_status = response.status_code
        if response.status_code >= 300:
            self.last_error = f"HTTP {response.status_code} {response.reason}"
        return response


class OtlpEndpoints:
    """The collector URL of each signal, from the configuration and environment.

    Args:
        base_url: the ``[telemetry] otlp_endpoint`` setting, or None.
        environ: the process environment, for the standard ``OTEL_EXPORTER_OTLP_*``
            variables (``_ENDPOINT``, ``_TRACES_ENDPOINT``, ``_METRICS_ENDPOINT``).
    """

    def __init__(self, base_url: str | None, environ: Mapping[str, str]) -> None:
        base = base_url or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        self.traces = self._signal_url(
            base, base_url, environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), "traces"
        )
        self.metrics = self._signal_url(
            base,
            base_url,
            environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            "metrics",
        )

    @staticmethod
    def _signal_url(
        base: str | None, configured: str | None, specific: str | None, signal: str
    ) -> str | None:
        # A configured base URL wins over the environment; a signal-specific
        # variable is a full URL, used as given (OTLP exporter specification).
        if configured:
            return f"{configured.rstrip('/')}/v1/{signal}"
        if specific:
            return specific
        if base:
            return f"{base.rstrip('/')}/v1/{signal}"
        return None

    @property
    def enabled(self) -> bool:
        return self.traces is not None or self.metrics is not None

    def describe(self) -> str | None:
        """Return the endpoints for status, or None when telemetry stays local."""
        urls = [url for url in (self.traces, self.metrics) if url]
        return ", ".join(dict.fromkeys(urls)) or None


class SpoolExporter:
    """Owns the telemetry queue, the spool writes and the sends to the collector.

    Args:
        spool: the on-disk spool.
        endpoints: collector URLs; with none, only local span copies are kept.
        headers: extra HTTP headers (merged with ``OTEL_EXPORTER_OTLP_HEADERS``).
        timeout: seconds one export request may take.
        policy: backoff while the collector is unreachable.
    """

    def __init__(
        self,
        spool: TelemetrySpool,
        endpoints: OtlpEndpoints,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        policy: RetryPolicy = EXPORT_POLICY,
    ) -> None:
        self.spool = spool
        self.endpoints = endpoints
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.policy = policy
        self._spans: list[ReadableSpan] = []
        self._metrics: list[bytes] = []
        self._queue_lock = threading.Lock()
        self._lost_in_memory = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._span_exporter, self._metric_exporter, self._session = self._exporters(
            timeout
        )
        spool.set_endpoint(endpoints.describe())

    # Queue -----------------------------------------------------------------

    def enqueue_span(self, span: ReadableSpan) -> None:
        """Queue one finished span in memory; the caller does no I/O."""
        with self._queue_lock:
            self._spans.append(span)
            if len(self._spans) > MAX_QUEUED_SPANS:
                del self._spans[0]
                self._lost_in_memory += 1

    def enqueue_metrics(self, data: MetricsData) -> None:
        """Queue one metrics collection, already encoded."""
        payload = metrics_to_bytes(data)
        with self._queue_lock:
            self._metrics.append(payload)

    def wake(self) -> None:
        """Write the queue and try a send now instead of at the next interval."""
        self._wake.set()

    # Thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="telemetry-export", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write_queue()
                if time.monotonic() >= self._next_attempt:
                    self.send_spooled(BATCHES_PER_ROUND)
            except StoreError as exc:
                logger.warning("telemetry spool write failed; retrying: %s", exc)
            except Exception:
                # Telemetry must never stop the appliance; the thread logs and
                # carries on with the next round.
                logger.exception("telemetry export round failed")
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()

    def close(self, timeout: float) -> None:
        """Stop the thread, spool what is queued and try one bounded final send.

        The final send stops at the first failed request or after ``timeout``
        seconds. What is left stays spooled for the next run.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.1))
        try:
            self.write_queue()
        except StoreError as exc:
            logger.warning("telemetry queued at exit not spooled: %s", exc)
        remaining = deadline - time.monotonic()
        busy = self._thread is not None and self._thread.is_alive()
        if self.endpoints.enabled and remaining > 0 and not busy:
            self._close_exporters()
            self._span_exporter, self._metric_exporter, self._session = self._exporters(
                remaining
            )
            self._next_attempt = 0.0
            while time.monotonic() < deadline:
                sent = self.send_spooled(BATCHES_PER_ROUND, deadline)
                if sent == 0:
                    break
        self._close_exporters()

    # Spool writes ------------------------------------------------------------

    def write_queue(self) -> None:
        """Move queued spans and metrics into the spool.

        Raises:
            StoreError: the spool could not be written; what was not written
                goes back to the front of the queue.
        """
        with self._queue_lock:
            spans, self._spans = self._spans, []
            metrics, self._metrics = self._metrics, []
            lost, self._lost_in_memory = self._lost_in_memory, 0
        spans_done = metrics_done = 0
        try:
            while spans_done < len(spans):
                chunk = spans[spans_done : spans_done + SPANS_PER_BATCH]
                payload = spans_to_bytes(chunk) if self.endpoints.traces else None
                self._report_drops(
                    self.spool.add(TRACES, payload, len(chunk), _span_rows(chunk))
                )
                spans_done += len(chunk)
            for payload in metrics:
                if self.endpoints.metrics:
                    self._report_drops(self.spool.add(METRICS, payload, 1))
                metrics_done += 1
        except StoreError:
            self._requeue(spans[spans_done:], metrics[metrics_done:], lost)
            raise
        if lost:
            logger.warning(
                "%d spans dropped in memory because the spool could not be written",
                lost,
            )

    def _requeue(
        self, spans: list[ReadableSpan], metrics: list[bytes], lost: int
    ) -> None:
        with self._queue_lock:
            self._spans[:0] = spans
            self._metrics[:0] = metrics
            excess = len(self._spans) - MAX_QUEUED_SPANS
            if excess > 0:
                del self._spans[:excess]
                lost += excess
            del self._metrics[:-MAX_QUEUED_METRICS]
            self._lost_in_memory += lost

    def _report_drops(self, dropped: int) -> None:
        if dropped:
            logger.warning(
                "telemetry spool full: dropped the oldest %d spans to stay within "
                "spool_bytes",
                dropped,
            )

    # Sends -----------------------------------------------------------------

    def send_spooled(self, limit: int, deadline: float | None = None) -> int:
        """Send up to ``limit`` spooled batches, oldest first; return how many went.

        Stops at the first failure and schedules the next attempt by the backoff
        policy.
        """
        if not self.endpoints.enabled:
            return 0
        sent = 0
        signals = [
            signal
            for signal, url in (
                (TRACES, self.endpoints.traces),
                (METRICS, self.endpoints.metrics),
            )
            if url
        ]
        for batch in self.spool.oldest(limit, signals):
            if deadline is not None and time.monotonic() >= deadline:
                break
            outcome = self._send(batch)
            if outcome == "failed":
                self._failed(batch)
                break
            self.spool.remove(batch, outcome)
            if outcome == "exported":
                sent += 1
                if self._failures:
                    logger.info(
                        "telemetry collector reachable again after %d failed "
                        "attempts; sending the spool",
                        self._failures,
                    )
                self._failures = 0
                self._next_attempt = 0.0
        return sent

    def _send(self, batch: Batch) -> str:
        """Return ``exported``, ``rejected`` or ``failed`` for one batch."""
        try:
            if batch.signal == TRACES and self._span_exporter is not None:
                spans = spans_from_bytes(batch.payload)
                ok = self._span_exporter.export(spans) is SpanExportResult.SUCCESS
            elif batch.signal == METRICS and self._metric_exporter is not None:
                data = metrics_from_bytes(batch.payload)
                ok = self._metric_exporter.export(data) is MetricExportResult.SUCCESS
            else:
                return "failed"
        except (DecodeError, ValueError) as exc:
            logger.error(
                "telemetry batch %d (%s) is unreadable and was deleted: %s",
                batch.id,
                batch.signal,
                exc,
            )
            return "rejected"
        if ok:
            return "exported"
        if self._session.last_status in REJECTED_STATUS:
            logger.error(
                "collector rejected telemetry batch %d (%s, %d items) with %s; "
                "deleted it",
                batch.id,
                batch.signal,
                batch.items,
                self._session.last_error,
            )
            self.spool.set_error(
                f"batch rejected: {self._session.last_error}", time.time()
            )
            return "rejected"
        return "failed"

    def _failed(self, batch: Batch) -> None:
        self._failures += 1
        delay = self.policy.jittered_delay(self._failures)
        self._next_attempt = time.monotonic() + delay
        reason = self._session.last_error or "export failed"
        url = (
            self.endpoints.traces if batch.signal == TRACES else self.endpoints.metrics
        )
        self.spool.set_error(f"{url}: {reason}", time.time())
        if self._failures == 1:
            logger.warning(
                "telemetry collector %s unreachable (%s); telemetry stays spooled, "
                "retrying with backoff",
                url,
                reason,
            )
        else:
            logger.debug(
                "telemetry export attempt %d failed (%s); next in %.1f s",
                self._failures,
                reason,
                delay,
            )

    def _exporters(
        self, timeout: float
    ) -> tuple[OTLPSpanExporter | None, OTLPMetricExporter | None, RecordingSession]:
        session = RecordingSession()
        spans = metrics = None
        if self.endpoints.traces:
            spans = OTLPSpanExporter(
                endpoint=self.endpoints.traces,
                headers=self.headers,
                timeout=timeout,
                session=session,
            )
        if self.endpoints.metrics:
            metrics = OTLPMetricExporter(
                endpoint=self.endpoints.metrics,
                headers=self.headers,
                timeout=timeout,
                session=session,
            )
        return spans, metrics, session

    def _close_exporters(self) -> None:
        for exporter in (self._span_exporter, self._metric_exporter):
            if exporter is not None:
                exporter.shutdown()
        self._span_exporter = self._metric_exporter = None


class SpoolSpanProcessor(SpanProcessor):
    """Hands every finished span to the ``SpoolExporter`` queue."""

    def __init__(self, exporter: SpoolExporter) -> None:
        self.exporter = exporter

    def on_end(self, span: ReadableSpan) -> None:
        self.exporter.enqueue_span(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.exporter.wake()
        return True


class SpoolMetricExporter(MetricExporter):
    """A metric exporter for the periodic reader that writes to the spool queue."""

    def __init__(self, exporter: SpoolExporter) -> None:
        super().__init__()
        self.exporter = exporter

    def export(
        self,
        metrics_data: MetricsData,
        timeout_millis: float = 10_000,
        **kwargs: Any,
    ) -> MetricExportResult:
        self.exporter.enqueue_metrics(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def _span_rows(spans: Sequence[ReadableSpan]) -> list[SpanRow]:
    rows = []
    for span in spans:
        context = span.get_span_context()
        if context is None:
            continue
        status = span.status.status_code.name
        if span.status.description:
            status += f": {span.status.description}"
        attributes = dict(span.attributes or {})
        rows.append(
            SpanRow(
                trace_id=format_trace_id(context.trace_id),
                span_id=format_span_id(context.span_id),
                parent_span_id=format_span_id(span.parent.span_id)
                if span.parent
                else None,
                name=span.name,
                start_ns=span.start_time or 0,
                end_ns=span.end_time or 0,
                status=status,
                attributes={
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in attributes.items()
                },
                drift=bool(attributes.get(DRIFT_ATTRIBUTE)),
            )
        )
    return rows
