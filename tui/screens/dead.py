"""Dead letters: records the workflow gave up on, with retry."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Static

from tui.formatting import format_clock, short_id, short_link
from tui.screens.base import RelayScreen
from tui.screens.dialogs import ConfirmScreen
from tui.views import DeadLetters
from tui.widgets import fill_table, selected_key

COLUMNS = ("Died", "Id", "Link#seq", "Tries", "Error")


class DeadLettersScreen(RelayScreen):
    """Dead records, newest first; Enter shows why a record died."""

    MODE = "dead"
    POLL_INTERVAL = 1.0
    BINDINGS = [
        Binding("enter", "inspect", "Inspect", priority=True),
        Binding("r", "retry", "Retry"),
        Binding("a", "retry_all", "Retry all"),
        Binding("n", "sync_now", "Sync now"),
    ]

    DEFAULT_CSS = """
    DeadLettersScreen #dead-summary {
        height: 1;
        padding: 0 1;
        background: $boost;
    }
    DeadLettersScreen #dead {
        height: 1fr;
    }
    """

    def compose_body(self) -> Iterable[Widget]:
        yield Static("reading…", id="dead-summary")
        table: DataTable[str | Text] = DataTable(id="dead", cursor_type="row")
        table.add_columns(*COLUMNS)
        yield table

    def load(self) -> DeadLetters:
        return self.source.dead_letters()

    def show(self, data: DeadLetters) -> None:
        table = self.query_one("#dead", DataTable)
        rows = [
            (
                row.record_id,
                (
                    format_clock(row.updated_at),
                    short_id(row.record_id),
                    f"{short_link(row.link)}#{row.seq}",
                    str(row.attempts),
                    Text(row.summary, no_wrap=True, overflow="ellipsis"),
                ),
            )
            for row in data.rows
        ]
        fill_table(table, COLUMNS, rows)
        if data.total == 0:
            summary = "No dead records."
        elif data.total > len(data.rows):
            summary = f"{data.total} dead records, newest {len(data.rows)} shown."
        else:
            summary = f"{data.total} dead records. Enter shows why one failed."
        self.query_one("#dead-summary", Static).update(summary)

    def _selected(self) -> str | None:
        return selected_key(self.query_one("#dead", DataTable))

    def action_inspect(self) -> None:
        record_id = self._selected()
        if record_id is not None:
            self.relay.open_record(record_id)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.relay.open_record(event.row_key.value)

    def action_retry(self) -> None:
        record_id = self._selected()
        if record_id is None:
            self.notify("No dead record is selected.", severity="warning")
            return
        self.send_command(
            "retry",
            f"appliance retry {short_id(record_id)} --data-dir {self.source.data_dir}",
            id=record_id,
        )

    def action_retry_all(self) -> None:
        total = self.data.total if self.data else 0
        if total == 0:
            self.notify("There are no dead records to retry.", severity="warning")
            return

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self.send_command(
                    "retry",
                    f"appliance retry --all-dead --data-dir {self.source.data_dir}",
                    all_dead=True,
                )

        self.app.push_screen(
            ConfirmScreen(f"Put all {total} dead records back into the workflow?"),
            answered,
        )
