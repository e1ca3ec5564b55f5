"""Review by a larger model: selection, verdicts, limits, throttling, budget.

The reviewer is ``tests.openai_stub.OpenAIStub``, a real HTTP server on
loopback. Tests that step the activity use a fake clock shared by the store,
the limiter and the activity, so waits take no real time.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.config import ReviewConfig
from appliance.errors import SetupError
from appliance.inference import SamplingParams
from appliance.rate_limit import SlidingWindowLimiter
from appliance.review import (
    ReviewState,
    compare_records,
    doubt_reasons,
    ensure_schema,
    in_drift_sample,
    next_due,
    request_all_dead,
    request_review,
    save_settings,
    select_new,
    word_overlap,
)
from appliance.review_activity import (
    REVIEW_POLICY,
    SETUP_PAUSE,
    Outcome,
    ReviewActivity,
)
from appliance.review_status import review_summary
from appliance.review_worker import ReviewWorker, drain, make_activity
from appliance.reviewer_client import ReviewerClient, read_api_key
from appliance.states import RecordKind, RecordState
from appliance.status import collect_status, format_status
from appliance.store import DB_NAME, Store
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from tests.conftest import FakeEngine
from tests.openai_stub import DEFAULT_RECORD, OpenAIStub, Reply

FATAL_LINE = (
    "1118536327 2005.06.11 R30-M0-N9-C:J16-U01 2005-06-11-17.18.47.314932 "
    "R30-M0-N9-C:J16-U01 RAS KERNEL FATAL data TLB error interrupt"
)
DAY = 86400.0
START = 1_750_000_000.0
"""A fixed start time (2025-06-15 15:06:40 UTC) for the fake clock."""


class FakeClock:
    """Wall and monotonic time in one; ``sleep`` advances it."""

    def __init__(self, start: float = START) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def record_json(**changes: object) -> str:
    return json.dumps({**DEFAULT_RECORD, **changes})


def review_config(url: str, **changes: object) -> ReviewConfig:
    values: dict[str, object] = {
        "enabled": True,
        "base_url": url,
        "model": "reviewer-large",
        "sample_fraction": 1.0,
        "timeout": 5.0,
    }
    values.update(changes)
    return ReviewConfig(**values)


def open_store(data_dir: Path, clock: FakeClock) -> Store:
    data_dir.mkdir(parents=True, exist_ok=True)
    return Store(data_dir / DB_NAME, clock=clock)


def add_records(
    store: Store,
    workflow: Workflow,
    lines: list[str],
    kind: RecordKind = RecordKind.LOG_EVENT,
) -> list[str]:
    """Insert ``lines`` and run each through the workflow to a final state."""
    ids = []
    with store.transaction() as conn:
        first = store.next_seq_in(conn, "test")
        for offset, line in enumerate(lines):
            record_id = store.insert_record(
                conn, "test", first + offset, line, line.encode(), kind
            )
            assert record_id is not None
            ids.append(record_id)
    for record_id in ids:
        for _ in range(6):
            row = store.get_record(record_id)
            if row["state"] in (RecordState.QUEUED, RecordState.DEAD):
                break
            workflow.infer(store, record_id)
            workflow.decode_json(store, record_id)
            workflow.validate(store, record_id)
            workflow.enqueue(store, record_id)
    return ids


def make_workflow(data_dir: Path, clock: FakeClock, outputs: list) -> Workflow:
    return Workflow(
        data_dir / DB_NAME,
        FakeEngine(outputs),
        "",
        SamplingParams(),
        clock=clock,
    )


def build_review(
    config: ReviewConfig, clock: FakeClock, clients: list[ReviewerClient]
) -> ReviewActivity:
    """Return an activity on ``clock`` whose limiter sleeps by advancing it."""
    assert config.base_url is not None and config.model is not None
    client = ReviewerClient(
        config.base_url,
        config.model,
        max_tokens=config.max_tokens,
        timeout=config.timeout,
        structured_output=config.structured_output,
    )
    clients.append(client)
    limiter = SlidingWindowLimiter(
        config.requests_per_minute, config.tokens_per_minute, clock, unit="token"
    )
    return ReviewActivity(config, client, limiter, clock=clock, sleep=clock.sleep)


@pytest.fixture
def make_review():
    """Build activities like ``build_review`` and close their clients afterwards."""
    clients: list[ReviewerClient] = []

    def build(config: ReviewConfig, clock: FakeClock) -> ReviewActivity:
        return build_review(config, clock, clients)

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def stub():
    with OpenAIStub() as server:
        yield server


def local_output(**changes: object) -> str:
    return record_json(**changes)


# Selection -------------------------------------------------------------------


def test_drift_sample_is_stable_and_proportional() -> None:
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(20_000)]
    chosen = [i for i in ids if in_drift_sample(i, 0.02)]
    assert 0.015 < len(chosen) / len(ids) < 0.025
    assert all(in_drift_sample(i, 0.02) for i in chosen)
    assert not any(in_drift_sample(i, 0.0) for i in ids[:100])
    assert all(in_drift_sample(i, 1.0) for i in ids[:100])


@pytest.mark.parametrize(
    ("raw", "attempts", "flags", "severity", "expected"),
    [
        (FATAL_LINE, 1, "", "critical", []),
        (FATAL_LINE, 1, "", "error", []),
        (FATAL_LINE, 1, "", "info", ["severity_far_from_level"]),
        (FATAL_LINE, 2, "", "critical", ["retried"]),
        (FATAL_LINE, 1, "truncated", "critical", ["line_cut"]),
        ("disk sda1 is nearly full", 1, "", "debug", []),
        ("x" * 2500 + " INFO ok", 1, "", "info", ["line_cut"]),
    ],
)
def test_doubt_reasons_cases(
    raw: str, attempts: int, flags: str, severity: str, expected: list[str]
) -> None:
    record = {"raw": raw, "attempts": attempts, "flags": flags}
    assert doubt_reasons(record, {"severity": severity}) == expected


def test_selection_takes_sample_and_doubtful_once(
    data_dir: Path, clock: FakeClock, stub: OpenAIStub
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(
        data_dir,
        clock,
        ["not json", local_output(), local_output(), local_output(severity="info")],
    )
    retried, plain, wrong_level = add_records(
        store, workflow, [FATAL_LINE, "node card OK", FATAL_LINE]
    )
    add_records(store, workflow, ['{"temp": 71}'], RecordKind.JSON)

    config = review_config(stub.url, sample_fraction=0.0)
    assert select_new(store, config) == 2
    assert select_new(store, config) == 0
    reasons = {
        row["record_id"]: row["reason"]
        for row in store.query("SELECT record_id, reason FROM reviews")
    }
    assert plain not in reasons
    assert reasons[retried] == "doubtful: retried"
    assert reasons[wrong_level] == "doubtful: severity_far_from_level"
    store.close()


def test_selection_skips_records_before_enable(
    data_dir: Path, clock: FakeClock, stub: OpenAIStub
) -> None:
    store = open_store(data_dir, clock)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (old,) = add_records(store, workflow, [FATAL_LINE])
    ensure_schema(store)
    config = review_config(stub.url)
    assert select_new(store, config) == 0
    assert request_review(store, old[:8]) == old
    assert next_due(store) == old
    store.close()


def test_json_record_review_request_rejected(data_dir: Path, clock: FakeClock) -> None:
    store = open_store(data_dir, clock)
    workflow = make_workflow(data_dir, clock, [])
    (record_id,) = add_records(store, workflow, ['{"a": 1}'], RecordKind.JSON)
    with pytest.raises(Exception, match="only log_event records"):
        request_review(store, record_id)
    store.close()


# Verdicts --------------------------------------------------------------------


def test_compare_records_verdict_per_field() -> None:
    local = dict(DEFAULT_RECORD)
    reviewer = {
        **DEFAULT_RECORD,
        "severity": "error",
        "component": "kernel",
        "summary": "The node stopped on a data TLB error interrupt.",
        "suggested_action": "",
    }
    verdicts, agreement = compare_records(local, reviewer)
    assert verdicts["severity"] == "disagree"
    assert verdicts["component"] == "agree"
    assert verdicts["event_type"] == "agree"
    assert verdicts["action_required"] == "agree"
    assert verdicts["summary"] == "agree"
    assert verdicts["suggested_action"] == "disagree"
    assert agreement == 0.75


def test_compare_records_without_local_record() -> None:
    verdicts, agreement = compare_records(None, DEFAULT_RECORD)
    assert set(verdicts.values()) == {"no_local"}
    assert agreement is None


def test_word_overlap_bounds() -> None:
    assert word_overlap("", "") == 1.0
    assert word_overlap("disk full", "") == 0.0
    assert word_overlap("Disk full!", "disk FULL") == 1.0


# The activity ----------------------------------------------------------------


def test_review_stores_verdicts_usage_and_cost(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output(severity="error")])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    config = review_config(
        "http://unused/v1",
        price_per_1k_prompt_tokens=0.5,
        price_per_1k_completion_tokens=2.0,
    )
    with OpenAIStub() as stub:
        config = config.model_copy(update={"base_url": stub.url})
        activity = make_review(config, clock)
        summary = drain(store, activity, config)
        assert summary.counts == {Outcome.DONE: 1}
        sent = stub.requests[0].body

    assert sent["messages"][-1]["content"] == FATAL_LINE
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"]["title"] == "log_event"
    row = store.query("SELECT * FROM reviews WHERE record_id = ?", (record_id,))[0]
    assert row["state"] == ReviewState.DONE
    assert json.loads(row["review_data"]) == DEFAULT_RECORD
    assert json.loads(row["verdicts"])["severity"] == "disagree"
    assert row["agreement"] == 0.75
    expected_cost = (row["prompt_tokens"] * 0.5 + row["completion_tokens"] * 2.0) / 1000
    assert row["prompt_tokens"] > 0
    assert row["cost"] == pytest.approx(expected_cost)

    event = [e for e in store.events_for(record_id) if e["step"] == "review"][0]
    detail = json.loads(event["detail"])
    assert detail["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
    assert detail["gen_ai.usage.output_tokens"] == row["completion_tokens"]
    assert detail["cost"] == pytest.approx(expected_cost)
    assert store.get_record(record_id)["state"] == RecordState.QUEUED
    store.close()


def test_limiter_holds_burst_under_limits(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 12)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(12)])
    with OpenAIStub() as stub:
        config = review_config(
            stub.url, requests_per_minute=4, tokens_per_minute=10_000
        )
        activity = make_review(config, clock)
        summary = drain(store, activity, config)
        assert summary.counts == {Outcome.DONE: 12}
        assert all(request.status == 200 for request in stub.requests)

    sent = store.query("SELECT at, reserved_tokens FROM review_requests ORDER BY at")
    assert len(sent) == 12
    for index, first in enumerate(sent):
        window = [row for row in sent[index:] if row["at"] < first["at"] + 60.0]
        assert len(window) <= 4
        assert sum(row["reserved_tokens"] for row in window) <= 10_000
    assert clock.now - START >= 120.0
    store.close()


def test_token_limit_spaces_requests(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 5)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(5)])
    with OpenAIStub() as stub:
        config = review_config(stub.url)
        reserve = make_review(config, clock).client.estimate_tokens(
            [{"role": "system", "content": "x"}]
        )
        config = config.model_copy(update={"tokens_per_minute": 2 * reserve + 900})
        drain(store, make_review(config, clock), config)
    sent = store.query("SELECT at, reserved_tokens FROM review_requests ORDER BY at")
    assert len(sent) == 5
    for index, first in enumerate(sent):
        window = [row for row in sent[index:] if row["at"] < first["at"] + 60.0]
        assert sum(row["reserved_tokens"] for row in window) <= 2 * reserve + 900
    store.close()


def test_throttle_requeues_after_retry_after(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    script = [Reply(429, retry_after="7"), Reply(503, retry_after="3"), Reply()]
    with OpenAIStub(script) as stub:
        config = review_config(stub.url)
        activity = make_review(config, clock)
        select_new(store, config)

        assert activity.review(store, record_id) == Outcome.THROTTLED
        row = store.query("SELECT * FROM reviews")[0]
        assert row["next_attempt_at"] == pytest.approx(clock.now + 7)
        assert row["attempts"] == 0
        assert row["throttled"] == 1
        assert activity.pause_remaining() == pytest.approx(7)
        assert next_due(store) is None

        clock.now += 7
        assert activity.review(store, record_id) == Outcome.THROTTLED
        clock.now += 3
        assert activity.review(store, record_id) == Outcome.DONE
        assert len(stub.requests) == 3

    row = store.query("SELECT * FROM reviews")[0]
    assert row["state"] == ReviewState.DONE
    assert row["throttled"] == 2
    assert row["attempts"] == 1
    store.close()


def test_every_server_throttle_retried_until_done(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 8)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(8)])
    stub = OpenAIStub(requests_per_minute=3, limit_retry_after=20, clock=clock)
    with stub:
        # The client has no limits of its own, so only the server's 429s pace it.
        config = review_config(stub.url)
        activity = make_review(config, clock)
        for _ in range(50):
            summary = drain(store, activity, config)
            if summary.stopped_by is None:
                break
            clock.now += activity.pause_remaining()

    limited = [request for request in stub.requests if request.limited]
    passed = [request for request in stub.requests if not request.limited]
    assert len(limited) >= 2
    assert len(passed) == 8
    assert stub.window_peaks()[0] <= 3
    states = store.query("SELECT state, throttled FROM reviews")
    assert [row["state"] for row in states] == ["done"] * 8
    assert sum(row["throttled"] for row in states) == len(limited)
    store.close()


def test_throttle_without_retry_after_backs_off(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    with OpenAIStub([Reply(429), Reply(429), Reply(429)]) as stub:
        config = review_config(stub.url)
        activity = make_review(config, clock)
        select_new(store, config)
        waits = []
        for _ in range(3):
            assert activity.review(store, record_id) == Outcome.THROTTLED
            waits.append(activity.pause_remaining())
            clock.now += waits[-1]
        assert waits == [2.0, 4.0, 8.0]
    store.close()


def test_server_errors_follow_retry_policy(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    attempts = REVIEW_POLICY.maximum_attempts
    with OpenAIStub([Reply(500)] * attempts) as stub:
        config = review_config(stub.url)
        activity = make_review(config, clock)
        select_new(store, config)
        outcomes = []
        for attempt in range(1, attempts + 1):
            outcomes.append(activity.review(store, record_id))
            clock.now += REVIEW_POLICY.delay(attempt)
        assert len(stub.requests) == attempts

    assert outcomes == [Outcome.RETRY] * (attempts - 1) + [Outcome.FAILED]
    row = store.query("SELECT * FROM reviews")[0]
    assert row["state"] == ReviewState.FAILED
    assert row["attempts"] == attempts
    assert "HTTP 500" in row["last_error"]
    store.close()


def test_invalid_reviewer_output_costs_and_retries(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    with OpenAIStub([Reply(content="I think it is critical.")]) as stub:
        config = review_config(stub.url, price_per_1k_prompt_tokens=1.0)
        activity = make_review(config, clock)
        select_new(store, config)
        assert activity.review(store, record_id) == Outcome.RETRY

    row = store.query("SELECT * FROM reviews")[0]
    assert row["state"] == ReviewState.PENDING
    assert row["attempts"] == 1
    assert "not valid JSON" in row["last_error"]
    assert row["cost"] > 0
    store.close()


@pytest.mark.parametrize("status", [400, 422, 500])
def test_rejected_response_format_falls_back_to_prompt(
    data_dir: Path, clock: FakeClock, status: int, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    (record_id,) = add_records(store, workflow, [FATAL_LINE])
    fenced = "```json\n" + record_json() + "\n```"
    stub = OpenAIStub(
        [Reply(), Reply(content=fenced)],
        reject_response_format=True,
        reject_status=status,
    )
    with stub:
        config = review_config(stub.url)
        summary = drain(store, make_review(config, clock), config)
        first, second = stub.requests[0].body, stub.requests[1].body

    assert summary.counts == {Outcome.RETRY: 1, Outcome.DONE: 1}
    assert "response_format" in first
    assert "response_format" not in second
    assert "JSON schema" in second["messages"][0]["content"]
    assert '"log_event"' in second["messages"][0]["content"]
    row = store.query("SELECT * FROM reviews WHERE record_id = ?", (record_id,))[0]
    assert row["structured_output"] == "prompt"
    assert row["attempts"] == 1
    store.close()


def test_forced_json_schema_pauses_with_reason(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    add_records(store, workflow, [FATAL_LINE])
    with OpenAIStub(reject_response_format=True) as stub:
        config = review_config(stub.url, structured_output="json_schema")
        summary = drain(store, make_review(config, clock), config)
        assert len(stub.requests) == 1

    assert summary.counts == {Outcome.PAUSED: 1}
    assert "structured_output" in (summary.stopped_by or "")
    status = review_summary(store)
    assert status["pending"] == 1
    assert "structured_output" in status["pause_reason"]
    assert status["paused_until"] == pytest.approx(clock.now + SETUP_PAUSE)
    store.close()


def test_offline_work_survives_reopen(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 3)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(3)])
    stub = OpenAIStub().start()
    try:
        stub.set_reachable(False)
        config = review_config(stub.url)
        activity = make_review(config, clock)
        summary = drain(store, activity, config)
        assert summary.counts == {Outcome.UNREACHABLE: 1}
        assert "unreachable" in (summary.stopped_by or "")
        rows = store.query("SELECT state, attempts FROM reviews")
        assert [row["state"] for row in rows] == ["pending"] * 3
        assert all(row["attempts"] == 0 for row in rows)
        activity.client.close()
        store.close()

        clock.now += 3600
        stub.set_reachable(True)
        reopened = open_store(data_dir, clock)
        activity = make_review(config, clock)
        activity.restore(reopened)
        summary = drain(reopened, activity, config)
        assert summary.counts == {Outcome.DONE: 3}
        states = reopened.query("SELECT state FROM reviews")
        assert [row["state"] for row in states] == ["done"] * 3
        reopened.close()
    finally:
        stub.close()


def test_restart_restores_limiter_window(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 4)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(4)])
    with OpenAIStub() as stub:
        config = review_config(stub.url, requests_per_minute=2)
        drain(store, make_review(config, clock), config, limit=2)
        sent_before = clock.now
        restarted = make_review(config, clock)
        restarted.restore(store)
        drain(store, restarted, config)
    sent = store.query("SELECT at FROM review_requests ORDER BY at")
    assert len(sent) == 4
    assert sent[2]["at"] >= sent[0]["at"] + 60.0
    assert clock.now > sent_before
    store.close()


def test_budget_stops_review_with_visible_reason(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()] * 6)
    add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(6)])
    with OpenAIStub() as stub:
        config = review_config(
            stub.url,
            price_per_1k_prompt_tokens=1.0,
            price_per_1k_completion_tokens=1.0,
            daily_budget=2.5,
        )
        activity = make_review(config, clock)
        save_settings(store, config)
        summary = drain(store, activity, config)
        sent_today = len(stub.requests)

        assert Outcome.BUDGET in summary.counts
        assert 0 < sent_today < 6
        status = review_summary(store)
        assert status["budget"]["state"] == "exhausted"
        assert "daily budget of 2.5 reached" in status["budget"]["reason"]
        assert status["cost"]["today"] <= 2.5
        assert status["pending"] == 6 - sent_today

        clock.now += DAY
        activity.paused_until = 0.0
        summary = drain(store, activity, config, limit=1)
        assert summary.counts == {Outcome.DONE: 1}
        assert len(stub.requests) == sent_today + 1
    store.close()


def test_status_sums_review_cost_and_agreement(
    data_dir: Path, clock: FakeClock, make_review
) -> None:
    # collect_status reads the real clock, so the reviews must be from today.
    clock.now = time.time()
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(
        data_dir, clock, [local_output(), local_output(event_type="memory")]
    )
    add_records(store, workflow, [f"{FATAL_LINE} a", f"{FATAL_LINE} b"])
    with OpenAIStub() as stub:
        config = review_config(
            stub.url,
            price_per_1k_prompt_tokens=0.25,
            price_per_1k_completion_tokens=1.0,
            daily_budget=10.0,
            agreement_alert_below=0.95,
        )
        save_settings(store, config)
        drain(store, make_review(config, clock), config)
    rows = store.query("SELECT prompt_tokens, completion_tokens FROM reviews")
    expected = sum(
        (r["prompt_tokens"] * 0.25 + r["completion_tokens"] * 1.0) / 1000 for r in rows
    )
    store.close()

    status = collect_status(data_dir)
    review = status["review"]
    assert review["done"] == 2
    assert review["cost"]["today"] == pytest.approx(expected)
    assert review["cost"]["total"] == pytest.approx(expected)
    assert review["tokens"]["prompt_today"] == sum(r["prompt_tokens"] for r in rows)
    assert review["agreement"]["rate"] == pytest.approx(0.875)
    assert review["agreement"]["fields"]["event_type"] == pytest.approx(0.5)
    assert review["agreement"]["daily"][0]["reviews"] == 2
    assert review["agreement"]["alert"] is True
    assert "drifting" in review["agreement"]["alert_reason"]
    assert review["budget"]["state"] == "ok"
    text = format_status(status)
    assert "review          0 pending, 2 done" in text
    assert "ALERT" in text


# Secrets ---------------------------------------------------------------------


def test_api_key_file_must_be_private(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-test-123\n")
    key_file.chmod(0o644)
    with pytest.raises(SetupError, match="chmod 600"):
        read_api_key(key_file)
    key_file.chmod(0o600)
    assert read_api_key(key_file) == "sk-test-123"


def test_api_key_never_logged_or_stored(
    data_dir: Path, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-wrong-" + uuid.uuid4().hex
    key_file = tmp_path / "key"
    key_file.write_text(secret)
    key_file.chmod(0o600)
    store = open_store(data_dir, clock)
    ensure_schema(store)
    workflow = make_workflow(data_dir, clock, [local_output()])
    add_records(store, workflow, [FATAL_LINE])
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(api_key="sk-right") as stub:
        config = review_config(stub.url, api_key_file=key_file)
        activity = make_activity(config, clock=clock)
        summary = drain(store, activity, config)
        activity.client.close()
        assert stub.requests[0].headers["authorization"] == f"Bearer {secret}"

    assert summary.counts == {Outcome.PAUSED: 1}
    assert "HTTP 401" in (summary.stopped_by or "")
    assert "***" in (summary.stopped_by or "")
    assert secret not in caplog.text
    dumped = "\n".join(
        str(tuple(row))
        for table in ("reviews", "review_requests", "review_state", "events")
        for row in store.query(f"SELECT * FROM {table}")
    )
    assert secret not in dumped
    store.close()


# Threads ---------------------------------------------------------------------


def test_stalled_reviewer_never_blocks_local_pipeline(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    count = 20
    workflow = Workflow(
        data_dir / DB_NAME,
        FakeEngine([local_output()] * (count + 1)),
        "",
        SamplingParams(),
    )
    store = Store(data_dir / DB_NAME)
    (first,) = add_records(store, workflow, [FATAL_LINE])
    ensure_schema(store)
    request_review(store, first)
    stub = OpenAIStub().start()
    stub.hold()
    config = review_config(stub.url, timeout=30.0)
    activity = make_activity(config, stop=threading.Event())
    reviewer = ReviewWorker(data_dir / DB_NAME, activity, config)
    workers = [
        Worker("inference", workflow, inference_jobs(workflow)),
        Worker("steps", workflow, step_jobs(workflow)),
    ]
    try:
        # The reviewer waits inside a request that the server holds.
        reviewer.start()
        assert _wait_until(lambda: stub.waiting == 1, 10)

        for worker in workers:
            worker.start()
        with store.transaction() as conn:
            for seq in range(count):
                line = f"{FATAL_LINE} {seq}"
                store.insert_record(conn, "live", seq + 1, line, line.encode())
        workflow.work_ready.set()
        all_queued = _wait_until(
            lambda: store.state_counts()[RecordState.QUEUED] == count + 1, 20
        )
        assert all_queued
        assert stub.waiting == 1
        assert review_summary(store)["done"] == 0

        stub.release()
        assert _wait_until(lambda: review_summary(store)["done"] == count + 1, 30)
    finally:
        stub.release()
        for worker in workers:
            worker.stop()
        reviewer.stop()
        for thread in (*workers, reviewer):
            thread.join(timeout=10)
        stub.close()
        store.close()
    assert reviewer.error is None


def _wait_until(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


# CLI -------------------------------------------------------------------------


def test_cli_review_queues_dead_letter_and_lists(
    data_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    store = open_store(data_dir, clock)
    workflow = make_workflow(data_dir, clock, ["bad"] * 3 + [local_output()])
    dead, good = add_records(store, workflow, [FATAL_LINE, f"{FATAL_LINE} 2"])
    assert store.get_record(dead)["state"] == RecordState.DEAD
    store.close()
    runner = CliRunner()

    queued = runner.invoke(
        main, ["review", "--data-dir", str(data_dir), "--record", dead[:8]]
    )
    assert queued.exit_code == 0, queued.output
    assert f"record {dead} queued for review" in queued.output
    assert "nothing sent" in queued.output

    with OpenAIStub() as stub:
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[review]\nenabled = true\nbase_url = "{stub.url}"\nmodel = "big"\n'
            "sample_fraction = 0.0\n"
        )
        sent = runner.invoke(
            main,
            ["review", "--data-dir", str(data_dir), "--config", str(config)],
        )
        assert sent.exit_code == 0, sent.output
        assert "1 done" in sent.output
        assert "0 reviews pending" in sent.output

    listed = runner.invoke(main, ["reviews", "--data-dir", str(data_dir), "--json"])
    assert listed.exit_code == 0, listed.output
    (review,) = [json.loads(line) for line in listed.output.splitlines()]
    assert review["record_id"] == dead
    assert review["reason"] == "dead_letter"
    assert review["local"] is None
    assert review["reviewer"] == DEFAULT_RECORD
    assert set(review["verdicts"].values()) == {"no_local"}

    table = runner.invoke(main, ["reviews", "--data-dir", str(data_dir)])
    assert dead[:8] in table.output


def test_request_all_dead_counts(data_dir: Path, clock: FakeClock) -> None:
    store = open_store(data_dir, clock)
    workflow = make_workflow(data_dir, clock, ["bad"] * 6)
    add_records(store, workflow, [FATAL_LINE, f"{FATAL_LINE} 2"])
    assert request_all_dead(store) == 2
    assert len(store.query("SELECT * FROM reviews WHERE priority = 0")) == 2
    store.close()


# A real llama.cpp server -----------------------------------------------------


def _llama_server_missing() -> str | None:
    """Return why the real-server test cannot run here, or None."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python's [server] extra is not installed: {exc}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _llama_server_missing() is not None, reason=str(_llama_server_missing())
)
def test_real_llama_server_behind_limiting_proxy(
    data_dir: Path, model_path: Path, tmp_path: Path
) -> None:
    """Review through a rate-limiting proxy in front of ``llama_cpp.server``."""
    port = _free_port()
    log_path = tmp_path / "llama-server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "4096",
                "--n_threads",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, server, log_path)
        data_dir.mkdir(parents=True)
        store = Store(data_dir / DB_NAME)
        workflow = Workflow(
            data_dir / DB_NAME, FakeEngine([local_output()] * 3), "", SamplingParams()
        )
        ids = add_records(store, workflow, [f"{FATAL_LINE} {n}" for n in range(3)])
        for record_id in ids:
            request_review(store, record_id)
        proxy = OpenAIStub(
            upstream=f"http://127.0.0.1:{port}/v1",
            requests_per_minute=3,
            tokens_per_minute=20_000,
        )
        with proxy:
            config = review_config(
                proxy.url,
                requests_per_minute=3,
                tokens_per_minute=20_000,
                max_tokens=200,
                timeout=300,
                price_per_1k_prompt_tokens=1.0,
                price_per_1k_completion_tokens=2.0,
            )
            activity = make_activity(config)
            summary = drain(store, activity, config)
            activity.client.close()
        log_text = log_path.read_text(errors="replace")[-2000:]

        assert proxy.requests[0].status in (422, 500), log_text
        assert "response_format" in proxy.requests[0].body
        assert all("response_format" not in r.body for r in proxy.requests[1:])
        assert not any(request.limited for request in proxy.requests)
        peak_requests, peak_tokens = proxy.window_peaks()
        assert peak_requests <= 3
        assert peak_tokens <= 20_000
        assert summary.counts.get(Outcome.RETRY, 0) >= 1
        responded = store.query(
            "SELECT * FROM review_requests WHERE status = 200 AND outcome != 'throttled'"
        )
        assert len(responded) == len(proxy.requests) - 1
        for row in responded:
            assert row["prompt_tokens"] > 0
            expected = (row["prompt_tokens"] + 2 * row["completion_tokens"]) / 1000
            assert row["cost"] == pytest.approx(expected)
        store.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path) -> None:
    import socket

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited with {process.returncode}: "
                f"{log_path.read_text(errors='replace')[-1000:]}"
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"llama_cpp.server did not listen on port {port} in 120 s")
