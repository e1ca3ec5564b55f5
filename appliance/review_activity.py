"""The review activity: one request to the reviewer and what to do with its result.

The activity runs on its own thread (``appliance.review_worker``) with its own
database connection and holds the write lock only for short commits, never
during an HTTP request, so a slow, throttled or unreachable endpoint delays no
inference, validation or upload.

Outcomes of one request, and what happens to the review's row:

- a 2xx response with a valid record: the reviewer's record, verdicts, usage
  and cost are committed together with a ``review`` event in the record's
  history;
- 429 or 503: requeued after ``Retry-After`` (or a doubling backoff without it),
  counted in ``throttled``, not in ``attempts``; the endpoint pauses as long;
- no connection: the row is left as it is and the endpoint pauses with a
  doubling backoff, so offline work waits without using up attempts;
- 401, 403, 404 or a rejected schema: the endpoint pauses for
  ``SETUP_PAUSE`` seconds with the reason shown in status;
- anything else, invalid reviewer output included: ``REVIEW_POLICY`` decides
  between a later attempt and ``failed``.

Every request, with or without a response, is logged in ``review_requests``
with the tokens it reserved, so the daily budget and, after a restart, the
limiter's window are rebuilt from the database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.config import ReviewConfig
from appliance.errors import ApplianceError, InvalidOutputError
from appliance.inference import Completion, SamplingParams
from appliance.prompts import build_messages
from appliance.rate_limit import WINDOW_SECONDS, SlidingWindowLimiter
from appliance.retry import RetryPolicy
from appliance.review import (
    ReviewState,
    compare_records,
    day_start,
    request_cost,
    review_state,
    set_review_state,
    spent_today,
)
from appliance.reviewer_client import (
    ReviewerCallError,
    ReviewerClient,
    ReviewerCompletion,
    ReviewerError,
    ReviewerSetupError,
    ReviewerThrottledError,
    ReviewerUnreachableError,
    StructuredOutputRejectedError,
)
from appliance.store import Store
from appliance.sync import MAX_RETRY_WAIT, MIN_RETRY_WAIT
from appliance.workflow import parse_log_event

logger = logging.getLogger(__name__)

REVIEW_POLICY = RetryPolicy(
    initial_interval=30.0,
    backoff_coefficient=2.0,
    maximum_interval=1800.0,
    maximum_attempts=4,
)
"""Policy of ``review`` for server errors, timeouts and invalid reviewer output.
Throttles and lost connections are not attempts, so this only counts responses
that went wrong."""
THROTTLE_INITIAL_WAIT = 2.0
"""Seconds a 429 or 503 without ``Retry-After`` pauses the endpoint, doubling
with each throttle in a row up to ``THROTTLE_MAXIMUM_WAIT``."""
THROTTLE_MAXIMUM_WAIT = 120.0
UNREACHABLE_INITIAL_WAIT = 1.0
"""Seconds between connection tries while the endpoint is unreachable, doubling
up to ``UNREACHABLE_MAXIMUM_WAIT``."""
UNREACHABLE_MAXIMUM_WAIT = 60.0
SETUP_PAUSE = 300.0
"""Seconds review pauses after a 401, 403, 404 or rejected schema, so that a
wrong key is not retried in a loop. Fixing the setting needs a restart anyway."""


class Outcome:
    """Result words of one call of ``ReviewActivity.review``."""

    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"
    THROTTLED = "throttled"
    UNREACHABLE = "unreachable"
    PAUSED = "paused"
    BUDGET = "budget"
    STOPPED = "stopped"
    SKIPPED = "skipped"


class ReviewActivity:
    """Sends one review request at a time under the limits and the budget.

    Args:
        config: the ``[review]`` settings.
        client: the endpoint's client.
        limiter: requests and tokens per minute; built from ``config`` when None.
        clock: wall-clock seconds; must be the clock of the stores passed in.
        stop: set to end a limiter wait early.
        sleep: waits for the limiter when ``stop`` is None (tests pass a fake).
        tracer: the daemon's telemetry, whose ``model_call`` traces each
            request as a span of the record's trace; None traces nothing.
    """

    def __init__(
        self,
        config: ReviewConfig,
        client: ReviewerClient,
        limiter: SlidingWindowLimiter | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        sleep: Callable[[float], None] = time.sleep,
        tracer: Any = None,
    ) -> None:
        self.config = config
        self.tracer = tracer
        self.client = client
        self.limiter = limiter or SlidingWindowLimiter(
            config.requests_per_minute, config.tokens_per_minute, unit="token"
        )
        self.clock = clock
        self.stop = stop
        self.sleep = sleep
        self.paused_until = 0.0
        """Wall-clock time before which no request is sent (throttle, offline)."""
        self.pause_reason: str | None = None
        self._throttles_in_row = 0
        self._unreachable_in_row = 0

    def pause_remaining(self) -> float:
        """Return the seconds left in the current pause, 0 when not paused."""
        return max(0.0, self.paused_until - self.clock())

    def restore(self, store: Store) -> None:
        """Restore what a restart would forget: the requests of the last minute,
        counted into the limiter, and a throttle pause that has not ended."""
        now = self.clock()
        state = review_state(store)
        paused_until = float(state.get("paused_until") or 0.0)
        reason = state.get("pause_reason") or ""
        if paused_until > now and reason.startswith("throttled"):
            self.paused_until = paused_until
            self.pause_reason = reason
        rows = store.query(
            "SELECT at, reserved_tokens FROM review_requests WHERE at > ? ORDER BY at",
            (now - WINDOW_SECONDS,),
        )
        for row in rows:
            self.limiter.record(row["reserved_tokens"], age=max(0.0, now - row["at"]))

    def review(self, store: Store, record_id: str) -> str:
        """Send the review of ``record_id`` if due and store what comes back.

        Returns an ``Outcome`` word. Raises only ``StoreError``.
        """
        row = self._load(store, record_id)
        if row is None:
            return Outcome.SKIPPED
        if self.pause_remaining() > 0:
            return Outcome.PAUSED
        if row["raw"] is None:
            self._finish_failed(store, row, "the record was deleted before review")
            return Outcome.FAILED

        messages = build_messages(row["raw"])
        reserved = self.client.estimate_tokens(messages)
        if self._over_budget(store, reserved):
            return Outcome.BUDGET
        self.limiter.acquire(reserved, self.stop, self.sleep)
        if self.stop is not None and self.stop.is_set():
            return Outcome.STOPPED

        sent_at = self.clock()
        try:
            reply = self._call(record_id, messages)
        except ReviewerError as exc:
            return self._handle_error(store, row, exc, sent_at, reserved)
        self._throttles_in_row = self._unreachable_in_row = 0
        self._clear_pause(store)
        return self._store_reply(store, row, reply, sent_at, reserved)

    def _call(
        self, record_id: str, messages: list[dict[str, str]]
    ) -> ReviewerCompletion:
        """Send the request, inside a ``model_call`` span when a tracer is set."""
        if self.tracer is None:
            return self.client.complete(messages)
        params = SamplingParams(temperature=0.0, max_tokens=self.client.max_tokens)
        with self.tracer.model_call(
            record_id, self.client.model, messages, params, None
        ) as call:
            reply = self.client.complete(messages)
            call.completion = Completion(
                reply.text,
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.finish_reason,
                reply.duration,
            )
            cost = request_cost(
                self.config, reply.prompt_tokens, reply.completion_tokens
            )
            _annotate_current_span(
                {
                    "field_relay.review.cost": cost,
                    "field_relay.review.structured_output": reply.structured_output,
                    "server.address": self.client.url,
                }
            )
        return reply

    # Answers -------------------------------------------------------------------

    def _store_reply(
        self,
        store: Store,
        row: dict,
        reply: ReviewerCompletion,
        sent_at: float,
        reserved: int,
    ) -> str:
        record_id = row["record_id"]
        cost = request_cost(self.config, reply.prompt_tokens, reply.completion_tokens)
        try:
            data = parse_log_event(
                reply.text, truncated=reply.finish_reason == "length"
            )
        except InvalidOutputError as exc:
            exc.record_id = record_id
            return self._retry_or_fail(
                store, row, exc, sent_at, reserved, reply=reply, cost=cost
            )

        local = json.loads(row["local_data"]) if row["local_data"] else None
        verdicts, agreement = compare_records(local, data)
        attempt = row["attempts"] + 1
        detail = self._call_detail(reply, cost, attempt)
        detail |= {"agreement": agreement, "verdicts": verdicts}
        with store.transaction() as conn:
            self._log_request(
                conn, record_id, sent_at, reserved, 200, "done", reply, cost
            )
            conn.execute(
                "UPDATE reviews SET state = ?, attempts = ?, updated_at = ?,"
                " reviewed_at = ?, last_error = NULL, review_data = ?, verdicts = ?,"
                " agreement = ?, reviewer_model = ?, structured_output = ?,"
                " prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?, cost = cost + ?"
                " WHERE record_id = ?",
                (
                    str(ReviewState.DONE),
                    attempt,
                    self.clock(),
                    self.clock(),
                    json.dumps(data, separators=(",", ":")),
                    json.dumps(verdicts),
                    agreement,
                    reply.model,
                    reply.structured_output,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    cost,
                    record_id,
                ),
            )
            store.add_event(
                conn,
                record_id,
                "review",
                None,
                None,
                attempt,
                reply.duration,
                detail=detail,
            )
        logger.info(
            "record %s: reviewed by %s (%s), agreement %s, %d+%d tokens, cost %.6f",
            record_id,
            reply.model,
            row["reason"],
            "n/a" if agreement is None else f"{agreement:.2f}",
            reply.prompt_tokens,
            reply.completion_tokens,
            cost,
        )
        return Outcome.DONE

    def _call_detail(
        self, reply: ReviewerCompletion, cost: float, attempt: int
    ) -> dict:
        """Return the ``review`` event's detail: the call's model, usage and cost,
        named as in the OpenTelemetry GenAI conventions where a name exists."""
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": self.client.model,
            "gen_ai.response.model": reply.model,
            "gen_ai.request.max_tokens": self.client.max_tokens,
            "gen_ai.usage.input_tokens": reply.prompt_tokens,
            "gen_ai.usage.output_tokens": reply.completion_tokens,
            "usage_estimated": reply.usage_estimated,
            "cost": round(cost, 8),
            "structured_output": reply.structured_output,
            "finish_reason": reply.finish_reason,
            "attempt": attempt,
            "server.address": self.client.url,
        }

    # Failures ------------------------------------------------------------------

    def _handle_error(
        self,
        store: Store,
        row: dict,
        error: ReviewerError,
        sent_at: float,
        reserved: int,
    ) -> str:
        record_id = row["record_id"]
        if isinstance(error, ReviewerThrottledError):
            return self._throttled(store, row, error, sent_at, reserved)
        if isinstance(error, ReviewerUnreachableError):
            self._log_only(store, record_id, sent_at, reserved, None, "unreachable")
            self._unreachable_in_row += 1
            wait = min(
                UNREACHABLE_MAXIMUM_WAIT,
                UNREACHABLE_INITIAL_WAIT * 2 ** (self._unreachable_in_row - 1),
            )
            if self._unreachable_in_row == 1:
                logger.info(
                    "reviewer %s unreachable; review work waits: %s",
                    self.client.url,
                    error,
                )
            self._pause(store, wait, f"endpoint unreachable: {error}")
            return Outcome.UNREACHABLE
        if isinstance(error, StructuredOutputRejectedError):
            self._log_only(
                store, record_id, sent_at, reserved, error.status, "format_rejected"
            )
            return Outcome.RETRY
        if isinstance(error, ReviewerSetupError):
            self._log_only(store, record_id, sent_at, reserved, error.status, "setup")
            logger.error("review paused for %.0f s: %s", SETUP_PAUSE, error)
            self._pause(store, SETUP_PAUSE, str(error))
            return Outcome.PAUSED
        assert isinstance(error, ReviewerCallError)
        return self._retry_or_fail(store, row, error, sent_at, reserved)

    def _throttled(
        self,
        store: Store,
        row: dict,
        error: ReviewerThrottledError,
        sent_at: float,
        reserved: int,
    ) -> str:
        self._throttles_in_row += 1
        if error.retry_after is not None:
            wait = min(max(error.retry_after, MIN_RETRY_WAIT), MAX_RETRY_WAIT)
        else:
            wait = min(
                THROTTLE_MAXIMUM_WAIT,
                THROTTLE_INITIAL_WAIT * 2 ** (self._throttles_in_row - 1),
            )
        record_id = row["record_id"]
        with store.transaction() as conn:
            self._log_request(
                conn, record_id, sent_at, reserved, error.status, "throttled"
            )
            conn.execute(
                "UPDATE reviews SET throttled = throttled + 1, next_attempt_at = ?,"
                " updated_at = ?, last_error = ? WHERE record_id = ?",
                (self.clock() + wait, self.clock(), str(error)[:500], record_id),
            )
        logger.warning(
            "record %s: reviewer returned HTTP %s, requeued for %.1f s",
            record_id,
            error.status,
            wait,
        )
        self._pause(store, wait, f"throttled (HTTP {error.status})")
        return Outcome.THROTTLED

    def _retry_or_fail(
        self,
        store: Store,
        row: dict,
        error: ApplianceError,
        sent_at: float,
        reserved: int,
        reply: ReviewerCompletion | None = None,
        cost: float = 0.0,
    ) -> str:
        record_id = row["record_id"]
        attempt = row["attempts"] + 1
        retry = REVIEW_POLICY.allows_retry(attempt, error)
        state = ReviewState.PENDING if retry else ReviewState.FAILED
        delay = REVIEW_POLICY.delay(attempt) if retry else 0.0
        status = getattr(error, "status", None) if reply is None else 200
        detail = self._call_detail(reply, cost, attempt) if reply is not None else None
        with store.transaction() as conn:
            self._log_request(
                conn, record_id, sent_at, reserved, status, "error", reply, cost
            )
            conn.execute(
                "UPDATE reviews SET state = ?, attempts = ?, next_attempt_at = ?,"
                " updated_at = ?, last_error = ?,"
                " prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?, cost = cost + ?"
                " WHERE record_id = ?",
                (
                    str(state),
                    attempt,
                    self.clock() + delay,
                    self.clock(),
                    str(error)[:500],
                    reply.prompt_tokens if reply else 0,
                    reply.completion_tokens if reply else 0,
                    cost,
                    record_id,
                ),
            )
            store.add_event(
                conn,
                record_id,
                "review",
                None,
                None,
                attempt,
                reply.duration if reply else self.clock() - sent_at,
                error=str(error)[:500],
                detail=detail,
            )
        if retry:
            logger.warning(
                "record %s: review attempt %d failed, retrying in %.0f s: %s",
                record_id,
                attempt,
                delay,
                error,
            )
            return Outcome.RETRY
        logger.warning(
            "record %s: review failed after %d attempts: %s", record_id, attempt, error
        )
        return Outcome.FAILED

    def _finish_failed(self, store: Store, row: dict, reason: str) -> None:
        with store.transaction() as conn:
            conn.execute(
                "UPDATE reviews SET state = ?, updated_at = ?, last_error = ?"
                " WHERE record_id = ?",
                (str(ReviewState.FAILED), self.clock(), reason, row["record_id"]),
            )
        logger.warning("record %s: review failed: %s", row["record_id"], reason)

    # Budget and pauses ---------------------------------------------------------

    def _over_budget(self, store: Store, reserved: int) -> bool:
        """Stop review when the next request could take today's spending past
        ``daily_budget``. The worst case prices the estimated prompt as prompt
        tokens and ``max_tokens`` as completion tokens."""
        budget = self.config.daily_budget
        if budget <= 0:
            return False
        now = self.clock()
        spent = spent_today(store, now)
        prompt = reserved - self.client.max_tokens
        worst = request_cost(self.config, prompt, self.client.max_tokens)
        if spent + worst <= budget:
            return False
        resume = day_start(now) + 86400
        reason = (
            f"daily budget of {budget:g} reached: {spent:.4f} spent today (UTC) and "
            f"the next request could cost up to {worst:.4f}; review resumes at "
            "00:00 UTC, or at a restart after [review] daily_budget is raised"
        )
        if self.pause_reason != reason:
            logger.warning("review stopped: %s", reason)
        self._pause(store, resume - now, reason, budget=True)
        return True

    def _pause(
        self, store: Store, seconds: float, reason: str, budget: bool = False
    ) -> None:
        self.paused_until = self.clock() + seconds
        self.pause_reason = reason
        with store.transaction() as conn:
            set_review_state(
                conn,
                paused_until=self.paused_until,
                pause_reason=reason,
                budget_stopped_until=self.paused_until if budget else None,
            )

    def _clear_pause(self, store: Store) -> None:
        if self.pause_reason is None:
            return
        logger.info("reviewer %s responds again; review resumes", self.client.url)
        self.paused_until = 0.0
        self.pause_reason = None
        with store.transaction() as conn:
            set_review_state(
                conn, paused_until=None, pause_reason=None, budget_stopped_until=None
            )

    # Database ------------------------------------------------------------------

    def _load(self, store: Store, record_id: str) -> dict | None:
        rows = store.query(
            "SELECT v.*, r.raw FROM reviews v LEFT JOIN records r ON r.id = v.record_id"
            " WHERE v.record_id = ?",
            (record_id,),
        )
        if not rows:
            return None
        row = dict(rows[0])
        if row["state"] != ReviewState.PENDING or row["next_attempt_at"] > self.clock():
            return None
        return row

    def _log_request(
        self,
        conn,
        record_id: str,
        sent_at: float,
        reserved: int,
        status: int | None,
        outcome: str,
        reply: ReviewerCompletion | None = None,
        cost: float = 0.0,
    ) -> None:
        conn.execute(
            "INSERT INTO review_requests (record_id, at, reserved_tokens, status,"
            " outcome, prompt_tokens, completion_tokens, cost, duration)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record_id,
                sent_at,
                reserved,
                status,
                outcome,
                reply.prompt_tokens if reply else 0,
                reply.completion_tokens if reply else 0,
                cost,
                self.clock() - sent_at,
            ),
        )

    def _log_only(
        self,
        store: Store,
        record_id: str,
        sent_at: float,
        reserved: int,
        status: int | None,
        outcome: str,
    ) -> None:
        with store.transaction() as conn:
            self._log_request(conn, record_id, sent_at, reserved, status, outcome)


def _annotate_current_span(attributes: dict[str, Any]) -> None:
    """Add attributes to the current OpenTelemetry span, if the SDK is installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return
    trace.get_current_span().set_attributes(attributes)
