"""Tracing, metrics and the offline-first telemetry export.

Spans go through the real SDK, the spool and the OTLP/HTTP exporters to
``OtlpReceiver``, a loopback collector that decodes the protobuf payloads.
The workflow runs on its real worker threads with a fake model.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from appliance.cli import main
from appliance.config import Config, TelemetryConfig
from appliance.errors import InferenceError
from appliance.inference import Completion, OutputSpec, SamplingParams
from appliance.retry import RetryPolicy
from appliance.states import RecordKind
from appliance.status import collect_status
from appliance.store import Store
from appliance.telemetry import (
    RemoteModel,
    Telemetry,
    is_drift_sample,
    root_span_id_for,
    trace_id_for,
)
from appliance.telemetry_capture import CaptureMode, ContentCapture, Redactor
from appliance.telemetry_codec import (
    metrics_from_bytes,
    metrics_to_bytes,
    spans_from_bytes,
    spans_to_bytes,
)
from appliance.telemetry_spool import METRICS, TRACES, SpanRow, TelemetrySpool
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from tests.conftest import APPLIANCE, FakeEngine
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

VALID = json.dumps(
    {
        "severity": "error",
        "component": "KERNEL",
        "event_type": "hardware",
        "summary": "Data TLB error.",
        "action_required": True,
        "suggested_action": "Replace the node card.",
    }
)
LINE = "RAS KERNEL FATAL data TLB error interrupt"
FAST_POLICY = RetryPolicy(
    initial_interval=0.1,
    backoff_coefficient=2.0,
    maximum_interval=0.3,
    maximum_attempts=0,
)
"""Export backoff short enough for a test to wait through it."""
NO_WAIT = RetryPolicy(initial_interval=0.0, maximum_interval=0.0, maximum_attempts=3)
SPANS_PER_RECORD = 5
"""Root, infer, chat, validate and enqueue of a valid log_event record."""


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


def _telemetry(
    data_dir: Path, receiver: OtlpReceiver | None, **settings: object
) -> Telemetry:
    config = TelemetryConfig.model_validate(
        {
            "otlp_endpoint": receiver.url if receiver else None,
            "export_timeout_s": 1.0,
            **settings,
        }
    )
    telemetry = Telemetry(data_dir, config, environ={}, policy=FAST_POLICY)
    telemetry.start()
    return telemetry


def _receive(store: Store, count: int, first_seq: int = 1) -> list[str]:
    ids = []
    with store.transaction() as conn:
        for seq in range(first_seq, first_seq + count):
            line = f"{LINE} {seq}"
            record_id = store.insert_record(
                conn, "test", seq, line, line.encode(), RecordKind.LOG_EVENT
            )
            assert record_id is not None
            ids.append(record_id)
    return ids


class Pipeline:
    """The workflow's two workers over one data directory, with a fake model."""

    def __init__(
        self, data_dir: Path, telemetry: Telemetry, answers: list[str | Exception]
    ) -> None:
        self.store = Store(data_dir / "appliance.db")
        self.engine = FakeEngine(answers)
        self.workflow = Workflow(
            self.store.path,
            self.engine,
            OutputSpec("log_event", 'root ::= "{}"'),
            SamplingParams(),
            policies={"infer": NO_WAIT, "validate": NO_WAIT},
        )
        self.workflow.telemetry = telemetry
        self.workers = [
            Worker("inference", self.workflow, inference_jobs(self.workflow)),
            Worker("steps", self.workflow, step_jobs(self.workflow)),
        ]
        for worker in self.workers:
            worker.start()

    def run(self, count: int, first_seq: int = 1) -> list[str]:
        """Receive ``count`` records and wait until all are final."""
        ids = _receive(self.store, count, first_seq)
        self.workflow.work_ready.set()
        _wait_for(lambda: self.store.unfinished_count() == 0)
        return ids

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(timeout=10)
        self.store.close()


@pytest.fixture
def receiver():
    with OtlpReceiver() as started:
        yield started


@pytest.fixture
def traced(tmp_path: Path, receiver: OtlpReceiver):
    """Two records (one needing a retry) traced and exported; returns their spans."""
    telemetry = _telemetry(tmp_path, receiver, capture="full")
    pipeline = Pipeline(tmp_path, telemetry, [VALID, "not json", VALID])
    ids = pipeline.run(2)
    pipeline.stop()
    telemetry.close()
    return tmp_path, ids, receiver.received()


def _by_trace(spans: list[ReceivedSpan], record_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == f"{trace_id_for(record_id):032x}"]


def _named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


# Trace layout ----------------------------------------------------------------


def test_trace_id_is_record_uuid() -> None:
    record_id = str(uuid.uuid4())
    assert trace_id_for(record_id) == uuid.UUID(record_id).int


def test_trace_id_of_non_uuid_is_stable() -> None:
    assert trace_id_for("replay-7") == trace_id_for("replay-7")
    assert trace_id_for("replay-7") != trace_id_for("replay-8")


def test_root_span_id_is_stable_per_record() -> None:
    record_id = str(uuid.uuid4())
    assert root_span_id_for(record_id) == root_span_id_for(record_id)
    assert root_span_id_for(record_id) != root_span_id_for(str(uuid.uuid4()))


def test_one_trace_per_record(traced) -> None:
    _, ids, spans = traced
    assert {s.trace_id for s in spans} == {f"{trace_id_for(i):032x}" for i in ids}


def test_root_span_has_no_parent(traced) -> None:
    _, ids, spans = traced
    roots = _named(_by_trace(spans, ids[0]), "record log_event")
    assert len(roots) == 1
    assert roots[0].parent_span_id == ""
    assert roots[0].span_id == f"{root_span_id_for(ids[0]):016x}"


def test_root_span_starts_at_received_time(traced) -> None:
    data_dir, ids, spans = traced
    store = Store(data_dir / "appliance.db", readonly=True)
    row = store.get_record(ids[0])
    store.close()
    root = _named(_by_trace(spans, ids[0]), "record log_event")[0]
    assert root.start_ns == int(row["received_at"] * 1e9)
    assert root.attributes["field_relay.record.state"] == "queued"


def test_step_spans_are_children_of_root(traced) -> None:
    _, ids, spans = traced
    trace = _by_trace(spans, ids[0])
    root = _named(trace, "record log_event")[0]
    steps = [s for s in trace if s.name in ("infer", "validate", "enqueue")]
    assert sorted(s.name for s in steps) == ["enqueue", "infer", "validate"]
    assert {s.parent_span_id for s in steps} == {root.span_id}


def test_model_call_is_child_of_infer(traced) -> None:
    _, ids, spans = traced
    trace = _by_trace(spans, ids[0])
    infer = _named(trace, "infer")[0]
    call = _named(trace, "chat fake")[0]
    assert call.parent_span_id == infer.span_id


def test_retried_record_has_span_per_attempt(traced) -> None:
    _, ids, spans = traced
    trace = _by_trace(spans, ids[1])
    assert len(_named(trace, "infer")) == 2
    assert len(_named(trace, "validate")) == 2
    assert len(_named(trace, "chat fake")) == 2


def test_failed_validation_span_is_an_error(traced) -> None:
    _, ids, spans = traced
    validations = _named(_by_trace(spans, ids[1]), "validate")
    codes = sorted(s.status_code for s in validations)
    assert codes == [StatusCode.UNSET.value, StatusCode.ERROR.value]


def test_model_call_has_genai_attributes(traced) -> None:
    _, ids, spans = traced
    call = _named(_by_trace(spans, ids[0]), "chat fake")[0]
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "fake",
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.request.max_tokens": 320,
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 20,
        "gen_ai.response.finish_reasons": ["stop"],
        "field_relay.schema.id": "log_event",
    }
    for key, value in expected.items():
        assert call.attributes[key] == value, key


def test_model_call_has_cost_and_duration(traced) -> None:
    _, ids, spans = traced
    call = _named(_by_trace(spans, ids[0]), "chat fake")[0]
    assert call.attributes["field_relay.cost.cpu_s"] >= 0
    assert call.attributes["field_relay.model.duration_s"] == 0.01
    assert "field_relay.cost.amount" not in call.attributes


def test_full_capture_records_prompt_and_response(traced) -> None:
    _, ids, spans = traced
    call = _named(_by_trace(spans, ids[0]), "chat fake")[0]
    instructions = json.loads(call.attributes["gen_ai.system_instructions"])
    inputs = json.loads(call.attributes["gen_ai.input.messages"])
    outputs = json.loads(call.attributes["gen_ai.output.messages"])
    assert "triage log lines" in instructions[0]["content"]
    assert inputs[-1]["parts"][0]["content"] == f"{LINE} 1"
    assert outputs[0]["parts"][0]["content"] == VALID
    assert outputs[0]["finish_reason"] == "stop"


def test_resource_names_the_service(traced) -> None:
    _, _, spans = traced
    assert {s.resource["service.name"] for s in spans} == {"field-relay"}


def test_priced_model_records_money_cost(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(
        tmp_path, receiver, input_token_price=0.001, output_token_price=0.002
    )
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    call = _named(receiver.received(), "chat fake")[0]
    assert call.attributes["field_relay.cost.amount"] == pytest.approx(0.05)
    assert call.attributes["field_relay.cost.currency"] == "USD"


def test_remote_model_call_is_a_priced_client_span(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    record_id = str(uuid.uuid4())
    remote = RemoteModel("openai", "api.example.net", 0.5, 1.0, "EUR")
    with telemetry.model_call(
        record_id,
        "gpt-x",
        [{"role": "user", "content": "hi"}],
        SamplingParams(),
        None,
        remote=remote,
    ) as call:
        call.completion = Completion("{}", 4, 2, "stop", 0.2)
    telemetry.close()
    span = _named(receiver.received(), "chat gpt-x")[0]
    assert span.kind == PbSpan.SpanKind.SPAN_KIND_CLIENT
    assert span.parent_span_id == f"{root_span_id_for(record_id):016x}"
    assert span.attributes["gen_ai.provider.name"] == "openai"
    assert span.attributes["server.address"] == "api.example.net"
    assert span.attributes["field_relay.cost.amount"] == 4.0
    assert span.attributes["field_relay.cost.currency"] == "EUR"


def test_failed_model_call_span_is_an_error(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(
        tmp_path, telemetry, [InferenceError("llama.cpp failed: boom"), VALID]
    )
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    calls = sorted(_named(receiver.received(), "chat fake"), key=lambda s: s.start_ns)
    assert calls[0].status_code == StatusCode.ERROR.value
    assert calls[0].attributes["error.type"] == "InferenceError"
    assert calls[1].status_code == StatusCode.UNSET.value


# Capture and redaction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2 retry", "password=[REDACTED:credential] retry"),
        ("api_key: 'a b c'", "api_key: [REDACTED:credential]"),
        ("Authorization: Bearer abcdefghijklmnop", "Authorization: [REDACTED:bearer]"),
        ("mail bob.smith@example.com now", "mail [REDACTED:email] now"),
        ("peer 10.0.0.12 down", "peer [REDACTED:ipv4] down"),
        ("mac 00:1A:2b:3c:4D:5e", "mac [REDACTED:mac]"),
        ("call +1 415 555 0100", "call [REDACTED:phone]"),
        ("card 4111 1111 1111 1111", "card [REDACTED:card]"),
        ("key 0123456789abcdef0123456789abcdef", "key [REDACTED:hex_secret]"),
        ("id AKIAABCDEFGHIJKLMNOP", "id [REDACTED:aws_access_key]"),
    ],
)
def test_redactor_replaces(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872",
        "card 4111 1111 1111 1112",
        "RAS KERNEL INFO instruction cache parity error corrected",
    ],
)
def test_redactor_keeps_log_text(text: str) -> None:
    assert Redactor().redact(text) == text


def test_redactor_applies_extra_rules() -> None:
    redactor = Redactor({"node": r"R\d\d-M\d"})
    assert redactor.redact("at R02-M1-N0") == "at [REDACTED:node]-N0"


def test_invalid_extra_rule_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Config.model_validate({"telemetry": {"redact_patterns": {"bad": "("}}})


MESSAGES = [
    {"role": "system", "content": "Triage. Contact ops@example.com."},
    {"role": "user", "content": "login failed for password=hunter2"},
]


def test_capture_off_records_no_text() -> None:
    capture = ContentCapture(CaptureMode.OFF, Redactor())
    attributes = capture.message_attributes(MESSAGES, "{}", "stop", CaptureMode.OFF)
    assert attributes == {}


def test_capture_redacted_hides_secrets() -> None:
    capture = ContentCapture(CaptureMode.REDACTED, Redactor())
    attributes = capture.message_attributes(
        MESSAGES, "{}", "stop", CaptureMode.REDACTED
    )
    text = json.dumps(attributes)
    assert "hunter2" not in text
    assert "ops@example.com" not in text
    assert "[REDACTED:credential]" in text


def test_capture_full_keeps_text() -> None:
    capture = ContentCapture(CaptureMode.FULL, Redactor())
    attributes = capture.message_attributes(MESSAGES, "{}", "stop", CaptureMode.FULL)
    assert "hunter2" in attributes["gen_ai.input.messages"]
    assert "ops@example.com" in attributes["gen_ai.system_instructions"]


def test_drift_sample_raises_off_to_redacted() -> None:
    capture = ContentCapture(CaptureMode.OFF, Redactor())
    assert capture.effective_mode(drift_sample=True) is CaptureMode.REDACTED
    assert capture.effective_mode(drift_sample=False) is CaptureMode.OFF


def test_error_text_is_redacted_unless_full() -> None:
    message = "output failed validation: 'password=hunter2'"
    assert "hunter2" not in ContentCapture("off", Redactor()).error_text(message)
    assert "hunter2" in ContentCapture("full", Redactor()).error_text(message)


def test_capture_off_span_has_no_prompt(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver, capture="off", drift_sample=0.0)
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    call = _named(receiver.received(), "chat fake")[0]
    assert "gen_ai.input.messages" not in call.attributes
    assert "gen_ai.output.messages" not in call.attributes


# Drift sample ------------------------------------------------------------------


def test_drift_sample_fraction_is_close() -> None:
    ids = [str(uuid.UUID(int=n)) for n in range(20_000)]
    share = sum(is_drift_sample(i, 0.02) for i in ids) / len(ids)
    assert 0.015 < share < 0.025


def test_drift_sample_zero_tags_nothing() -> None:
    assert not is_drift_sample(str(uuid.uuid4()), 0.0)


def test_drift_sampled_record_is_tagged(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver, capture="off", drift_sample=1.0)
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    spans = receiver.received()
    assert all(s.attributes.get("field_relay.drift.sample") for s in spans)
    call = _named(spans, "chat fake")[0]
    assert call.attributes["field_relay.capture"] == "redacted"


def test_status_reports_drift_buckets(traced) -> None:
    data_dir, _, _ = traced
    bucket = collect_status(data_dir)["drift"]["buckets"][-1]
    assert bucket["model_calls"] == 3
    assert bucket["validity_rate"] == pytest.approx(2 / 3, abs=0.001)
    assert bucket["retry_rate"] == pytest.approx(1 / 3, abs=0.001)
    assert bucket["output_tokens"]["max"] == 20


def test_status_reports_model_numbers(traced) -> None:
    data_dir, _, _ = traced
    model = collect_status(data_dir)["model"]
    assert model["calls"] == 3
    assert model["tokens_per_s"] == pytest.approx(2000.0)


# Offline-first export ------------------------------------------------------------


def test_spans_made_during_outage_arrive_once(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(tmp_path, telemetry, [VALID] * 5)
    pipeline.run(2)
    _wait_for(lambda: len(receiver.received()) == 2 * SPANS_PER_RECORD)

    receiver.stop()
    during = pipeline.run(3, first_seq=3)
    _wait_for(lambda: collect_status(tmp_path)["telemetry"]["last_error"] is not None)
    spooled = collect_status(tmp_path)["telemetry"]["spooled"]
    receiver.start()
    _wait_for(lambda: len(receiver.received()) >= 5 * SPANS_PER_RECORD)
    pipeline.stop()
    telemetry.close()

    spans = receiver.received()
    counts = Counter(s.span_id for s in spans)
    assert spooled > 0
    assert len(spans) == 5 * SPANS_PER_RECORD
    assert max(counts.values()) == 1
    for record_id in during:
        assert len(_by_trace(spans, record_id)) == SPANS_PER_RECORD


def test_export_counters_after_outage(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    receiver.stop()
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    _wait_for(lambda: collect_status(tmp_path)["telemetry"]["last_error"] is not None)
    receiver.start()
    _wait_for(lambda: len(receiver.received()) == SPANS_PER_RECORD)
    pipeline.stop()
    telemetry.close()
    stats = collect_status(tmp_path)["telemetry"]
    assert stats["exported"] == SPANS_PER_RECORD
    assert stats["spooled"] == 0
    assert stats["dropped"] == 0
    assert f"127.0.0.1:{receiver.port}" in stats["last_error"]


def test_close_flushes_spans_to_collector(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    started = time.monotonic()
    telemetry.close(timeout=5)
    assert time.monotonic() - started < 5
    assert len(receiver.received()) == SPANS_PER_RECORD


def test_close_with_collector_down_is_bounded(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    receiver.stop()
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    started = time.monotonic()
    telemetry.close(timeout=2)
    assert time.monotonic() - started < 4
    assert collect_status(tmp_path)["telemetry"]["spooled"] == SPANS_PER_RECORD


def test_spool_sent_by_next_run(tmp_path: Path, receiver) -> None:
    receiver.stop()
    first = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(tmp_path, first, [VALID])
    pipeline.run(1)
    pipeline.stop()
    first.close(timeout=1)
    receiver.start()
    second = _telemetry(tmp_path, receiver)
    _wait_for(lambda: len(receiver.received()) == SPANS_PER_RECORD)
    second.close()


def test_rejected_batch_is_deleted_and_counted(tmp_path: Path, receiver) -> None:
    receiver.status = 400
    telemetry = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    stats = collect_status(tmp_path)["telemetry"]
    assert stats["rejected"] == SPANS_PER_RECORD
    assert stats["spooled"] == 0
    assert "HTTP 400" in stats["last_error"]


def test_headers_reach_collector(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver, headers={"X-Tenant": "field-7"})
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    assert receiver.requests
    assert all(headers.get("x-tenant") == "field-7" for _, headers in receiver.requests)


def test_environment_endpoint_is_used(tmp_path: Path, receiver) -> None:
    telemetry = Telemetry(
        tmp_path,
        TelemetryConfig(export_timeout_s=1.0),
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url},
        policy=FAST_POLICY,
    )
    telemetry.start()
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    assert len(receiver.received()) == SPANS_PER_RECORD
    assert {path for path, _ in receiver.requests} >= {"/v1/traces", "/v1/metrics"}


def test_no_endpoint_keeps_spans_local(tmp_path: Path) -> None:
    telemetry = _telemetry(tmp_path, None)
    pipeline = Pipeline(tmp_path, telemetry, [VALID])
    pipeline.run(1)
    pipeline.stop()
    telemetry.close()
    stats = collect_status(tmp_path)["telemetry"]
    assert stats["endpoint"] is None
    assert stats["spooled"] == 0
    assert stats["local_spans"] == SPANS_PER_RECORD


def test_metrics_reach_collector(tmp_path: Path, receiver) -> None:
    telemetry = _telemetry(tmp_path, receiver)
    pipeline = Pipeline(tmp_path, telemetry, [VALID, "not json", VALID])
    pipeline.run(2)
    pipeline.stop()
    telemetry.close()
    names = set(receiver.metric_names)
    for name in (
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "field_relay.workflow.retries",
        "field_relay.records",
        "field_relay.outbox.depth",
        "field_relay.model.tokens_per_second",
    ):
        assert name in names, name


# Spool -----------------------------------------------------------------------


def _row(span_id: str, drift: bool = False) -> SpanRow:
    return SpanRow("a" * 32, span_id, None, "step", 0, 1, "UNSET", {}, drift)


def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path / "telemetry.db", max_bytes=250_000)
    for _ in range(5):
        spool.add(TRACES, b"x" * 100_000, 10)
    stats = spool.stats()
    batches = spool.oldest(10)
    spool.close()
    assert stats["traces_dropped"] == 30
    assert stats["traces_in_spool"] == 20
    assert [b.id for b in batches] == [4, 5]


def test_spool_counts_metric_drops_apart(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path / "telemetry.db", max_bytes=150_000)
    spool.add(METRICS, b"m" * 100_000, 1)
    spool.add(TRACES, b"t" * 100_000, 7)
    stats = spool.stats()
    spool.close()
    assert stats["metrics_dropped"] == 1
    assert stats["traces_dropped"] == 0


def test_local_spans_pruned_by_age(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path / "telemetry.db", retention_s=100)
    spool.add(TRACES, None, 2, [_row("1"), _row("2", drift=True)], now=1000.0)
    spool.add(TRACES, None, 1, [_row("3")], now=1200.0)
    kept = [s.span_id for s in spool.trace("a" * 32)]
    spool.close()
    assert kept == ["2", "3"]


def test_local_spans_bounded_in_count(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path / "telemetry.db", max_spans=2)
    spool.add(TRACES, None, 3, [_row("1"), _row("2"), _row("3")], now=1.0)
    spool.add(TRACES, None, 1, [_row("4")], now=2.0)
    kept = {s.span_id for s in spool.trace("a" * 32)}
    spool.close()
    assert len(kept) == 2
    assert "4" in kept


# Codec -----------------------------------------------------------------------


def test_span_payload_round_trip() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "t"}), shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t", "1")
    with tracer.start_as_current_span("root"):
        with tracer.start_as_current_span(
            "chat m",
            kind=SpanKind.CLIENT,
            attributes={"i": 1, "f": 0.5, "s": "x", "b": True, "a": ("stop",)},
        ) as span:
            span.add_event("retry", {"n": 2})
            span.set_status(Status(StatusCode.ERROR, "failed"))
    payload = spans_to_bytes(list(exporter.get_finished_spans()))
    assert spans_to_bytes(spans_from_bytes(payload)) == payload


def test_metric_payload_round_trip() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = provider.get_meter("t")
    meter.create_histogram("h", unit="s").record(0.25, {"k": "v"})
    meter.create_counter("c").add(3)
    meter.create_up_down_counter("u").add(-2)
    payload = metrics_to_bytes(reader.get_metrics_data())
    assert metrics_to_bytes(metrics_from_bytes(payload)) == payload


# CLI -------------------------------------------------------------------------


def test_trace_command_prints_tree(traced) -> None:
    data_dir, ids, _ = traced
    result = CliRunner().invoke(
        main, ["trace", "--data-dir", str(data_dir), ids[0][:8]]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "record log_event" in lines[2]
    assert any("├─ infer" in line for line in lines)
    assert any("│  └─ chat fake" in line for line in lines)
    assert any("└─ enqueue" in line for line in lines)


def test_trace_command_json_lists_spans(traced) -> None:
    data_dir, ids, _ = traced
    result = CliRunner().invoke(
        main, ["trace", "--data-dir", str(data_dir), "--json", ids[0]]
    )
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == SPANS_PER_RECORD


def test_trace_command_unknown_record(tmp_path: Path) -> None:
    Store(tmp_path / "appliance.db").close()
    result = CliRunner().invoke(main, ["trace", "--data-dir", str(tmp_path), "ffff"])
    assert result.exit_code == 1
    assert "no record with an id starting 'ffff'" in result.output


def test_status_json_has_telemetry_object(traced) -> None:
    data_dir, _, _ = traced
    result = CliRunner().invoke(main, ["status", "--json", "--data-dir", str(data_dir)])
    telemetry = json.loads(result.output)["telemetry"]
    assert telemetry["exported"] == 2 * SPANS_PER_RECORD + 3
    assert telemetry["dropped"] == 0
    assert telemetry["spooled"] == 0
    assert telemetry["last_error"] is None


# The daemon ------------------------------------------------------------------


@pytest.mark.model
def test_demo_run_exports_model_spans(tmp_path: Path, receiver) -> None:
    env = dict(os.environ)
    env.pop("FIELD_RELAY_DATA_DIR", None)
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
    result = subprocess.run(
        [APPLIANCE, "run", "--demo", "--max-records", "2", "--demo-rate", "20"]
        + ["--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    spans = receiver.received()
    calls = [s for s in spans if "gen_ai.usage.output_tokens" in s.attributes]
    roots = [s for s in spans if s.parent_span_id == ""]
    assert len(calls) >= 2
    assert len({s.trace_id for s in calls}) == 2
    assert {s.trace_id for s in roots} == {s.trace_id for s in calls}
