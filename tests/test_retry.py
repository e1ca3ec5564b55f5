"""Retry policy arithmetic and the manual retry of dead records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.errors import InvalidOutputError, ModelLoadError
from appliance.inference import SamplingParams
from appliance.retry import (
    AttemptTimeoutError,
    ManualRetryError,
    RetryPolicy,
    requeue_all_dead,
    requeue_dead,
)
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Workflow
from tests.conftest import FakeEngine
from tests.test_workflow import VALID


def test_delay_grows_by_coefficient() -> None:
    policy = RetryPolicy(
        initial_interval=1.0, backoff_coefficient=3.0, maximum_interval=100.0
    )
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(
        initial_interval=1.0, backoff_coefficient=2.0, maximum_interval=5.0
    )
    assert policy.delay(10) == 5.0


def test_jittered_delay_stays_within_delay() -> None:
    policy = RetryPolicy(initial_interval=2.0)
    assert all(0 <= policy.jittered_delay(3) <= policy.delay(3) for _ in range(200))


def test_attempt_limit_stops_retries() -> None:
    policy = RetryPolicy(maximum_attempts=3)
    error = InvalidOutputError("bad")
    assert [policy.allows_retry(n, error) for n in (1, 2, 3)] == [True, True, False]


def test_non_retryable_error_stops_at_once() -> None:
    policy = RetryPolicy(maximum_attempts=0, non_retryable_errors=(ModelLoadError,))
    assert not policy.allows_retry(1, ModelLoadError("x", path=None))  # type: ignore[arg-type]


def test_zero_attempts_means_unlimited() -> None:
    policy = RetryPolicy(maximum_attempts=0)
    assert policy.allows_retry(1000, InvalidOutputError("bad"))


def test_attempt_timeout_defaults_to_none() -> None:
    assert RetryPolicy().attempt_timeout is None


def test_timeout_error_keeps_its_values() -> None:
    error = AttemptTimeoutError("infer", 12.5, 10.0, "rec-1")
    assert (error.step, error.elapsed, error.timeout) == ("infer", 12.5, 10.0)
    assert error.record_id == "rec-1"
    assert isinstance(error, TimeoutError)
    assert "12.5 s" in str(error)


# Manual retry of dead records --------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "appliance.db")
    yield opened
    opened.close()


def _workflow(store: Store, answers: list) -> Workflow:
    no_wait = RetryPolicy(initial_interval=0.0, maximum_interval=0.0)
    return Workflow(
        store.path,
        FakeEngine(answers),
        "",
        SamplingParams(),
        policies={"infer": no_wait, "validate": no_wait},
    )


def _insert(store: Store, raw: str, seq: int, kind: RecordKind) -> str:
    with store.transaction() as conn:
        record_id = store.insert_record(conn, "test", seq, raw, raw.encode(), kind)
    assert record_id is not None
    return record_id


def _dead_after_validation(store: Store, seq: int = 1) -> str:
    """Insert a log_event record and fail its validation until it is dead."""
    flow = _workflow(store, ["not json"] * 3)
    record_id = _insert(store, "RAS KERNEL FATAL", seq, RecordKind.LOG_EVENT)
    for _ in range(3):
        flow.infer(store, record_id)
        flow.validate(store, record_id)
    assert store.get_record(record_id)["state"] == RecordState.DEAD
    return record_id


def _dead_json(store: Store, seq: int) -> str:
    flow = Workflow(store.path, None, "", SamplingParams())
    record_id = _insert(store, "[1, 2]", seq, RecordKind.JSON)
    flow.decode_json(store, record_id)
    assert store.get_record(record_id)["state"] == RecordState.DEAD
    return record_id


def test_requeue_dead_resets_attempts(store: Store) -> None:
    record_id = _dead_after_validation(store)

    full_id, state = requeue_dead(store, record_id)

    row = store.get_record(record_id)
    assert full_id == record_id
    assert state == RecordState.RECEIVED
    assert row["state"] == RecordState.RECEIVED
    assert row["attempts"] == 0
    assert row["error"] is None
    assert row["next_attempt_at"] == 0.0


def test_requeue_dead_records_an_event(store: Store) -> None:
    record_id = _dead_after_validation(store)

    requeue_dead(store, record_id)

    event = store.events_for(record_id)[-1]
    detail = json.loads(event["detail"])
    assert (event["step"], event["from_state"], event["to_state"]) == (
        "retry",
        "dead",
        "received",
    )
    assert detail["manual"] is True
    assert detail["previous_attempts"] == 3
    assert "not valid JSON" in detail["previous_error"]


def test_requeued_record_runs_again(store: Store) -> None:
    record_id = _dead_after_validation(store)
    requeue_dead(store, record_id)
    flow = _workflow(store, [VALID])

    flow.infer(store, record_id)
    flow.validate(store, record_id)

    row = store.get_record(record_id)
    assert row["state"] == RecordState.VALIDATED
    assert row["attempts"] == 1


def test_requeue_accepts_id_prefix(store: Store) -> None:
    record_id = _dead_after_validation(store)

    full_id, _ = requeue_dead(store, record_id[:8])

    assert full_id == record_id


def test_requeue_rejects_record_not_dead(store: Store) -> None:
    record_id = _insert(store, '{"a": 1}', 1, RecordKind.JSON)

    with pytest.raises(ManualRetryError, match="is received, not dead") as caught:
        requeue_dead(store, record_id)

    assert caught.value.record_id == record_id
    assert caught.value.state == "received"
    assert store.events_for(record_id)[-1]["step"] == "receive"


def test_requeue_rejects_unknown_id(store: Store) -> None:
    with pytest.raises(ManualRetryError, match="no record with id 'nope'") as caught:
        requeue_dead(store, "nope")
    assert caught.value.state is None


def test_requeue_rejects_ambiguous_prefix(store: Store) -> None:
    _dead_json(store, 1)
    _dead_json(store, 2)

    with pytest.raises(ManualRetryError, match="matches 2 records"):
        requeue_dead(store, "")


def test_requeue_after_upload_rejection_is_queued(store: Store) -> None:
    record_id = _insert(store, '{"a": 1}', 1, RecordKind.JSON)
    with store.transaction() as conn:
        store.move(
            conn,
            record_id,
            RecordState.RECEIVED,
            RecordState.DEAD,
            batch_id="batch-1",
            error="rejected by the sink: bad field",
        )
        store.add_event(
            conn, record_id, "upload", RecordState.QUEUED, RecordState.DEAD, 1, 0.0
        )

    _, state = requeue_dead(store, record_id)

    row = store.get_record(record_id)
    assert state == RecordState.QUEUED
    assert row["batch_id"] is None


def test_requeue_all_dead_counts_records(store: Store) -> None:
    dead = [_dead_json(store, seq) for seq in (1, 2, 3)]
    alive = _insert(store, '{"a": 1}', 4, RecordKind.JSON)

    assert requeue_all_dead(store) == 3

    assert {store.get_record(r)["state"] for r in dead} == {"received"}
    assert store.get_record(alive)["state"] == RecordState.RECEIVED
    assert store.events_for(alive)[-1]["step"] == "receive"


def test_requeue_all_dead_with_none_dead(store: Store) -> None:
    _insert(store, '{"a": 1}', 1, RecordKind.JSON)
    assert requeue_all_dead(store) == 0


def test_requeue_all_dead_spans_batches(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.retry.REQUEUE_BATCH_SIZE", 2)
    for seq in range(1, 6):
        _dead_json(store, seq)

    assert requeue_all_dead(store) == 5
    assert store.state_counts()["dead"] == 0


# The `appliance retry` command ------------------------------------------------


def _run_retry(data_dir: Path, *args: str):
    return CliRunner().invoke(main, ["retry", "--data-dir", str(data_dir), *args])


def test_cli_retry_puts_record_back(store: Store) -> None:
    record_id = _dead_json(store, 1)

    result = _run_retry(store.path.parent, record_id[:8])

    assert result.exit_code == 0, result.output
    assert f"record {record_id} put back in state received" in result.output
    assert store.get_record(record_id)["state"] == RecordState.RECEIVED


def test_cli_retry_all_dead_prints_count(store: Store) -> None:
    _dead_json(store, 1)
    _dead_json(store, 2)

    result = _run_retry(store.path.parent, "--all-dead")

    assert result.exit_code == 0, result.output
    assert "2 dead records put back" in result.output


def test_cli_retry_rejects_live_record(store: Store) -> None:
    record_id = _insert(store, '{"a": 1}', 1, RecordKind.JSON)

    result = _run_retry(store.path.parent, record_id)

    assert result.exit_code == 1
    assert f"error: record {record_id} is received, not dead" in result.output


def test_cli_retry_needs_id_or_all_dead(store: Store) -> None:
    assert _run_retry(store.path.parent).exit_code == 2
    assert _run_retry(store.path.parent, "abc", "--all-dead").exit_code == 2


def test_cli_retry_without_database(tmp_path: Path) -> None:
    result = _run_retry(tmp_path / "empty", "--all-dead")

    assert result.exit_code == 1
    assert "no database" in result.output
    assert not (tmp_path / "empty").exists()
