"""The reviewer thread, and ``drain`` for sending review work on demand.

``ReviewWorker`` runs beside the workflow workers in the daemon: each turn it
selects new review work and sends the next due review, or waits while the
endpoint is paused or nothing is due. ``drain`` does the same in the calling
thread, for ``appliance review`` and tests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config import ReviewConfig
from appliance.review import (
    ensure_schema,
    next_due,
    prune_request_log,
    save_settings,
    select_new,
)
from appliance.review_activity import Outcome, ReviewActivity
from appliance.reviewer_client import ReviewerClient, read_api_key
from appliance.store import Store

logger = logging.getLogger(__name__)

IDLE_POLL = 1.0
"""Seconds the worker waits when no review is due before selecting again."""


@dataclasses.dataclass
class DrainSummary:
    """Counts of outcomes of one ``drain`` call, by ``Outcome`` word."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped_by: str | None = None
    """Reason the drain ended before the queue was empty, or None."""

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1


def drain(
    store: Store,
    activity: ReviewActivity,
    config: ReviewConfig,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> DrainSummary:
    """Select new work, then send due reviews until none is due, ``limit``
    reviews are finished, the endpoint pauses or ``stop`` is set."""
    summary = DrainSummary()
    select_new(store, config)
    finished = 0
    while stop is None or not stop.is_set():
        if limit is not None and finished >= limit:
            break
        if activity.pause_remaining() > 0:
            summary.stopped_by = activity.pause_reason
            break
        record_id = next_due(store)
        if record_id is None:
            break
        outcome = activity.review(store, record_id)
        summary.add(outcome)
        if outcome in (Outcome.DONE, Outcome.FAILED):
            finished += 1
    return summary


def make_activity(
    config: ReviewConfig,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
    tracer: Any = None,
) -> ReviewActivity:
    """Build the client and activity from ``[review]`` settings.

    Raises:
        SetupError: the API key file is missing, empty or readable by others.
    """
    assert config.base_url is not None and config.model is not None
    client = ReviewerClient(
        config.base_url,
        config.model,
        api_key=read_api_key(config.api_key_file),
        max_tokens=config.max_tokens,
        timeout=config.timeout,
        structured_output=config.structured_output,
    )
    return ReviewActivity(config, client, clock=clock, stop=stop, tracer=tracer)


class ReviewWorker(threading.Thread):
    """Selects and sends review work until stopped, on its own connection.

    Args:
        db_path: the appliance database.
        activity: the review activity; its ``stop`` should be this worker's
            ``stop_event`` so a limiter wait ends on stop.
        config: the ``[review]`` settings.
    """

    def __init__(
        self, db_path: Path, activity: ReviewActivity, config: ReviewConfig
    ) -> None:
        super().__init__(name="reviewer", daemon=True)
        self.db_path = db_path
        self.activity = activity
        self.config = config
        self.stop_event = activity.stop or threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        store = Store(self.db_path, clock=self.activity.clock)
        try:
            ensure_schema(store)
            save_settings(store, self.config)
            with store.transaction() as conn:
                prune_request_log(conn, self.activity.clock())
            self.activity.restore(store)
            logger.info(
                "reviewer started: %s, model %s",
                self.activity.client.url,
                self.config.model,
            )
            while not self.stop_event.is_set():
                self._turn(store)
        except BaseException as exc:
            self.error = exc
            logger.exception("reviewer stopped by an unexpected error")
        finally:
            store.close()
            self.activity.client.close()

    def _turn(self, store: Store) -> None:
        select_new(store, self.config)
        pause = self.activity.pause_remaining()
        if pause > 0:
            self.stop_event.wait(min(pause, 5.0))
            return
        record_id = next_due(store)
        if record_id is None:
            self.stop_event.wait(IDLE_POLL)
            return
        self.activity.review(store, record_id)

    def stop(self) -> None:
        self.stop_event.set()
