"""The durable record workflow: activities, their retry policy, and the workers.

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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pydantic

from appliance.errors import ApplianceError, InferenceError, InvalidOutputError
from appliance.inference import Completion, OutputSpec, SamplingParams
from appliance.log_event import LogEvent
from appliance.prompts import build_messages
from appliance.retry import RetryPolicy
from appliance.states import RecordKind, RecordState
from appliance.store import Store

logger = logging.getLogger(__name__)

RETRY_TEMPERATURE = 0.6
"""Temperature of retries after invalid output. The first attempt uses the
manifest's temperature (0); sampling again at 0 would repeat the same output."""


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
        policy: retry policy of the infer/validate pair.
    """

    def __init__(
        self,
        db_path: Path,
        engine: Engine | None,
        grammar: OutputSpec | str,
        sampling: SamplingParams,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.db_path = db_path
        self.engine = engine
        self.grammar = grammar
        self.sampling = sampling
        self.policy = policy or RetryPolicy(
            initial_interval=0.0, maximum_attempts=3, maximum_interval=0.0
        )
        self.work_ready = threading.Event()
        self.on_final: Callable[[str], None] | None = None

    # Activities ---------------------------------------------------------------

    def infer(self, store: Store, record_id: str) -> bool:
        """Run the model on a received ``log_event`` record and store its output."""
        row = store.get_record(record_id)
        if row is None or row["state"] != RecordState.RECEIVED:
            return False
        if self.engine is None:
            raise InferenceError("no model is loaded for log_event records", record_id)
        attempt = row["attempts"] + 1
        params = self.sampling
        if attempt > 1:
            params = SamplingParams(
                temperature=RETRY_TEMPERATURE,
                top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens,
                seed=attempt,
            )
        try:
            completion = self.engine.complete(
                build_messages(row["raw"]), self.grammar, params
            )
        except InferenceError as exc:
            exc.record_id = record_id
            return self._fail(
                store, record_id, RecordState.RECEIVED, "infer", attempt, exc, 0.0
            )

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
        if row is None or row["state"] != RecordState.INFERRED:
            return False
        started = time.perf_counter()
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
                row["attempts"],
                exc,
                time.perf_counter() - started,
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
                    row["attempts"],
                    time.perf_counter() - started,
                )
        return moved

    def decode_json(self, store: Store, record_id: str) -> bool:
        """Parse a received ``json`` record; it needs no model."""
        row = store.get_record(record_id)
        if row is None or row["state"] != RecordState.RECEIVED:
            return False
        try:
            data = json.loads(row["raw"])
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except ValueError as exc:
            error = InvalidOutputError(f"line is not a JSON object: {exc}", record_id)
            return self._dead(
                store, record_id, RecordState.RECEIVED, "decode", 1, error, 0.0
            )
        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                RecordState.RECEIVED,
                RecordState.VALIDATED,
                data=json.dumps(data, separators=(",", ":")),
                attempts=1,
            )
            if moved:
                store.add_event(
                    conn,
                    record_id,
                    "decode",
                    RecordState.RECEIVED,
                    RecordState.VALIDATED,
                    1,
                    0.0,
                )
        return moved

    def enqueue(self, store: Store, record_id: str) -> bool:
        """Put a validated record into the outbox."""
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
    ) -> bool:
        if not self.policy.allows_retry(attempt, error):
            return self._dead(store, record_id, state, step, attempt, error, duration)
        delay = self.policy.delay(attempt)
        with store.transaction() as conn:
            moved = store.move(
                conn,
                record_id,
                state,
                RecordState.RECEIVED,
                attempts=attempt,
                error=str(error),
                next_attempt_at=time.time() + delay,
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
                )
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
                )
        logger.warning(
            "record %s: dead after %s attempt %d: %s", record_id, step, attempt, error
        )
        if moved:
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
        store = Store(self.workflow.db_path)
        try:
            while not self.stop_event.is_set():
                jobs = self.select(store)
                if not jobs:
                    self.workflow.work_ready.wait(0.2)
                    self.workflow.work_ready.clear()
                    continue
                for record_id, activity in jobs:
                    if self.stop_event.is_set():
                        break
                    activity(store, record_id)
        except BaseException as exc:
            self.error = exc
            logger.exception("worker %s stopped by an unexpected error", self.name)
        finally:
            store.close()

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
