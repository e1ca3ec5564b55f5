"""OTLP protobuf payloads to SDK objects and back, for the telemetry spool.

The spool keeps each batch as the bytes that OpenTelemetry's own OTLP encoder
produced (``encode_spans``, ``encode_metrics``). The OTLP/HTTP exporters take
SDK objects, so a batch is decoded back into ``ReadableSpan`` objects or a
``MetricsData`` before it is sent. Decoding covers what the appliance records:
spans with attributes (scalars and arrays), events, links and status; sums,
gauges and explicit-bucket histograms without exemplars. A test checks that
encode, decode and encode again gives the same bytes.

The SDK documents ``ReadableSpan`` as created by its tracer only. This module
builds it through its public constructor (opentelemetry-sdk 1.45), so this is
the one place to change if that constructor changes.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import (
    InstrumentationScope as SdkScope,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

_KINDS = {
    trace_pb2.Span.SpanKind.SPAN_KIND_INTERNAL: SpanKind.INTERNAL,
    trace_pb2.Span.SpanKind.SPAN_KIND_SERVER: SpanKind.SERVER,
    trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT: SpanKind.CLIENT,
    trace_pb2.Span.SpanKind.SPAN_KIND_PRODUCER: SpanKind.PRODUCER,
    trace_pb2.Span.SpanKind.SPAN_KIND_CONSUMER: SpanKind.CONSUMER,
}
_REMOTE = trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def spans_to_bytes(spans: list[ReadableSpan]) -> bytes:
    """Encode spans as one serialized ``ExportTraceServiceRequest``."""
    return encode_spans(spans).SerializeToString()


def metrics_to_bytes(data: MetricsData) -> bytes:
    """Encode metrics as one serialized ``ExportMetricsServiceRequest``."""
    return encode_metrics(data).SerializeToString()


def spans_from_bytes(payload: bytes) -> list[ReadableSpan]:
    """Decode a serialized ``ExportTraceServiceRequest`` into SDK spans.

    Raises:
        google.protobuf.message.DecodeError: the payload is not such a request.
    """
    request = ExportTraceServiceRequest.FromString(payload)
    spans = []
    for resource_spans in request.resource_spans:
        resource = Resource(
            attributes_from(resource_spans.resource.attributes),
            resource_spans.schema_url,
        )
        for scope_spans in resource_spans.scope_spans:
            scope = _scope(scope_spans.scope, scope_spans.schema_url)
            for span in scope_spans.spans:
                spans.append(_span(span, resource, scope))
    return spans


def metrics_from_bytes(payload: bytes) -> MetricsData:
    """Decode a serialized ``ExportMetricsServiceRequest`` into ``MetricsData``.

    Raises:
        google.protobuf.message.DecodeError: the payload is not such a request.
        ValueError: a metric has a data type the appliance never records.
    """
    request = ExportMetricsServiceRequest.FromString(payload)
    resources = []
    for resource_metrics in request.resource_metrics:
        scopes = [
            ScopeMetrics(
                scope=_scope(scope_metrics.scope, scope_metrics.schema_url),
                metrics=[_metric(metric) for metric in scope_metrics.metrics],
                schema_url=scope_metrics.schema_url,
            )
            for scope_metrics in resource_metrics.scope_metrics
        ]
        resources.append(
            ResourceMetrics(
                resource=Resource(
                    attributes_from(resource_metrics.resource.attributes),
                    resource_metrics.schema_url,
                ),
                scope_metrics=scopes,
                schema_url=resource_metrics.schema_url,
            )
        )
    return MetricsData(resource_metrics=resources)


def attributes_from(pairs: Any) -> dict[str, Any]:
    """Decode repeated OTLP ``KeyValue`` pairs into an attribute dict."""
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    if kind == "kvlist_value":
        return attributes_from(value.kvlist_value.values)
    return getattr(value, kind)


def _scope(scope: InstrumentationScope, schema_url: str) -> SdkScope:
    return SdkScope(
        scope.name,
        scope.version or None,
        schema_url or None,
        attributes_from(scope.attributes) or None,
    )


def _context(trace_id: bytes, span_id: bytes, flags: int = 0) -> SpanContext:
    return SpanContext(
        int.from_bytes(trace_id, "big"),
        int.from_bytes(span_id, "big"),
        is_remote=bool(flags & _REMOTE),
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


def _span(span: trace_pb2.Span, resource: Resource, scope: SdkScope) -> ReadableSpan:
    # The encoder writes the parent's "is remote" bit into the span's flags.
    parent = (
        _context(span.trace_id, span.parent_span_id, span.flags)
        if span.parent_span_id
        else None
    )
    events = [
        Event(event.name, attributes_from(event.attributes), event.time_unix_nano)
        for event in span.events
    ]
    links = [
        Link(
            _context(link.trace_id, link.span_id, link.flags),
            attributes_from(link.attributes),
        )
        for link in span.links
    ]
    status = Status(StatusCode(span.status.code), span.status.message or None)
    return ReadableSpan(
        name=span.name,
        context=_context(span.trace_id, span.span_id),
        parent=parent,
        resource=resource,
        attributes=attributes_from(span.attributes),
        events=events,
        links=links,
        kind=_KINDS[span.kind],
        status=status,
        start_time=span.start_time_unix_nano,
        end_time=span.end_time_unix_nano,
        instrumentation_scope=scope,
    )


def _number(point: metrics_pb2.NumberDataPoint) -> NumberDataPoint:
    value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
    return NumberDataPoint(
        attributes=attributes_from(point.attributes),
        start_time_unix_nano=point.start_time_unix_nano,
        time_unix_nano=point.time_unix_nano,
        value=value,
    )


def _histogram_point(point: metrics_pb2.HistogramDataPoint) -> HistogramDataPoint:
    return HistogramDataPoint(
        attributes=attributes_from(point.attributes),
        start_time_unix_nano=point.start_time_unix_nano,
        time_unix_nano=point.time_unix_nano,
        count=point.count,
        sum=point.sum,
        bucket_counts=list(point.bucket_counts),
        explicit_bounds=list(point.explicit_bounds),
        min=point.min,
        max=point.max,
    )


def _metric(metric: metrics_pb2.Metric) -> Metric:
    kind = metric.WhichOneof("data")
    data: Sum | Gauge | Histogram
    if kind == "sum":
        data = Sum(
            data_points=[_number(p) for p in metric.sum.data_points],
            aggregation_temporality=AggregationTemporality(
                metric.sum.aggregation_temporality
            ),
            is_monotonic=metric.sum.is_monotonic,
        )
    elif kind == "gauge":
        data = Gauge(data_points=[_number(p) for p in metric.gauge.data_points])
    elif kind == "histogram":
        data = Histogram(
            data_points=[_histogram_point(p) for p in metric.histogram.data_points],
            aggregation_temporality=AggregationTemporality(
                metric.histogram.aggregation_temporality
            ),
        )
    else:
        raise ValueError(f"metric {metric.name!r} has unsupported data type {kind!r}")
    return Metric(
        name=metric.name,
        description=metric.description or None,
        unit=metric.unit or None,
        data=data,
    )
