"""Model-based test of the workflow and its store against an in-memory reference.

Hypothesis runs random sequences of intake, worker turns, stray activity calls,
clock advances, manual retries, crashes during inference and store reopens.
After every step the database must hold exactly the records of the reference
model, in the same state, with the same attempt count and retry time. The fake
model checks on every call that the record it is asked about is due, so a retry
that runs early fails the test where it happens.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from appliance.errors import InferenceError
from appliance.inference import Completion, SamplingParams
from appliance.retry import RetryPolicy, requeue_all_dead
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Workflow, inference_jobs, step_jobs
from tests.test_workflow import VALID, FakeClock

INFER = RetryPolicy(
    initial_interval=10.0,
    backoff_coefficient=2.0,
    maximum_interval=15.0,
    maximum_attempts=3,
    attempt_timeout=30.0,
)
VALIDATE = RetryPolicy(
    initial_interval=5.0, backoff_coefficient=1.0, maximum_interval=5.0
)
SLOW_CALL_SECONDS = 45.0
"""Fake-clock seconds a slow model call takes, over INFER's attempt_timeout."""

OUTCOMES = ["valid", "invalid", "truncated", "error", "slow"]
"""What the fake model does on one call: return valid output, output that
fails validation or output cut at max_tokens, raise InferenceError, or return
valid output after the attempt timeout."""

Crash = type("Crash", (BaseException,), {"__doc__": "The process dies mid-call."})


@dataclasses.dataclass
class Expected:
    """The reference model's view of one record."""

    kind: RecordKind
    raw: str
    state: RecordState = RecordState.RECEIVED
    attempts: int = 0
    due_at: float = 0.0
    output_valid: bool = False


class ScriptedEngine:
    """A fake model that returns or raises what a rule chose for the next call."""

    model_name = "scripted"

    def __init__(self, machine: WorkflowMachine) -> None:
        self.machine = machine
        self.outcome = "valid"

    def complete(self, messages, grammar, params: SamplingParams) -> Completion:
        self.machine.check_call_is_due(messages[-1]["content"])
        if self.outcome == "crash":
            raise Crash()
        if self.outcome == "error":
            raise InferenceError("llama.cpp failed: scripted error")
        if self.outcome == "slow":
            self.machine.clock.advance(SLOW_CALL_SECONDS)
        text = {"invalid": '{"severity": "loud"}'}.get(self.outcome, VALID)
        finish = "length" if self.outcome == "truncated" else "stop"
        return Completion(text, 10, 20, finish, 0.01)


class WorkflowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="workflow-stateful-"))
        self.db_path = self.directory / "appliance.db"
        self.clock = FakeClock()
        self.engine = ScriptedEngine(self)
        self.expected: dict[str, Expected] = {}
        self.by_raw: dict[str, str] = {}
        self.lines = 0
        self._open()

    def _open(self) -> None:
        self.store = Store(self.db_path, clock=self.clock)
        self.flow = Workflow(
            self.db_path,
            self.engine,
            "",
            SamplingParams(),
            policies={"infer": INFER, "validate": VALIDATE},
            clock=self.clock,
            timer=self.clock,
        )

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # The reference model ------------------------------------------------------

    def check_call_is_due(self, raw: str) -> None:
        record = self.expected[self.by_raw[raw]]
        assert record.state == RecordState.RECEIVED, raw
        assert record.due_at <= self.clock(), (raw, record.due_at, self.clock())

    def _is_due(
        self, record: Expected, state: RecordState, now: float | None = None
    ) -> bool:
        now = self.clock() if now is None else now
        return record.state == state and record.due_at <= now

    def _expect_activity(
        self, name: str, record_id: str, outcome: str, now: float
    ) -> None:
        """Apply to the model what ``name`` started at ``now`` does to the record."""
        record = self.expected[record_id]
        if name == "infer":
            if record.kind != RecordKind.LOG_EVENT:
                return
            if not self._is_due(record, RecordState.RECEIVED, now):
                return
            attempt = record.attempts + 1
            if outcome in ("error", "slow"):
                if outcome == "slow":
                    now += SLOW_CALL_SECONDS
                self._expect_failure(record, INFER, attempt, now)
                return
            record.state = RecordState.INFERRED
            record.attempts = attempt
            record.output_valid = outcome == "valid"
        elif name == "validate":
            if not self._is_due(record, RecordState.INFERRED, now):
                return
            if record.output_valid:
                record.state = RecordState.VALIDATED
                return
            self._expect_failure(record, VALIDATE, record.attempts, now)
        elif name == "decode_json":
            if record.kind != RecordKind.JSON:
                return
            if not self._is_due(record, RecordState.RECEIVED, now):
                return
            record.attempts = 1
            if record.raw.startswith("{"):
                record.state = RecordState.VALIDATED
            else:
                record.state = RecordState.DEAD
        elif name == "enqueue":
            if record.state == RecordState.VALIDATED:
                record.state = RecordState.QUEUED

    @staticmethod
    def _expect_failure(
        record: Expected, policy: RetryPolicy, attempt: int, now: float
    ) -> None:
        record.attempts = attempt
        if attempt >= policy.maximum_attempts:
            record.state = RecordState.DEAD
            return
        record.state = RecordState.RECEIVED
        record.due_at = now + policy.delay(attempt)

    def _run(self, name: str, record_id: str, outcome: str) -> None:
        self.engine.outcome = outcome
        started = self.clock()
        getattr(self.flow, name)(self.store, record_id)
        self._expect_activity(name, record_id, outcome, started)

    # Rules --------------------------------------------------------------------

    @rule(kind=st.sampled_from(list(RecordKind)), parses=st.booleans())
    def receive(self, kind: RecordKind, parses: bool) -> None:
        self.lines += 1
        raw = f"line {self.lines}"
        if kind == RecordKind.JSON:
            raw = json.dumps({"n": self.lines}) if parses else f"[{self.lines}]"
        with self.store.transaction() as conn:
            record_id = self.store.insert_record(
                conn, "fuzz", self.lines, raw, raw.encode(), kind
            )
        assert record_id is not None
        self.expected[record_id] = Expected(kind, raw)
        self.by_raw[raw] = record_id

    @rule(outcome=st.sampled_from(OUTCOMES))
    def inference_worker_turn(self, outcome: str) -> None:
        jobs = inference_jobs(self.flow)(self.store)
        due = [
            record_id
            for record_id, record in self.expected.items()
            if record.kind == RecordKind.LOG_EVENT
            and self._is_due(record, RecordState.RECEIVED)
        ]
        assert bool(jobs) == bool(due)
        for record_id, _ in jobs:
            assert record_id in due
            self._run("infer", record_id, outcome)

    @rule()
    def step_worker_turn(self) -> None:
        jobs = step_jobs(self.flow)(self.store)
        names = {
            (RecordState.RECEIVED, RecordKind.JSON): "decode_json",
            (RecordState.INFERRED, RecordKind.LOG_EVENT): "validate",
            (RecordState.VALIDATED, RecordKind.LOG_EVENT): "enqueue",
            (RecordState.VALIDATED, RecordKind.JSON): "enqueue",
        }
        due = {
            record_id: names[(record.state, record.kind)]
            for record_id, record in self.expected.items()
            if (record.state, record.kind) in names and record.due_at <= self.clock()
        }
        assert {record_id: job.__name__ for record_id, job in jobs} == due
        for record_id, job in jobs:
            self._run(job.__name__, record_id, "valid")

    @precondition(lambda self: self.expected)
    @rule(
        pick=st.integers(min_value=0),
        name=st.sampled_from(["infer", "validate", "decode_json", "enqueue"]),
        outcome=st.sampled_from(OUTCOMES),
    )
    def stray_activity_call(self, pick: int, name: str, outcome: str) -> None:
        # A second worker or a restarted one may run any step on any record,
        # and the step must act only when the record is in its state and due.
        # Records are picked in insertion order because their ids are random
        # UUIDs, and Hypothesis needs the same steps to pick the same record.
        record_id = list(self.expected)[pick % len(self.expected)]
        self._run(name, record_id, outcome)

    @precondition(lambda self: self._waiting())
    @rule(pick=st.integers(min_value=0), outcome=st.sampled_from(OUTCOMES))
    def early_retry_call(self, pick: int, outcome: str) -> None:
        # The step for a record whose retry is not yet due must do nothing.
        waiting = self._waiting()
        record_id = waiting[pick % len(waiting)]
        name = {
            RecordKind.LOG_EVENT: "infer",
            RecordKind.JSON: "decode_json",
        }[self.expected[record_id].kind]
        self._run(name, record_id, outcome)

    def _waiting(self) -> list[str]:
        return [
            record_id
            for record_id, record in self.expected.items()
            if record.state == RecordState.RECEIVED and record.due_at > self.clock()
        ]

    @rule(seconds=st.sampled_from([0.5, 4.999, 5.0, 10.0, 15.0, 60.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self._open()

    @precondition(
        lambda self: any(
            r.kind == RecordKind.LOG_EVENT and self._is_due(r, RecordState.RECEIVED)
            for r in self.expected.values()
        )
    )
    @rule()
    def crash_during_inference(self) -> None:
        # Nothing of the attempt is committed, so the model does not change.
        jobs = inference_jobs(self.flow)(self.store)
        self.engine.outcome = "crash"
        try:
            self.flow.infer(self.store, jobs[0][0])
        except Crash:
            pass
        else:
            raise AssertionError("the scripted crash did not propagate")
        self.store.close()
        self._open()

    @rule()
    def operator_retries_all_dead(self) -> None:
        moved = requeue_all_dead(self.store)
        dead = [r for r in self.expected.values() if r.state == RecordState.DEAD]
        assert moved == len(dead)
        for record in dead:
            record.state = RecordState.RECEIVED
            record.attempts = 0
            record.due_at = 0.0

    # Invariants ---------------------------------------------------------------

    @invariant()
    def no_record_lost_or_added(self) -> None:
        stored = {row["id"] for row in self.store.list_records()}
        assert stored == set(self.expected)

    @invariant()
    def records_match_model(self) -> None:
        for row in self.store.list_records():
            record = self.expected[row["id"]]
            assert row["state"] == record.state, row["id"]
            assert row["attempts"] == record.attempts, row["id"]
            if record.state == RecordState.RECEIVED:
                assert row["next_attempt_at"] == record.due_at, row["id"]

    @invariant()
    def no_record_completed_twice(self) -> None:
        rows = self.store.query(
            "SELECT record_id, COUNT(*) AS n FROM events WHERE to_state = ?"
            " GROUP BY record_id HAVING n > 1",
            (str(RecordState.QUEUED),),
        )
        assert rows == []

    @invariant()
    def dead_records_keep_their_reason(self) -> None:
        rows = self.store.list_records(str(RecordState.DEAD))
        assert all(row["error"] for row in rows)


WorkflowMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None
)
test_workflow_against_model = WorkflowMachine.TestCase
