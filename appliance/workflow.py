"""The durable record workflow: activities, their retry policies, and the workers.

Each activity reads a record in one state and commits its result together with
the move to the next state, conditional on the record still being in the state
it read. After a crash the record is still in its last committed state and the
activity runs again from there, so no step is completed twice. States are
documented in ``appliance.states``.

Two workers run the activities. The inference worker owns the llama.cpp engine
and runs only ``infer``. The step worker runs every other activity, so parsing,
validation and enqueueing keep flowing while the model is busy.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pydantic

from appliance.errors import (
    ApplianceError,
    InferenceError,
    InvalidOutputError,
    StoreError,
)
from appliance.inference import Completion, OutputSpec, SamplingParams
from appliance.log_event import LogEvent
from appliance.prompts import build_messages
from appliance.retry import AttemptTimeoutError, RetryPolicy
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.telemetry import NO_TELEMETRY, NoTelemetry

logger = logging.getLogger(__name__)

RETRY_TEMPERATURE = 0.6
"""Temperature of retries after invalid output. The first attempt uses the
manifest's temperature (0); sampling again at 0 would repeat the same output."""

CHECKPOINT_INTERVAL = 30.0
"""Seconds between the WAL checkpoints that an idle worker runs."""

INFER_POLICY = RetryPolicy(
    initial_interval=5.0,
    backoff_coefficient=2.0,
    maximum_interval=60.0,
    maximum_attempts=3,
    attempt_timeout=600.0,
)
"""Policy of ``infer`` when llama.cpp raises or an attempt times out.

llama.cpp cannot be interrupted mid-call, so the timeout is checked when the
call returns. The token budget (``max_tokens``, or the schema's longest output
for the schema decoder) is what bounds a call's real duration. 600 s is far
above the per-record times in docs/benchmarks.md, so it only catches
pathological calls. ``infer`` and ``validate`` count the same attempts, which
makes ``maximum_attempts`` a limit on model calls per record."""

VALIDATE_POLICY = RetryPolicy(
    initial_interval=0.0,
    backoff_coefficient=1.0,
    maximum_interval=0.0,
    maximum_attempts=3,
)
"""Policy of ``validate``: invalid output sends the record back for another
inference at once, because the retry samples differently and waiting would
not change its outcome. Parsing takes milliseconds, so there is no timeout."""

DECODE_POLICY = RetryPolicy(
    initial_interval=0.0,
    backoff_coefficient=1.0,
    maximum_interval=0.0,
    maximum_attempts=3,
    non_retryable_errors=(InvalidOutputError,),
)
"""Policy of ``decode``. A line that is not a JSON object never becomes one, so
that error is not retried, and the attempt limit only matters with a timeout."""

STEP_POLICIES: Mapping[str, RetryPolicy] = {
    "infer": INFER_POLICY,
    "validate": VALIDATE_POLICY,
    "decode": DECODE_POLICY,
}
"""Default retry policy per activity. ``enqueue`` has none: its only failure is
a database error, which stops the worker and leaves the record validated."""


class Engine(Protocol):
    """Interface the workflow needs from a model: one constrained chat completion."""

    model_name: str

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> Completion: ...


class Workflow:
    """The activities of the record workflow over one database.

    Args:
        db_path: the SQLite database.
        engine: the model, or None for a workflow that only handles JSON records.
        grammar: the output constraint of ``log_event`` (a spec or GBNF text).
        sampling: parameters of the first inference attempt.
        policies: retry policies by activity name, replacing those of
            ``STEP_POLICIES``.
        clock: wall-clock time in seconds since the epoch. Retries are scheduled
            and found due on it, and workers open their stores with it, so a
            store passed to an activity should use the same clock.
        timer: monotonic seconds, for attempt durations and timeouts.

    Raises:
        ValueError: ``policies`` names an activity that has no retry policy.
    """

    def __init__(
        self,
        db_path: Path,
        engine: Engine | None,
        grammar: OutputSpec | str,
        sampling: SamplingParams,
        policies: Mapping[str, RetryPolicy] | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = set(policies or {}) - set(STEP_POLICIES)
        if unknown:
            raise ValueError(
                f"no activity called {sorted(unknown)!r}; policies apply to "
                f"{sorted(STEP_POLICIES)!r}"
            )
        self.db_path = db_path
        self.engine = engine
        self.grammar = grammar
        self.sampling = sampling
        self.policies = {**STEP_POLICIES, **(policies or {})}
        self.clock = clock
        self.timer = timer
        self.work_ready = threading.Event()
        self.on_final: Callable[[str], None] | None = None
        self.telemetry: NoTelemetry = NO_TELEMETRY
        """Spans of steps and model calls; the daemon sets a recording one."""

    # Activities ---------------------------------------------------------------

    def infer(self, store: Store, record_id: str) -> bool:
        """Run the model on a received ``log_event`` record and store its output.

        Returns False, doing nothing, unless the record is a received
        ``log_event`` and due.
        """
        row = store.get_record(record_id)
        if row is None or not self._due(
            row, RecordState.RECEIVED, RecordKind.LOG_EVENT
        ):
            return False
        if self.engine is None:
            raise InferenceError("no model is loaded for log_event records", record_id)
        attempt = row["attempts"] + 1
        params = self._sampling_for(attempt)
        messages = build_messages(row["raw"])
        started = self.timer()
        try:
            with self.telemetry.model_call(
                record_id, self.engine.model_name, messages, params, self.grammar
            ) as call:
                completion = self.engine.complete(messages, self.grammar, params)
                call.completion = completion
        except InferenceError as exc:
            exc.record_id = record_id
            elapsed = self.timer() - started
            return self._fail(
                store, record_id, RecordState.RECEIVED, "infer", attempt, exc, elapsed
            )
        elapsed = self.timer() - started

        detail = {
            "model": self.engine.model_name,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason,
            "cached": completion.cached,
        }
        error = self._timeout_error("infer", elapsed, record_id)
        if error is not None:
            # The call has finished, but too late: its output is kept in the
            # history only, and the attempt counts as failed.
            detail["output"] = completion.text
            return self._fail(
                store,
                record_id,
                RecordState.RECEIVED,
                "infer",
                attempt,
                error,
                elapsed,
                detail,
            )

        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                RecordState.RECEIVED,
                RecordState.INFERRED,
                output=completion.text,
                attempts=attempt,
                error=None if completion.finish_reason == "stop" else "truncated",
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    "infer",
                    RecordState.RECEIVED,
                    RecordState.INFERRED,
                    attempt,
                    completion.duration,
                    detail=detail,
                )
        self.work_ready.set()
        return moved

    def validate(self, store: Store, record_id: str) -> bool:
        """Parse and validate stored model output; retry inference or dead-letter it."""
        row = store.get_record(record_id)
        if row is None or not self._due(row, RecordState.INFERRED):
            return False
        attempt = row["attempts"]
        started = self.timer()
        try:
            data = parse_log_event(
                row["output"] or "", truncated=row["error"] == "truncated"
            )
        except InvalidOutputError as exc:
            exc.record_id = record_id
            return self._fail(
                store,
                record_id,
                RecordState.INFERRED,
                "validate",
                attempt,
                exc,
                self.timer() - started,
                {"output": row["output"]},
            )
        elapsed = self.timer() - started
        error = self._timeout_error("validate", elapsed, record_id)
        if error is not None:
            return self._fail(
                store,
                record_id,
                RecordState.INFERRED,
                "validate",
                attempt,
                error,
                elapsed,
            )

        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                RecordState.INFERRED,
                RecordState.VALIDATED,
                data=json.dumps(data, separators=(",", ":")),
                error=None,
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    "validate",
                    RecordState.INFERRED,
                    RecordState.VALIDATED,
                    attempt,
                    elapsed,
                )
        return moved

    def decode_json(self, store: Store, record_id: str) -> bool:
        """Parse a received ``json`` record; it needs no model."""
        row = store.get_record(record_id)
        if row is None or not self._due(row, RecordState.RECEIVED, RecordKind.JSON):
            return False
        attempt = row["attempts"] + 1
        started = self.timer()
        try:
            data = json.loads(row["raw"])
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except ValueError as exc:
            error = InvalidOutputError(f"line is not a JSON object: {exc}", record_id)
            elapsed = self.timer() - started
            return self._fail(
                store,
                record_id,
                RecordState.RECEIVED,
                "decode",
                attempt,
                error,
                elapsed,
            )
        elapsed = self.timer() - started
        timeout_error = self._timeout_error("decode", elapsed, record_id)
        if timeout_error is not None:
            return self._fail(
                store,
                record_id,
                RecordState.RECEIVED,
                "decode",
                attempt,
                timeout_error,
                elapsed,
            )

        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                RecordState.RECEIVED,
                RecordState.VALIDATED,
                data=json.dumps(data, separators=(",", ":")),
                attempts=attempt,
                error=None,
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    "decode",
                    RecordState.RECEIVED,
                    RecordState.VALIDATED,
                    attempt,
                    elapsed,
                )
        return moved

    def enqueue(self, store: Store, record_id: str) -> bool:
        """Put a validated record into the outbox.

        It has no timeout: the move is its only work, so there is no result to
        discard before the commit.
        """
        with store.transaction() as conn:
            moved = store.move(
                conn, record_id, RecordState.VALIDATED, RecordState.QUEUED
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    "enqueue",
                    RecordState.VALIDATED,
                    RecordState.QUEUED,
                    0,
                    0.0,
                )
        if moved:
            self._finished(store, record_id)
        return moved

    # Helpers ------------------------------------------------------------------

    def _due(
        self, row: sqlite3.Row, state: RecordState, kind: RecordKind | None = None
    ) -> bool:
        """Return True when ``row`` is in ``state``, of ``kind`` if given, and due.

        Activities check this themselves, so a call from outside the job
        selectors can neither run a step early nor run the wrong step.
        """
        if row["state"] != state:
            return False
        if kind is not None and row["kind"] != kind:
            return False
        return (row["next_attempt_at"] or 0.0) <= self.clock()

    def _sampling_for(self, attempt: int) -> SamplingParams:
        if attempt == 1:
            return self.sampling
        return SamplingParams(
            temperature=RETRY_TEMPERATURE,
            top_p=self.sampling.top_p,
            max_tokens=self.sampling.max_tokens,
            seed=attempt,
        )

    def _timeout_error(
        self, step: str, elapsed: float, record_id: str
    ) -> AttemptTimeoutError | None:
        timeout = self.policies[step].attempt_timeout
        if timeout is None or elapsed <= timeout:
            return None
        return AttemptTimeoutError(step, elapsed, timeout, record_id)

    # Failure handling ----------------------------------------------------------

    def _fail(
        self,
        store: Store,
        record_id: str,
        state: RecordState,
        step: str,
        attempt: int,
        error: ApplianceError,
        duration: float,
        detail: dict[str, Any] | None = None,
    ) -> bool:
        """Send the record back to ``received`` for a later attempt, or to dead.

        The step's policy decides. The retry's due time is committed with the
        move, so it survives restarts.
        """
        policy = self.policies[step]
        if not policy.allows_retry(attempt, error):
            return self._dead(
                store, record_id, state, step, attempt, error, duration, detail
            )
        delay = policy.delay(attempt)
        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                state,
                RecordState.RECEIVED,
                attempts=attempt,
                error=str(error),
                next_attempt_at=self.clock() + delay,
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    step,
                    state,
                    RecordState.RECEIVED,
                    attempt,
                    duration,
                    error=str(error),
                    detail=detail,
                )
        if moved:
            logger.warning(
                "record %s: %s attempt %d failed, retrying in %.1f s: %s",
                record_id,
                step,
                attempt,
                delay,
                error,
            )
        return moved

    def _dead(
        self,
        store: Store,
        record_id: str,
        state: RecordState,
        step: str,
        attempt: int,
        error: ApplianceError,
        duration: float,
        detail: dict[str, Any] | None = None,
    ) -> bool:
        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                state,
                RecordState.DEAD,
                attempts=attempt,
                error=f"{step}: {error}",
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    step,
                    state,
                    RecordState.DEAD,
                    attempt,
                    duration,
                    error=str(error),
                    detail=detail,
                )
        if moved:
            logger.warning(
                "record %s: dead after %s attempt %d: %s",
                record_id,
                step,
                attempt,
                error,
            )
            self._finished(store, record_id)
        return moved

    def _finished(self, store: Store, record_id: str) -> None:
        if self.on_final is not None:
            self.on_final(record_id)


def parse_log_event(text: str, truncated: bool = False) -> dict[str, object]:
    """Parse and validate model output as a ``log_event`` object.

    Raises:
        InvalidOutputError: the text is not JSON or fails the pydantic model;
            the message names the first problem and quotes the output's start.
    """
    excerpt = text[:80] + ("…" if len(text) > 80 else "")
    if truncated:
        raise InvalidOutputError(f"output truncated at max_tokens: {excerpt!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOutputError(
            f"output is not valid JSON ({exc}): {excerpt!r}"
        ) from exc
    try:
        event = LogEvent.model_validate(value)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise InvalidOutputError(
            f"output failed validation at {where}: {first['msg']}: {excerpt!r}"
        ) from exc
    return event.model_dump(mode="json")


class Worker(threading.Thread):
    """Runs activities on due records until stopped.

    Args:
        name: thread name.
        workflow: the activities.
        select: returns due record ids with the activity to run on each.
    """

    def __init__(
        self,
        name: str,
        workflow: Workflow,
        select: Callable[[Store], list[tuple[str, Callable[[Store, str], bool]]]],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.workflow = workflow
        self.select = select
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        store = Store(self.workflow.db_path, clock=self.workflow.clock)
        last_checkpoint = time.monotonic()
        try:
            while not self.stop_event.is_set():
                jobs = self.select(store)
                if not jobs:
                    if time.monotonic() - last_checkpoint >= CHECKPOINT_INTERVAL:
                        self._checkpoint(store)
                        last_checkpoint = time.monotonic()
                    self.workflow.work_ready.wait(0.2)
                    self.workflow.work_ready.clear()
                    continue
                for record_id, activity in jobs:
                    if self.stop_event.is_set():
                        break
                    name = getattr(activity, "__name__", "step")
                    with self.workflow.telemetry.step(store, record_id, name) as step:
                        step.moved = activity(store, record_id)
        except BaseException as exc:
            self.error = exc
            logger.exception("worker %s stopped by an unexpected error", self.name)
        finally:
            store.close()

    def _checkpoint(self, store: Store) -> None:
        # TRUNCATE empties the WAL file when no reader is using it; busy only
        # means another connection was active, and the next idle turn retries.
        try:
            busy, wal_pages, copied = store.checkpoint("TRUNCATE")
        except StoreError as exc:
            logger.warning("worker %s: WAL checkpoint failed: %s", self.name, exc)
            return
        logger.debug(
            "worker %s: WAL checkpoint %s, %d of %d pages copied",
            self.name,
            "stopped early by a busy database" if busy else "complete",
            copied,
            wal_pages,
        )

    def stop(self) -> None:
        self.stop_event.set()
        self.workflow.work_ready.set()


def inference_jobs(
    workflow: Workflow,
) -> Callable[[Store], list[tuple[str, Callable[[Store, str], bool]]]]:
    """Job selector of the inference worker: one received log_event at a time."""

    def select(store: Store) -> list[tuple[str, Callable[[Store, str], bool]]]:
        rows = store.due_records([RecordState.RECEIVED], [RecordKind.LOG_EVENT], 1)
        return [(row["id"], workflow.infer) for row in rows]

    return select


def step_jobs(
    workflow: Workflow,
) -> Callable[[Store], list[tuple[str, Callable[[Store, str], bool]]]]:
    """Job selector of the step worker: everything except inference."""
    activities: dict[tuple[str, str], Callable[[Store, str], bool]] = {
        (RecordState.RECEIVED, RecordKind.JSON): workflow.decode_json,
        (RecordState.INFERRED, RecordKind.LOG_EVENT): workflow.validate,
        (RecordState.VALIDATED, RecordKind.LOG_EVENT): workflow.enqueue,
        (RecordState.VALIDATED, RecordKind.JSON): workflow.enqueue,
    }

    def select(store: Store) -> list[tuple[str, Callable[[Store, str], bool]]]:
        # One query per state and kind, so a backlog of records waiting for the
        # model never hides JSON records or validated ones behind it.
        jobs = []
        for (state, kind), activity in activities.items():
            for row in store.due_records([RecordState(state)], [RecordKind(kind)], 100):
                jobs.append((row["id"], activity))
        return jobs

    return select
