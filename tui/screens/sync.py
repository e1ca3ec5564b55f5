"""Sync: upload state, pending batches, recent results and rate-limit waits."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Static

from tui.formatting import format_age, format_clock, format_when
from tui.screens.base import RelayScreen
from tui.views import BatchView, SyncView
from tui.widgets import fill_table

PENDING_COLUMNS = ("Batch", "Created", "Records", "Tries", "Status", "Error")
RECENT_COLUMNS = ("Batch", "Delivered", "Tries", "Status")


class SyncScreen(RelayScreen):
    """Upload state of the outbox: counters, pending batches, recent deliveries."""

    MODE = "sync"
    POLL_INTERVAL = 1.0
    BINDINGS = [
        Binding("n", "sync_now", "Sync now"),
        Binding("p", "toggle_sync", "Pause/resume"),
    ]

    DEFAULT_CSS = """
    SyncScreen #sync-summary {
        height: auto;
        border: round $primary;
        padding: 0 1;
    }
    SyncScreen DataTable {
        height: 1fr;
        border: round $primary;
    }
    """

    def compose_body(self) -> Iterable[Widget]:
        summary = Static(id="sync-summary")
        summary.border_title = "Sync"
        yield summary
        pending: DataTable[str | Text] = DataTable(id="pending", cursor_type="row")
        pending.border_title = "Pending batches"
        pending.add_columns(*PENDING_COLUMNS)
        yield pending
        recent: DataTable[str | Text] = DataTable(id="recent", cursor_type="row")
        recent.border_title = "Recent deliveries"
        recent.add_columns(*RECENT_COLUMNS)
        yield recent

    def load(self) -> SyncView:
        return self.source.sync()

    def show(self, data: SyncView) -> None:
        now = self.source.clock()
        self.query_one("#sync-summary", Static).update(_summary(data, now))
        fill_table(
            self.query_one("#pending", DataTable),
            PENDING_COLUMNS,
            [(batch.batch_id, _pending_cells(batch)) for batch in data.pending],
        )
        fill_table(
            self.query_one("#recent", DataTable),
            RECENT_COLUMNS,
            [(batch.batch_id, _recent_cells(batch)) for batch in data.recent],
        )

    def action_toggle_sync(self) -> None:
        data: SyncView | None = self.data
        command = "sync_resume" if data is not None and data.paused else "sync_pause"
        self.send_command(
            command, "nothing to pause: only a running daemon syncs in the background"
        )


def _summary(data: SyncView, now: float) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="bold", no_wrap=True, min_width=12)
    table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    if not data.connection.live:
        state = "no daemon running"
    elif not data.upload_url:
        state = "off: no upload URL configured"
    else:
        state = "PAUSED" if data.paused else "running"
    table.add_row("State", f"{state}, {data.queued} queued")
    table.add_row(
        "Last success",
        f"{format_when(data.last_success_at, now)}, {data.batches_sent} batches sent",
    )
    table.add_row(
        "Waits",
        f"{format_age(data.rate_limit_wait_s)} rate-limited in total, "
        f"{data.retries} retries",
    )
    table.add_row(
        "Collector", f"{data.duplicates} duplicates, {data.rejected} rejected"
    )
    error = "none"
    if data.last_error:
        error = f"{format_when(data.last_error_at, now)} {data.last_error}"
    table.add_row("Last error", error)
    table.add_row("Upload URL", data.upload_url or "-")
    return table


def _status(batch: BatchView) -> str:
    return str(batch.last_status) if batch.last_status is not None else "-"


def _pending_cells(batch: BatchView) -> tuple[str | Text, ...]:
    return (
        batch.batch_id[:8],
        format_clock(batch.created_at),
        str(batch.records),
        str(batch.attempts),
        _status(batch),
        Text(batch.last_error or "", no_wrap=True, overflow="ellipsis"),
    )


def _recent_cells(batch: BatchView) -> tuple[str | Text, ...]:
    return (
        batch.batch_id[:8],
        format_clock(batch.delivered_at),
        str(batch.attempts),
        _status(batch),
    )
