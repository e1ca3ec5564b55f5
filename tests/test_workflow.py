"""The durable workflow, stepped one activity at a time with a fake model.

Time comes from a ``FakeClock`` that only moves when a test advances it, so
retry schedules, backoff and timeouts are checked without sleeping.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from appliance.errors import InferenceError, InvalidOutputError, ModelLoadError
from appliance.grammar import schema_to_gbnf
from appliance.inference import Completion, SamplingParams
from appliance.log_event import log_event_schema
from appliance.replay import commit_lines, replay_file
from appliance.retry import RetryPolicy
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Workflow, inference_jobs, parse_log_event, step_jobs
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
START = 1_000_000.0
"""Epoch seconds at which every fake clock starts."""


class FakeClock:
    """Wall-clock and monotonic time that moves only when a test advances it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SlowEngine(FakeEngine):
    """A fake model whose every call takes ``seconds`` on the fake clock."""

    def __init__(
        self, answers: list[str | Exception], clock: FakeClock, seconds: float
    ) -> None:
        super().__init__(answers)
        self.clock = clock
        self.seconds = seconds

    def complete(self, messages, grammar, params: SamplingParams) -> Completion:
        self.clock.advance(self.seconds)
        return super().complete(messages, grammar, params)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    opened = Store(tmp_path / "appliance.db", clock=clock)
    yield opened
    opened.close()


def _workflow(
    store: Store,
    answers: list,
    policies: dict[str, RetryPolicy] | None = None,
    engine: FakeEngine | None = None,
) -> tuple[Workflow, FakeEngine]:
    engine = engine or FakeEngine(answers)
    no_wait = RetryPolicy(
        initial_interval=0.0, maximum_interval=0.0, maximum_attempts=3
    )
    flow = Workflow(
        store.path,
        engine,
        schema_to_gbnf(log_event_schema()),
        SamplingParams(),
        policies={"infer": no_wait, "validate": no_wait, **(policies or {})},
        clock=store.clock,
        timer=store.clock,
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


def _due_in(store: Store, record_id: str) -> float:
    """Return the seconds until the record's next attempt on the store's clock."""
    row = store.get_record(record_id)
    assert row is not None
    return row["next_attempt_at"] - store.clock()


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
    flow = Workflow(store.path, None, "", SamplingParams(), clock=store.clock)
    record_id = _receive(
        store, '{"sensor": "pump-1", "temp_c": 21}', kind=RecordKind.JSON
    )
    flow.decode_json(store, record_id)
    flow.enqueue(store, record_id)
    assert _state(store, record_id) == RecordState.QUEUED


def test_json_record_that_is_not_an_object_goes_dead(store: Store) -> None:
    flow = Workflow(store.path, None, "", SamplingParams(), clock=store.clock)
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
    with pytest.raises(InvalidOutputError, match=message):
        parse_log_event(text)


# Retry schedule on the fake clock ---------------------------------------------


def _failing_infer_workflow(
    store: Store, policy: RetryPolicy, failures: int
) -> Workflow:
    errors: list = [InferenceError("llama.cpp failed: out of memory")] * failures
    flow, _ = _workflow(store, [*errors, VALID], {"infer": policy})
    return flow


def test_failed_infer_waits_initial_interval(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=5.0, maximum_interval=60.0)
    flow = _failing_infer_workflow(store, policy, failures=1)
    record_id = _receive(store)

    assert flow.infer(store, record_id) is True

    assert _state(store, record_id) == RecordState.RECEIVED
    assert _due_in(store, record_id) == 5.0


def test_retry_does_not_run_before_due(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=5.0, maximum_interval=60.0)
    flow = _failing_infer_workflow(store, policy, failures=1)
    record_id = _receive(store)
    flow.infer(store, record_id)
    select = inference_jobs(flow)

    clock.advance(4.999)
    assert select(store) == []
    assert flow.infer(store, record_id) is False
    assert store.get_record(record_id)["attempts"] == 1

    clock.advance(0.001)
    assert [job_id for job_id, _ in select(store)] == [record_id]
    assert flow.infer(store, record_id) is True
    assert _state(store, record_id) == RecordState.INFERRED


def test_backoff_grows_by_coefficient(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(
        initial_interval=2.0,
        backoff_coefficient=3.0,
        maximum_interval=1000.0,
        maximum_attempts=5,
    )
    flow = _failing_infer_workflow(store, policy, failures=4)
    record_id = _receive(store)

    delays = []
    for _ in range(4):
        flow.infer(store, record_id)
        delays.append(_due_in(store, record_id))
        clock.advance(delays[-1])

    assert delays == [2.0, 6.0, 18.0, 54.0]


def test_backoff_stops_at_maximum_interval(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(
        initial_interval=10.0,
        backoff_coefficient=4.0,
        maximum_interval=100.0,
        maximum_attempts=0,
    )
    flow = _failing_infer_workflow(store, policy, failures=5)
    record_id = _receive(store)

    delays = []
    for _ in range(5):
        flow.infer(store, record_id)
        delays.append(_due_in(store, record_id))
        clock.advance(delays[-1])

    assert delays == [10.0, 40.0, 100.0, 100.0, 100.0]


def test_last_allowed_attempt_goes_dead(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=1.0, maximum_attempts=2)
    flow = _failing_infer_workflow(store, policy, failures=2)
    record_id = _receive(store)

    flow.infer(store, record_id)
    clock.advance(1.0)
    flow.infer(store, record_id)

    row = store.get_record(record_id)
    assert row["state"] == RecordState.DEAD
    assert row["attempts"] == 2
    assert row["error"] == "infer: llama.cpp failed: out of memory"


def test_non_retryable_error_goes_dead_at_once(store: Store) -> None:
    policy = RetryPolicy(maximum_attempts=5, non_retryable_errors=(InferenceError,))
    flow = _failing_infer_workflow(store, policy, failures=1)
    record_id = _receive(store)

    flow.infer(store, record_id)

    row = store.get_record(record_id)
    assert row["state"] == RecordState.DEAD
    assert row["attempts"] == 1


def test_non_retryable_list_ignores_other_errors(store: Store) -> None:
    policy = RetryPolicy(maximum_attempts=5, non_retryable_errors=(ModelLoadError,))
    flow = _failing_infer_workflow(store, policy, failures=1)
    record_id = _receive(store)

    flow.infer(store, record_id)

    assert _state(store, record_id) == RecordState.RECEIVED


def test_dead_history_keeps_every_error(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=1.0, maximum_attempts=3)
    flow = _failing_infer_workflow(store, policy, failures=3)
    record_id = _receive(store)
    for _ in range(3):
        flow.infer(store, record_id)
        clock.advance(10.0)

    failures = [e for e in store.events_for(record_id) if e["error"]]

    assert [e["attempt"] for e in failures] == [1, 2, 3]
    assert [e["to_state"] for e in failures] == ["received", "received", "dead"]
    assert all("out of memory" in e["error"] for e in failures)


def test_retry_schedule_survives_reopen(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "appliance.db"
    store = Store(db, clock=clock)
    policy = RetryPolicy(initial_interval=30.0)
    flow = _failing_infer_workflow(store, policy, failures=1)
    record_id = _receive(store)
    flow.infer(store, record_id)
    store.close()

    reopened = Store(db, clock=clock)
    try:
        flow, _ = _workflow(reopened, [VALID], {"infer": policy})
        select = inference_jobs(flow)
        clock.advance(29.0)
        assert select(reopened) == []
        clock.advance(1.0)
        assert [job_id for job_id, _ in select(reopened)] == [record_id]
    finally:
        reopened.close()


def test_unknown_policy_name_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="upload"):
        Workflow(store.path, None, "", SamplingParams(), policies={"upload": None})


# Attempt timeouts --------------------------------------------------------------


def test_slow_infer_attempt_times_out(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=1.0, attempt_timeout=10.0)
    engine = SlowEngine([VALID], clock, seconds=12.0)
    flow, _ = _workflow(store, [], {"infer": policy}, engine)
    record_id = _receive(store)

    assert flow.infer(store, record_id) is True

    row = store.get_record(record_id)
    assert row["state"] == RecordState.RECEIVED
    assert row["attempts"] == 1
    assert "timed out after 12.0 s" in row["error"]
    assert row["output"] is None


def test_timed_out_output_kept_in_history(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=1.0, attempt_timeout=10.0)
    engine = SlowEngine([VALID], clock, seconds=12.0)
    flow, _ = _workflow(store, [], {"infer": policy}, engine)
    record_id = _receive(store)

    flow.infer(store, record_id)

    event = store.events_for(record_id)[-1]
    assert event["step"] == "infer"
    assert event["duration"] == 12.0
    assert json.loads(event["detail"])["output"] == VALID


def test_attempt_within_timeout_succeeds(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(attempt_timeout=10.0)
    engine = SlowEngine([VALID], clock, seconds=10.0)
    flow, _ = _workflow(store, [], {"infer": policy}, engine)
    record_id = _receive(store)

    flow.infer(store, record_id)

    assert _state(store, record_id) == RecordState.INFERRED


def test_every_attempt_timing_out_goes_dead(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=1.0, maximum_attempts=2, attempt_timeout=5.0)
    engine = SlowEngine([VALID, VALID], clock, seconds=6.0)
    flow, _ = _workflow(store, [], {"infer": policy}, engine)
    record_id = _receive(store)

    flow.infer(store, record_id)
    clock.advance(1.0)
    flow.infer(store, record_id)

    row = store.get_record(record_id)
    assert row["state"] == RecordState.DEAD
    assert row["error"].startswith("infer: infer attempt timed out")


def test_timeout_can_be_non_retryable(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(
        maximum_attempts=3, attempt_timeout=5.0, non_retryable_errors=(TimeoutError,)
    )
    engine = SlowEngine([VALID], clock, seconds=6.0)
    flow, _ = _workflow(store, [], {"infer": policy}, engine)
    record_id = _receive(store)

    flow.infer(store, record_id)

    assert _state(store, record_id) == RecordState.DEAD


class SlowClockDuringParse(FakeClock):
    """A clock that moves ``step`` seconds forward each time it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_slow_validation_times_out(tmp_path: Path) -> None:
    clock = SlowClockDuringParse()
    store = Store(tmp_path / "appliance.db", clock=clock)
    try:
        policy = RetryPolicy(initial_interval=0.0, attempt_timeout=1.0)
        flow, _ = _workflow(store, [VALID], {"validate": policy})
        record_id = _receive(store)
        flow.infer(store, record_id)
        clock.step = 2.0

        flow.validate(store, record_id)

        row = store.get_record(record_id)
        assert row["state"] == RecordState.RECEIVED
        assert "validate attempt timed out" in row["error"]
        assert row["data"] is None
    finally:
        store.close()


# Idempotent steps -------------------------------------------------------------


def test_validate_run_twice_moves_record_once(store: Store) -> None:
    flow, _ = _workflow(store, [VALID])
    record_id = _receive(store)
    flow.infer(store, record_id)

    assert flow.validate(store, record_id) is True
    assert flow.validate(store, record_id) is False
    steps = [e["step"] for e in store.events_for(record_id)]
    assert steps.count("validate") == 1


def test_enqueue_run_twice_moves_record_once(store: Store) -> None:
    flow = Workflow(store.path, None, "", SamplingParams(), clock=store.clock)
    record_id = _receive(store, '{"a": 1}', kind=RecordKind.JSON)
    flow.decode_json(store, record_id)

    assert flow.enqueue(store, record_id) is True
    assert flow.enqueue(store, record_id) is False


def test_invalid_output_kept_in_history(store: Store) -> None:
    flow, _ = _workflow(store, ["not json", VALID])
    record_id = _receive(store)
    flow.infer(store, record_id)
    flow.validate(store, record_id)

    event = store.events_for(record_id)[-1]
    assert event["step"] == "validate"
    assert json.loads(event["detail"]) == {"output": "not json"}


def test_step_jobs_skip_records_not_due(store: Store, clock: FakeClock) -> None:
    policy = RetryPolicy(initial_interval=60.0, maximum_attempts=3)
    flow = Workflow(
        store.path,
        None,
        "",
        SamplingParams(),
        policies={"decode": policy},
        clock=clock,
        timer=clock,
    )
    record_id = _receive(store, '{"a": 1}', kind=RecordKind.JSON)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE records SET next_attempt_at = ? WHERE id = ?",
            (clock() + 60.0, record_id),
        )

    assert step_jobs(flow)(store) == []
    clock.advance(60.0)
    assert [job_id for job_id, _ in step_jobs(flow)(store)] == [record_id]


# Replay -----------------------------------------------------------------------


def _replay(data_dir: Path, source: Path, stop: threading.Event | None = None):
    data_dir.mkdir(exist_ok=True)
    return replay_file(
        data_dir, source, RecordKind.JSON, None, None, stop or threading.Event()
    )


def _replayed(data_dir: Path) -> list[tuple[str, int, str]]:
    store = Store(data_dir / "appliance.db", readonly=True)
    try:
        return [(r["link"], r["seq"], r["raw"]) for r in store.list_records()]
    finally:
        store.close()


def test_replay_records_source_and_line(tmp_path: Path) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}')
    data_dir = tmp_path / "data"

    _replay(data_dir, source)

    link = f"replay:{source.resolve()}"
    assert _replayed(data_dir) == [
        (link, 1, '{"a": 1}'),
        (link, 3, '{"a": 2}'),
        (link, 4, '{"a": 3}'),
    ]


def test_replay_twice_adds_no_record(tmp_path: Path) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_text('{"a": 1}\n{"a": 2}\n')
    data_dir = tmp_path / "data"
    _replay(data_dir, source)
    first = _replayed(data_dir)

    counts = _replay(data_dir, source)

    assert _replayed(data_dir) == first
    assert counts["queued"] == 2


def test_replay_resumes_after_crash(tmp_path: Path) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_text("".join(f'{{"n": {n}}}\n' for n in range(10)))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # What a run killed part-way leaves: every line committed, two decoded,
    # one of those enqueued.
    store = Store(data_dir / "appliance.db")
    try:
        commit_lines(store, source, RecordKind.JSON)
        flow = Workflow(store.path, None, "", SamplingParams())
        first, second = [row["id"] for row in store.list_records(limit=2)]
        flow.decode_json(store, first)
        flow.decode_json(store, second)
        flow.enqueue(store, first)
    finally:
        store.close()

    counts = _replay(data_dir, source)

    assert len(_replayed(data_dir)) == 10
    assert counts["queued"] == 10
    store = Store(data_dir / "appliance.db", readonly=True)
    try:
        steps = store.query(
            "SELECT step, COUNT(*) AS n FROM events GROUP BY step ORDER BY step"
        )
    finally:
        store.close()
    assert {row["step"]: row["n"] for row in steps} == {
        "decode": 10,
        "enqueue": 10,
        "receive": 10,
    }


def test_replay_of_grown_file_adds_new_lines(tmp_path: Path) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_text('{"a": 1}\n')
    data_dir = tmp_path / "data"
    _replay(data_dir, source)
    with source.open("a") as handle:
        handle.write('{"a": 2}\n')

    _replay(data_dir, source)

    assert [seq for _, seq, _ in _replayed(data_dir)] == [1, 2]
