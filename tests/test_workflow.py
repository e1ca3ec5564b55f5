"""The durable workflow, stepped one activity at a time with a fake model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.grammar import schema_to_gbnf
from appliance.inference import SamplingParams
from appliance.log_event import log_event_schema
from appliance.retry import RetryPolicy
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Workflow, parse_log_event
from tests.conftest import FakeEngine

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


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "appliance.db")
    yield opened
    opened.close()


def _workflow(store: Store, answers: list) -> tuple[Workflow, FakeEngine]:
    engine = FakeEngine(answers)
    policy = RetryPolicy(initial_interval=0.0, maximum_interval=0.0, maximum_attempts=3)
    flow = Workflow(
        store.path, engine, schema_to_gbnf(log_event_schema()), SamplingParams(), policy
    )
    return flow, engine


def _receive(
    store: Store,
    raw: str = "RAS KERNEL FATAL data TLB error",
    seq: int = 1,
    kind: RecordKind = RecordKind.LOG_EVENT,
) -> str:
    with store.transaction() as conn:
        record_id = store.insert_record(conn, "test", seq, raw, raw.encode(), kind)
    assert record_id is not None
    return record_id


def _state(store: Store, record_id: str) -> str:
    row = store.get_record(record_id)
    assert row is not None
    return row["state"]


def test_valid_output_reaches_queued(store: Store) -> None:
    flow, _ = _workflow(store, [VALID])
    record_id = _receive(store)
    flow.infer(store, record_id)
    flow.validate(store, record_id)
    flow.enqueue(store, record_id)
    assert _state(store, record_id) == RecordState.QUEUED


def test_queued_record_holds_validated_data(store: Store) -> None:
    flow, _ = _workflow(store, [VALID])
    record_id = _receive(store)
    flow.infer(store, record_id)
    flow.validate(store, record_id)
    row = store.get_record(record_id)
    assert json.loads(row["data"]) == json.loads(VALID)


def test_invalid_output_is_retried_with_new_sampling(store: Store) -> None:
    flow, engine = _workflow(store, ['{"severity":"bad"}', VALID])
    record_id = _receive(store)
    flow.infer(store, record_id)
    flow.validate(store, record_id)
    assert _state(store, record_id) == RecordState.RECEIVED
    flow.infer(store, record_id)
    flow.validate(store, record_id)
    assert _state(store, record_id) == RecordState.VALIDATED
    assert engine.calls[1].temperature > engine.calls[0].temperature


def test_output_invalid_every_time_goes_dead_with_reason(store: Store) -> None:
    flow, _ = _workflow(store, ["not json"] * 3)
    record_id = _receive(store)
    for _ in range(3):
        flow.infer(store, record_id)
        flow.validate(store, record_id)
    row = store.get_record(record_id)
    assert row["state"] == RecordState.DEAD
    assert "not valid JSON" in row["error"]
    assert row["data"] is None


def test_truncated_output_is_not_stored_as_valid(store: Store) -> None:
    flow, _ = _workflow(store, [VALID + "…"] * 3)
    record_id = _receive(store)
    for _ in range(3):
        flow.infer(store, record_id)
        flow.validate(store, record_id)
    row = store.get_record(record_id)
    assert row["state"] == RecordState.DEAD
    assert "truncated" in row["error"]


def test_history_keeps_every_attempt(store: Store) -> None:
    flow, _ = _workflow(store, ["{}", VALID])
    record_id = _receive(store)
    for _ in range(2):
        flow.infer(store, record_id)
        flow.validate(store, record_id)
    steps = [(e["step"], e["to_state"]) for e in store.events_for(record_id)]
    assert steps == [
        ("receive", "received"),
        ("infer", "inferred"),
        ("validate", "received"),
        ("infer", "inferred"),
        ("validate", "validated"),
    ]


def test_activity_run_twice_moves_record_once(store: Store) -> None:
    flow, engine = _workflow(store, [VALID, VALID])
    record_id = _receive(store)
    assert flow.infer(store, record_id) is True
    assert flow.infer(store, record_id) is False
    assert len(engine.calls) == 1


def test_json_record_needs_no_model(store: Store) -> None:
    flow = Workflow(store.path, None, "", SamplingParams())
    record_id = _receive(
        store, '{"sensor": "pump-1", "temp_c": 21}', kind=RecordKind.JSON
    )
    flow.decode_json(store, record_id)
    flow.enqueue(store, record_id)
    assert _state(store, record_id) == RecordState.QUEUED


def test_json_record_that_is_not_an_object_goes_dead(store: Store) -> None:
    flow = Workflow(store.path, None, "", SamplingParams())
    record_id = _receive(store, "[1, 2]", kind=RecordKind.JSON)
    flow.decode_json(store, record_id)
    assert _state(store, record_id) == RecordState.DEAD


def test_same_link_and_seq_is_inserted_once(store: Store) -> None:
    _receive(store, seq=7)
    with store.transaction() as conn:
        again = store.insert_record(conn, "test", 7, "x", b"x")
    assert again is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"severity":"info"}', "validation"),
        ("{", "not valid JSON"),
        (VALID.replace("Data TLB error.", "line\\nbreak"), "control character"),
        (VALID[:-1] + ',"extra":1}', "validation"),
    ],
)
def test_parse_log_event_rejects(text: str, message: str) -> None:
    from appliance.errors import InvalidOutputError

    with pytest.raises(InvalidOutputError, match=message):
        parse_log_event(text)
