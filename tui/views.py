"""Plain data the TUI screens display, filled by ``tui.source.RelaySource``."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Connection:
    """Whether a daemon serves the data directory, and how the TUI reads it."""

    live: bool
    """True when the daemon replied on its control socket, so actions can be sent."""
    reason: str
    """Reason the TUI is read-only, or empty when live."""
    pid: int | None = None
    """Process id of the daemon when live."""
    has_database: bool = True
    """False when the data directory has no ``appliance.db`` yet."""


@dataclasses.dataclass(frozen=True)
class LinkView:
    """One link's state and counters as the dashboard shows them."""

    name: str
    state: str
    """Connection state (``connected``, ``reconnecting``, ...), or ``-`` for a
    name with counters but no saved state, such as a replayed file."""
    transport: str
    protocol: str
    paused: bool
    """True after ``link_disconnect``: the daemon reads nothing from it."""
    messages_per_s: float
    """Records delivered per second (messages and lines) since the previous poll."""
    bytes_per_s: float
    errors: int
    """Sum of the counters in ``LINK_ERROR_COUNTERS``."""
    reconnects: int
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class LastError:
    """The newest failed step in any record's history."""

    at: float
    record_id: str
    step: str
    message: str


@dataclasses.dataclass(frozen=True)
class ReviewView:
    """The remote reviewer's queue, agreement and budget for the dashboard."""

    enabled: bool
    """The ``enabled`` setting the reviewer stored when it last started; False
    when review never ran in this data directory."""
    pending: int
    """Reviews waiting to be sent, including those requeued after a throttle."""
    agreement: float | None
    """Mean agreement (0 to 1) over the recent window, or None before the first
    finished review."""
    alert: bool
    """True when ``agreement`` is below ``[review] agreement_alert_below``."""
    budget_state: str
    """``unlimited``, ``ok`` or ``exhausted`` for today's spending."""
    pause_reason: str | None
    """Reason the reviewer sends nothing until a later time, or None."""


@dataclasses.dataclass(frozen=True)
class Dashboard:
    """Everything the dashboard screen shows, read in one poll."""

    connection: Connection
    links: list[LinkView]
    states: dict[str, int]
    """Record count per workflow state, every state present."""
    outbox_queued: int
    outbox_oldest_age_s: float | None
    outbox_full: bool
    last_sync_at: float | None
    sync_error: str | None
    sync_error_at: float | None
    sync_paused: bool | None
    """None when no daemon runs, because the flag exists only in the daemon."""
    upload_url: str | None
    last_error: LastError | None
    model: str | None
    tokens_per_s: float | None
    """Completion tokens per second over the last ``RECENT_INFERENCES`` model
    calls that were not answer-cache hits."""
    review: ReviewView


@dataclasses.dataclass(frozen=True)
class FeedRow:
    """One record in the live feed; ``key`` orders rows by arrival."""

    key: int
    """The record's SQLite rowid. SQLite gives a new row a higher rowid than
    every row present, so the feed reads arrivals by rowid. A record inserted
    right after the newest one was deleted could reuse its rowid and be
    missed; the outbox deletes only uploaded records, oldest first."""
    record_id: str
    link: str
    seq: int
    state: str
    received_at: float
    updated_at: float
    attempts: int
    severity: str | None
    """``severity`` of the validated data, if the record has one."""
    summary: str
    """The data's summary, else the error, else the start of the raw input."""


@dataclasses.dataclass(frozen=True)
class FeedBatch:
    """Feed rows read in one poll."""

    arrivals: list[FeedRow]
    """Records inserted since the previous poll, oldest first."""
    updates: list[FeedRow]
    """Current rows of records the feed already shows and asked about."""
    skipped: int
    """Arrivals left out because more than the fetch limit came in one poll."""
    cursor: int
    """The highest rowid seen; pass it to the next poll."""


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One event of a record's history (a step attempt, a retry, an upload)."""

    at: float
    step: str
    from_state: str | None
    to_state: str | None
    attempt: int
    duration_s: float
    error: str | None
    detail: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class RecordDetail:
    """One record with its whole history, for the record screen."""

    record_id: str
    link: str
    seq: int
    kind: str
    state: str
    attempts: int
    received_at: float
    updated_at: float
    raw: str
    data: Any
    """The validated JSON object, or None before validation."""
    output: str | None
    """Raw text of the model's latest output, stored on the record."""
    error: str | None
    history: list[HistoryEntry]
    prompt: list[dict[str, str]] | None
    """Chat messages for the raw line, rebuilt with the current prompt; None
    for records that skip the model."""
    trace_id: str | None
    """``trace_id`` from the newest event detail that has one; None until the
    daemon records traces."""


@dataclasses.dataclass(frozen=True)
class BatchView:
    """One upload batch."""

    batch_id: str
    created_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: float | None
    records: int | None
    """Records still queued in the batch; None for delivered batches."""


@dataclasses.dataclass(frozen=True)
class SyncView:
    """The sync screen's numbers and batches."""

    connection: Connection
    paused: bool | None
    upload_url: str | None
    queued: int
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    retries: int
    rate_limit_wait_s: float
    duplicates: int
    rejected: int
    batches_sent: int
    pending: list[BatchView]
    recent: list[BatchView]


@dataclasses.dataclass(frozen=True)
class DevicesView:
    """Links, paired devices and the latest port and BLE scan."""

    connection: Connection
    links: list[LinkView]
    paired: list[dict[str, str]]
    """Paired devices: ``device_id``, ``name``, ``created_at`` (never keys)."""
    paired_error: str | None
    serial: list[dict[str, Any]]
    ble: list[dict[str, Any]] | None
    """BLE devices of the last scan, or None when no scan ran yet."""
    ble_error: str | None


@dataclasses.dataclass(frozen=True)
class DeadLetters:
    """Dead records, newest first."""

    connection: Connection
    total: int
    rows: list[FeedRow]
