"""Record states of the durable workflow.

A record moves forward one committed transition at a time::

    received ─infer─▶ inferred ─validate─▶ validated ─enqueue─▶ queued ─sync─▶ uploaded
        ▲                 │
        └── retry ────────┘  (invalid output, within the retry policy)
    any non-final state ──▶ dead  (retries exhausted or a non-retryable error)

``queued``, ``uploaded`` and ``dead`` are final for the local pipeline: a run
with ``--max-records`` exits once every record it holds is in one of them.
"""

from __future__ import annotations

import enum


class RecordState(enum.StrEnum):
    """Position of a record in the workflow."""

    RECEIVED = "received"
    """Committed on arrival with its raw line; waiting for inference."""
    INFERRED = "inferred"
    """Raw model output stored; waiting for parsing and validation."""
    VALIDATED = "validated"
    """Validated object stored; waiting to enter the outbox."""
    QUEUED = "queued"
    """In the outbox, waiting for upload."""
    UPLOADED = "uploaded"
    """Accepted by the sink."""
    DEAD = "dead"
    """Given up; ``error`` contains the reason and the history every attempt."""


FINAL_STATES = frozenset({RecordState.QUEUED, RecordState.UPLOADED, RecordState.DEAD})
"""States in which the local pipeline has finished with a record."""


class RecordKind(enum.StrEnum):
    """What a record's raw line holds, which decides its first step."""

    LOG_EVENT = "log_event"
    """A free-text log line; the model turns it into a ``log_event`` object."""
    JSON = "json"
    """A line that is already a JSON object; it is parsed, not inferred."""
