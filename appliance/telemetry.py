"""Tracing and metrics of the record workflow with the OpenTelemetry SDK.

Every record gets one trace. Its trace id is the record id's 128 bits, because
record ids are UUIDs (other ids are hashed). Its root span's id is derived from
the record id too. So every step joins the same trace, whichever thread or
process runs it, also after a crash and restart. The layout is::

    record log_event            root; start = received_at, end = the final move
    ├── infer                   one span per step attempt
    │   └── chat {model}        the model call (GenAI semantic conventions)
    ├── validate
    └── enqueue

The root span is emitted when the record reaches a final state (``queued`` or
``dead``), so collectors see it after its children. A root lost in a crash
between the final move and the next spool write is not emitted again.

``Telemetry`` owns the SDK providers, the spool and the exporter thread; the
workflow calls ``step`` and ``model_call`` on it. ``NO_TELEMETRY`` has the
same methods and records nothing, for tests and tools that do not trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from appliance.config import TelemetryConfig
from appliance.errors import StoreError
from appliance.states import FINAL_STATES, RecordState
from appliance.telemetry_capture import ContentCapture, Redactor
from appliance.telemetry_export import (
    DRIFT_ATTRIBUTE,
    EXPORT_POLICY,
    OtlpEndpoints,
    SpoolExporter,
    SpoolMetricExporter,
    SpoolSpanProcessor,
)
from appliance.telemetry_metrics import LinkFill, PipelineMetrics
from appliance.telemetry_spool import SPOOL_NAME, TelemetrySpool

if TYPE_CHECKING:
    from appliance.inference import Completion, OutputSpec, SamplingParams
    from appliance.retry import RetryPolicy
    from appliance.store import Store

logger = logging.getLogger(__name__)

SCOPE = "field_relay"
"""Instrumentation scope name of every span and metric."""
SERVICE_NAME = "field-relay"
PROVIDER_NAME = "llama_cpp"
"""``gen_ai.provider.name`` of local llama.cpp models; the semantic conventions
list no value for it, so this follows their lower-case naming."""
CLOSE_TIMEOUT = 5.0
"""Seconds the daemon gives the final telemetry flush at exit."""
STEP_NAMES = {"decode_json": "decode"}
"""Span names of activities whose method name differs from their step name."""

RECORD_ID = "field_relay.record.id"
STEP = "field_relay.step.name"


def trace_id_for(record_id: str) -> int:
    """Return the trace id of a record: its UUID's bits, or a hash of other ids."""
    try:
        value = uuid.UUID(record_id).int
    except ValueError:
        value = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:16], "big")
    return value or 1


def root_span_id_for(record_id: str) -> int:
    """Return the span id of a record's root span."""
    digest = hashlib.sha256(f"root:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def is_drift_sample(record_id: str, fraction: float) -> bool:
    """Return True when ``record_id`` falls in the drift-review sample.

    The choice is a hash of the id, so every process agrees on it.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"drift:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def record_context(record_id: str) -> otel_context.Context:
    """Return a context whose current span is the record's root span."""
    parent = SpanContext(
        trace_id_for(record_id),
        root_span_id_for(record_id),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


class _RecordIdGenerator(IdGenerator):
    """Random ids, except inside ``pinned``, which fixes the next ids of a thread."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._pinned = threading.local()

    @contextlib.contextmanager
    def pinned(self, trace_id: int, span_id: int) -> Iterator[None]:
        self._pinned.ids = (trace_id, span_id)
        try:
            yield
        finally:
            self._pinned.ids = None

    def generate_trace_id(self) -> int:
        ids = getattr(self._pinned, "ids", None)
        return ids[0] if ids else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._pinned, "ids", None)
        return ids[1] if ids else self._random.generate_span_id()


@dataclasses.dataclass
class StepOutcome:
    """The outcome of one activity run, set by the worker for the step span."""

    moved: bool = False
    """True when the activity committed a state change."""


@dataclasses.dataclass(frozen=True)
class RemoteModel:
    """A model behind a network API, as ``model_call`` records it."""

    provider: str
    """``gen_ai.provider.name``, such as ``openai``."""
    server_address: str | None = None
    """Host of the API, recorded as ``server.address``."""
    input_token_price: float = 0.0
    """Price per input token in ``currency``; 0 with the output price records
    no money cost."""
    output_token_price: float = 0.0
    currency: str = "USD"


@dataclasses.dataclass
class ModelCall:
    """The result of a model call, set by the caller inside ``model_call``."""

    completion: Completion | None = None


class NoTelemetry:
    """Records nothing; the interface the workflow uses."""

    @contextlib.contextmanager
    def step(self, store: Store, record_id: str, name: str) -> Iterator[StepOutcome]:
        """Trace one activity run on ``record_id`` as a child of its root span."""
        yield StepOutcome()

    @contextlib.contextmanager
    def model_call(
        self,
        record_id: str,
        model: str,
        messages: list[dict[str, str]],
        params: SamplingParams,
        output: OutputSpec | str | None,
        *,
        remote: RemoteModel | None = None,
    ) -> Iterator[ModelCall]:
        """Trace one model call; set ``completion`` on the yielded object.

        ``remote`` describes a model behind a network API; without it the
        call is a local llama.cpp call.
        """
        yield ModelCall()

    def start(self) -> None:
        """Start background export; nothing to start here."""

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Flush and stop; nothing to flush here."""


NO_TELEMETRY = NoTelemetry()


class Telemetry(NoTelemetry):
    """Tracing and metrics of one process, spooled in the data directory.

    Args:
        data_dir: the data directory; the spool is ``telemetry.db`` there.
        config: the ``[telemetry]`` settings.
        environ: environment for the standard ``OTEL_EXPORTER_OTLP_*``
            variables; defaults to ``os.environ``.
        link_fill: the running links' ring-buffer fill, for the ring metric.
        policy: backoff while the collector is unreachable.

    Raises:
        StoreError: the spool cannot be opened.
    """

    def __init__(
        self,
        data_dir: Path,
        config: TelemetryConfig | None = None,
        environ: Mapping[str, str] | None = None,
        link_fill: LinkFill | None = None,
        policy: RetryPolicy = EXPORT_POLICY,
    ) -> None:
        self.config = config or TelemetryConfig.model_validate({})
        self.capture = ContentCapture(
            self.config.capture, Redactor(self.config.redact_patterns)
        )
        self.spool = TelemetrySpool(
            data_dir / SPOOL_NAME,
            self.config.spool_bytes,
            self.config.local_spans,
            self.config.trace_retention_s,
        )
        self.endpoints = OtlpEndpoints(
            self.config.otlp_endpoint, os.environ if environ is None else environ
        )
        self.exporter = SpoolExporter(
            self.spool,
            self.endpoints,
            self.config.headers,
            self.config.export_timeout_s,
            policy,
        )

        release = _release()
        resource = Resource.create(
            {"service.name": SERVICE_NAME, "service.version": release}
        )
        self._ids = _RecordIdGenerator()
        self.tracer_provider = TracerProvider(
            resource=resource, id_generator=self._ids, shutdown_on_exit=False
        )
        self.tracer_provider.add_span_processor(SpoolSpanProcessor(self.exporter))
        self._tracer = self.tracer_provider.get_tracer(SCOPE, release)

        readers = []
        if self.endpoints.metrics:
            readers.append(
                PeriodicExportingMetricReader(
                    SpoolMetricExporter(self.exporter),
                    export_interval_millis=self.config.metric_interval_s * 1000,
                )
            )
        self.meter_provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            exemplar_filter=AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,
        )
        self.metrics = PipelineMetrics(
            self.meter_provider.get_meter(SCOPE, release), data_dir, link_fill
        )
        self._closed = False

    def start(self) -> None:
        """Start the export thread."""
        self.exporter.start()
        logger.info(
            "telemetry: spans kept in %s, exported to %s, capture %s",
            self.spool.path,
            self.endpoints.describe() or "nowhere (no OTLP endpoint)",
            self.capture.mode,
        )

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Collect the last metrics, spool everything and try a final send.

        Takes at most about ``timeout`` seconds; telemetry that the collector
        did not take by then stays spooled for the next run. Safe to call more
        than once.
        """
        if self._closed:
            return
        self._closed = True
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()
        self.exporter.close(timeout)
        self.spool.close()

    # Spans -----------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, store: Store, record_id: str, name: str) -> Iterator[StepOutcome]:
        name = STEP_NAMES.get(name, name)
        attributes: dict[str, Any] = {RECORD_ID: record_id, STEP: name}
        if is_drift_sample(record_id, self.config.drift_sample):
            attributes[DRIFT_ATTRIBUTE] = True
        span = self._tracer.start_span(
            name, context=record_context(record_id), attributes=attributes
        )
        outcome = StepOutcome()
        try:
            with trace.use_span(
                span,
                end_on_exit=False,
                record_exception=False,
                set_status_on_exception=False,
            ):
                yield outcome
        except BaseException as exc:
            self._set_error(span, exc)
            span.end()
            raise
        try:
            self._finish_step(span, store, record_id, name, outcome)
        finally:
            span.end()

    def _finish_step(
        self,
        span: Span,
        store: Store,
        record_id: str,
        name: str,
        outcome: StepOutcome,
    ) -> None:
        span.set_attribute("field_relay.step.moved", outcome.moved)
        if not outcome.moved:
            return
        try:
            row = store.get_record(record_id)
        except StoreError as exc:
            logger.warning(
                "record %s: step span left without its outcome: %s", record_id, exc
            )
            return
        if row is None:
            return
        state = row["state"]
        span.set_attribute("field_relay.record.state", state)
        span.set_attribute("field_relay.step.attempt", row["attempts"])
        if state in (RecordState.RECEIVED, RecordState.DEAD) and row["error"]:
            span.set_status(
                Status(StatusCode.ERROR, self.capture.error_text(row["error"]))
            )
            if state == RecordState.RECEIVED:
                self.metrics.retries.add(1, {STEP: name})
        if state in FINAL_STATES:
            self._emit_root(row)

    def _emit_root(self, row: Any) -> None:
        """Emit a record's root span, from its arrival to its final move.

        NOTE: a record put back into the workflow by ``appliance retry`` gets a
        second root span with the same span id when it becomes final again.
        """
        record_id = row["id"]
        attributes: dict[str, Any] = {
            RECORD_ID: record_id,
            "field_relay.link": row["link"],
            "field_relay.record.seq": row["seq"],
            "field_relay.record.kind": row["kind"],
            "field_relay.record.state": row["state"],
            "field_relay.record.attempts": row["attempts"],
        }
        if is_drift_sample(record_id, self.config.drift_sample):
            attributes[DRIFT_ATTRIBUTE] = True
        ids = (trace_id_for(record_id), root_span_id_for(record_id))
        start_ns = int(row["received_at"] * 1e9)
        with self._ids.pinned(*ids):
            span = self._tracer.start_span(
                f"record {row['kind']}",
                context=otel_context.Context(),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                start_time=start_ns,
            )
        if row["state"] == RecordState.DEAD:
            span.set_status(
                Status(StatusCode.ERROR, self.capture.error_text(row["error"] or ""))
            )
        span.end(end_time=max(int(row["updated_at"] * 1e9), start_ns))

    @contextlib.contextmanager
    def model_call(
        self,
        record_id: str,
        model: str,
        messages: list[dict[str, str]],
        params: SamplingParams,
        output: OutputSpec | str | None,
        *,
        remote: RemoteModel | None = None,
    ) -> Iterator[ModelCall]:
        drift = is_drift_sample(record_id, self.config.drift_sample)
        current = trace.get_current_span().get_span_context()
        in_record = current.is_valid and current.trace_id == trace_id_for(record_id)
        request = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": remote.provider if remote else PROVIDER_NAME,
            "gen_ai.request.model": model,
        }
        attributes: dict[str, Any] = {
            **request,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.seed": params.seed,
            "gen_ai.output.type": "json",
            RECORD_ID: record_id,
        }

        schema_id = getattr(output, "schema_id", None)
        if schema_id:
            attributes["field_relay.schema.id"] = schema_id
        if drift:
            attributes[DRIFT_ATTRIBUTE] = True
        if remote is not None and remote.server_address:
            attributes["server.address"] = remote.server_address
        # The GenAI conventions use CLIENT for a model behind an API and allow
        # INTERNAL for one running in this process.
        span = self._tracer.start_span(
            f"chat {model}",
            context=None if in_record else record_context(record_id),
            kind=SpanKind.CLIENT if remote else SpanKind.INTERNAL,
            attributes=attributes,
        )

        call = ModelCall()
        cpu_started = time.process_time()
        started = time.perf_counter()
        try:
            with trace.use_span(
                span,
                end_on_exit=False,
                record_exception=False,
                set_status_on_exception=False,
            ):
                yield call
        except BaseException as exc:
            self._set_error(span, exc)
            self.metrics.operation_duration.record(
                time.perf_counter() - started,
                {**request, "error.type": type(exc).__qualname__},
            )
            span.end()
            raise

        seconds = time.perf_counter() - started
        if call.completion is not None:
            self._set_result(
                span,
                call.completion,
                messages,
                time.process_time() - cpu_started,
                drift,
                remote,
            )
            self.metrics.record_model_call(
                request,
                seconds,
                call.completion.prompt_tokens,
                call.completion.completion_tokens,
            )
        span.end()

    def _set_result(
        self,
        span: Span,
        completion: Completion,
        messages: list[dict[str, str]],
        cpu_seconds: float,
        drift: bool,
        remote: RemoteModel | None,
    ) -> None:
        model = span.attributes.get("gen_ai.request.model")  # type: ignore[attr-defined]
        span.set_attributes(
            {
                "gen_ai.response.model": model,
                "gen_ai.usage.input_tokens": completion.prompt_tokens,
                "gen_ai.usage.output_tokens": completion.completion_tokens,
                "gen_ai.response.finish_reasons": (completion.finish_reason,),
                "field_relay.answer_cache.hit": completion.cached,
                "field_relay.model.duration_s": round(completion.duration, 6),
                # Process CPU time over the call: it includes other threads'
                # work in that interval, small next to the model's.
                "field_relay.cost.cpu_s": round(cpu_seconds, 6),
            }
        )
        prices = (
            (remote.input_token_price, remote.output_token_price, remote.currency)
            if remote is not None
            else (
                self.config.input_token_price,
                self.config.output_token_price,
                self.config.price_currency,
            )
        )
        price = (
            completion.prompt_tokens * prices[0]
            + completion.completion_tokens * prices[1]
        )
        if price and not completion.cached:
            span.set_attributes(
                {
                    "field_relay.cost.amount": price,
                    "field_relay.cost.currency": prices[2],
                }
            )
        mode = self.capture.effective_mode(drift)
        span.set_attributes(
            self.capture.message_attributes(
                messages, completion.text, completion.finish_reason, mode
            )
        )

    def _set_error(self, span: Span, exc: BaseException) -> None:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, self.capture.error_text(f"{exc}")))


def _release() -> str:
    try:
        return version("field-relay")
    except PackageNotFoundError:
        return "unknown"
