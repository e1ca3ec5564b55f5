"""Dashboard: links, records per state, outbox, sync and the model at a glance."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import DataTable, Static

from tui.formatting import (
    format_age,
    format_rate,
    format_when,
    short_id,
    short_link,
    state_text,
)
from tui.screens.base import RelayScreen
from tui.views import Dashboard, ReviewView
from tui.widgets import fill_table

LINK_COLUMNS = (
    "Link",
    "State",
    "Transport",
    "Msg/s",
    "Bytes/s",
    "Err",
    "Reconn",
    "Last error",
)


class DashboardScreen(RelayScreen):
    """The first screen: is everything flowing, and where does it stop?"""

    MODE = "dashboard"
    POLL_INTERVAL = 1.0
    BINDINGS = [Binding("n", "sync_now", "Sync now")]

    DEFAULT_CSS = """
    DashboardScreen #top {
        height: 9;
    }
    DashboardScreen #records {
        width: 24;
        height: 100%;
        border: round $primary;
        padding: 0 1;
    }
    DashboardScreen #outbox {
        width: 1fr;
        border: round $primary;
        padding: 0 1;
    }
    DashboardScreen #links {
        height: 1fr;
        border: round $primary;
    }
    """

    def compose_body(self) -> Iterable[Widget]:
        with Horizontal(id="top"):
            records = Static(id="records")
            records.border_title = "Records"
            yield records
            outbox = Static(id="outbox")
            outbox.border_title = "Outbox and sync"
            yield outbox
        links: DataTable[str | Text] = DataTable(id="links", cursor_type="row")
        links.border_title = "Links"
        links.add_columns(*LINK_COLUMNS)
        yield links

    def load(self) -> Dashboard:
        return self.source.dashboard()

    def show(self, data: Dashboard) -> None:
        colours = self.app.get_css_variables()
        self.query_one("#records", Static).update(_records_table(data, colours))
        self.query_one("#outbox", Static).update(
            _outbox_table(data, self.source.clock())
        )
        links = self.query_one("#links", DataTable)
        links.border_title = "Links" if data.connection.live else "Links (last saved)"
        rows = [
            (
                link.name,
                (
                    short_link(link.name),
                    "paused" if link.paused else link.state,
                    link.transport,
                    format_rate(link.messages_per_s),
                    format_rate(link.bytes_per_s, "B"),
                    str(link.errors),
                    str(link.reconnects),
                    Text(link.last_error or "", no_wrap=True),
                ),
            )
            for link in data.links
        ]
        fill_table(links, LINK_COLUMNS, rows)


def _records_table(data: Dashboard, colours: dict[str, str]) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in data.states.items():
        table.add_row(state_text(state, colours), str(count))
    return table


def _outbox_table(data: Dashboard, now: float) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column("name", style="bold", no_wrap=True, min_width=10)
    # A ratio column gets the remaining width and cuts its text with an
    # ellipsis. Without a ratio, Rich lets a no_wrap column run past the edge.
    table.add_column("value", no_wrap=True, overflow="ellipsis", ratio=1)

    outbox = f"{data.outbox_queued} queued"
    if data.outbox_oldest_age_s is not None:
        outbox += f", oldest {format_age(data.outbox_oldest_age_s)}"
    if data.outbox_full:
        outbox += ", FULL: intake paused"
    table.add_row("Outbox", outbox)

    table.add_row("Last sync", format_when(data.last_sync_at, now))
    table.add_row("Sync", _sync_state(data))
    sync_error = "none"
    if data.sync_error:
        sync_error = f"{format_when(data.sync_error_at, now)} {data.sync_error}"
    table.add_row("Sync error", sync_error)

    last_error = "none"
    if data.last_error is not None:
        error = data.last_error
        last_error = (
            f"{format_when(error.at, now)} {error.step} "
            f"{short_id(error.record_id)}: {error.message}"
        )
    table.add_row("Last error", last_error)

    speed = "-" if data.tokens_per_s is None else f"{data.tokens_per_s:.1f}"
    table.add_row("Model", f"{speed} tokens/s, {data.model or 'none used yet'}")
    table.add_row("Review", review_text(data.review))
    return table


def review_text(review: ReviewView) -> str:
    """Summarize the reviewer in one line that fits the 80-column outbox box:
    pending reviews, recent agreement, then the pause or budget state."""
    if not review.enabled:
        return "review off"
    agreement = "n/a" if review.agreement is None else f"{review.agreement:.2f}"
    if review.alert:
        agreement += " LOW"
    if review.pause_reason:
        limit = f"paused: {review.pause_reason}"
    elif review.budget_state == "exhausted":
        limit = "budget exhausted"
    elif review.budget_state == "ok":
        limit = "budget ok"
    else:
        limit = "no budget cap"
    return f"{review.pending} pending, agreement {agreement}, {limit}"


def _sync_state(data: Dashboard) -> str:
    if not data.connection.live:
        return "no daemon running, nothing syncs"
    if not data.upload_url:
        return "no upload URL configured"
    return "paused" if data.sync_paused else f"on, to {data.upload_url}"
