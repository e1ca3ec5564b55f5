"""Live feed: records as they arrive, coloured by severity, with filters.

The feed keeps the newest ``FEED_BUFFER`` records in memory and redraws at
most ``FEED_SHOWN`` of them once per poll, however many arrived. A burst
therefore costs one bounded read and one bounded redraw per poll, and memory
stays flat at any record rate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Static

from appliance.states import RecordState
from tui.formatting import (
    SEVERITIES,
    format_clock,
    severity_text,
    short_id,
    short_link,
    state_text,
)
from tui.screens.base import RelayScreen
from tui.views import Connection, FeedBatch, FeedRow
from tui.widgets import fill_table, selected_key

FEED_BUFFER = 1000
"""Newest records kept in memory; the filters apply to these."""
FEED_SHOWN = 200
"""Rows drawn in the table, newest first, after filtering."""
ALL = "all"
NO_SEVERITY = "none"
"""Severity filter value for records without one (not validated yet, or JSON
records without a ``severity`` field)."""


_FILTER_KEYS = Binding.Group("Filters", compact=True)
COLUMNS = ("Time", "Id", "Link#seq", "State", "Severity", "Summary")


class FeedScreen(RelayScreen):
    """Records as they arrive, newest first."""

    MODE = "feed"
    POLL_INTERVAL = 0.5
    BINDINGS = [
        Binding("enter", "inspect", "Inspect", priority=True),
        Binding("l", "cycle_link", "Link", group=_FILTER_KEYS),
        Binding("s", "cycle_state", "State", group=_FILTER_KEYS),
        Binding("v", "cycle_severity", "Severity", group=_FILTER_KEYS),
        Binding("c", "clear_filters", "Clear filters", group=_FILTER_KEYS),
        Binding("space", "toggle_pause", "Pause"),
    ]

    DEFAULT_CSS = """
    FeedScreen #filters {
        height: 1;
        padding: 0 1;
        background: $boost;
    }
    FeedScreen #feed {
        height: 1fr;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.buffer: OrderedDict[str, FeedRow] = OrderedDict()
        """Newest records by id, oldest first, at most ``FEED_BUFFER``."""
        self.cursor = 0
        self.skipped = 0
        """Arrivals that came too fast to be read into the feed since it opened."""
        self.link_filter = ALL
        self.state_filter = ALL
        self.severity_filter = ALL
        self.paused = False

    def compose_body(self) -> Iterable[Widget]:
        yield Static(id="filters")
        table: DataTable[str | Text] = DataTable(id="feed", cursor_type="row")
        table.add_columns(*COLUMNS)
        yield table

    def ready_to_load(self) -> bool:
        return not self.paused

    def load(self) -> tuple[Connection, FeedBatch]:
        # This worker thread may read the buffer: ``show`` changes it only
        # after this read has finished, and the next read starts after that.
        #
        # Uploaded is the only state a record never leaves. A dead record can
        # be retried and a queued one uploaded, so both stay watched.
        watched = [
            record_id
            for record_id, row in self.buffer.items()
            if row.state != RecordState.UPLOADED
        ]
        connection, _ = self.source.probe()
        return connection, self.source.feed(self.cursor, watched)

    def show(self, data: tuple[Connection, FeedBatch]) -> None:
        connection, batch = data
        self.relay.connection = connection
        for row in batch.updates:
            if row.record_id in self.buffer:
                self.buffer[row.record_id] = row
        for row in batch.arrivals:
            self.buffer[row.record_id] = row
        while len(self.buffer) > FEED_BUFFER:
            self.buffer.popitem(last=False)
        self.cursor = batch.cursor
        self.skipped += batch.skipped
        self.redraw()

    def restyle(self) -> None:
        self.redraw()

    def visible_rows(self) -> list[FeedRow]:
        """Return the buffered rows that pass the filters, newest first."""
        matching = []
        for row in reversed(self.buffer.values()):
            if self._matches(row):
                matching.append(row)
                if len(matching) == FEED_SHOWN:
                    break
        return matching

    def _matches(self, row: FeedRow) -> bool:
        if self.link_filter != ALL and row.link != self.link_filter:
            return False
        if self.state_filter != ALL and row.state != self.state_filter:
            return False
        if self.severity_filter == ALL:
            return True
        return (row.severity or NO_SEVERITY) == self.severity_filter

    def redraw(self) -> None:
        colours = self.app.get_css_variables()
        table = self.query_one("#feed", DataTable)
        following = table.cursor_row == 0
        rows = [(row.record_id, _cells(row, colours)) for row in self.visible_rows()]
        fill_table(table, COLUMNS, rows)
        if following and rows:
            table.move_cursor(row=0, animate=False)
        self._show_filters(len(rows))

    def _show_filters(self, row_count: int) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        for key, name, value in (
            ("l", "link", self.link_filter),
            ("s", "state", self.state_filter),
            ("v", "severity", self.severity_filter),
        ):
            text.append(f"{key} ", style="bold")
            text.append(f"{name} ", style="dim")
            text.append(value, style="bold")
            text.append("  ")
        text.append(f"{row_count} of {len(self.buffer)} shown", style="dim")
        if self.skipped:
            text.append(f", {self.skipped} skipped in bursts", style="dim")
        if self.paused:
            text.append("  PAUSED", style="bold reverse")
        self.query_one("#filters", Static).update(text)

    # Actions ------------------------------------------------------------------

    def action_inspect(self) -> None:
        record_id = selected_key(self.query_one("#feed", DataTable))
        if record_id is not None:
            self.relay.open_record(record_id)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.relay.open_record(event.row_key.value)

    def action_cycle_link(self) -> None:
        links = sorted({row.link for row in self.buffer.values()})
        self.link_filter = _next_value(self.link_filter, [ALL, *links])
        self.redraw()

    def action_cycle_state(self) -> None:
        states = [str(state) for state in RecordState]
        self.state_filter = _next_value(self.state_filter, [ALL, *states])
        self.redraw()

    def action_cycle_severity(self) -> None:
        values = [ALL, *SEVERITIES, NO_SEVERITY]
        self.severity_filter = _next_value(self.severity_filter, values)
        self.redraw()

    def action_clear_filters(self) -> None:
        self.link_filter = self.state_filter = self.severity_filter = ALL
        self.redraw()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self._show_filters(self.query_one("#feed", DataTable).row_count)
        if not self.paused:
            self.reload()


def _next_value(current: str, values: list[str]) -> str:
    if current not in values:
        return values[0]
    return values[(values.index(current) + 1) % len(values)]


def _cells(row: FeedRow, colours: Mapping[str, str]) -> tuple[Any, ...]:
    summary_style = severity_text(row.severity, colours).style
    if row.severity in (None, "info"):
        summary_style = ""
    return (
        format_clock(row.received_at),
        short_id(row.record_id),
        f"{short_link(row.link)}#{row.seq}",
        state_text(row.state, colours),
        severity_text(row.severity, colours),
        Text(row.summary, style=summary_style, no_wrap=True, overflow="ellipsis"),
    )
