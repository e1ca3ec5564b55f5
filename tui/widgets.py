"""Widgets and table helpers that every TUI screen shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable, Static

from tui.views import Connection

SCREENS = (
    ("1", "dashboard", "Dashboard"),
    ("2", "feed", "Feed"),
    ("3", "sync", "Sync"),
    ("4", "devices", "Devices"),
    ("5", "dead", "Dead letters"),
)
"""Key, mode name and title of each top-level screen, in bar order."""


class ScreenBar(Static):
    """One line naming the screens and their keys, the current one highlighted."""

    DEFAULT_CSS = """
    ScreenBar {
        height: 1;
        background: $panel;
    }
    """

    def __init__(self, current: str | None) -> None:
        super().__init__(id="screen-bar")
        self.current = current

    def on_mount(self) -> None:
        self.update(self._render_bar())
        self.app.theme_changed_signal.subscribe(
            self, lambda _theme: self.update(self._render_bar())
        )

    def _render_bar(self) -> Text:
        colours = self.app.get_css_variables()
        key_style = f"bold {colours.get('text-accent', '')}"
        current_style = f"bold reverse {colours.get('text-primary', 'blue')}"
        bar = Text(no_wrap=True, overflow="ellipsis")
        for key, mode, title in SCREENS:
            bar.append(" ")
            bar.append(key, style=key_style)
            bar.append(
                f" {title} ", style=current_style if mode == self.current else ""
            )
        bar.append("   ")
        bar.append("?", style=key_style)
        bar.append(" all keys")
        return bar


class ConnectionLine(Static):
    """One line: attached to a daemon, read-only and why, or the last read error."""

    DEFAULT_CSS = """
    ConnectionLine {
        height: 1;
        padding: 0 1;
    }
    ConnectionLine.-live {
        color: $text-success;
    }
    ConnectionLine.-read-only {
        color: $text-warning;
    }
    ConnectionLine.-error {
        color: $text-error;
        text-style: bold;
    }
    """

    def __init__(self) -> None:
        super().__init__("connecting…", id="connection")

    def on_mount(self) -> None:
        self.watch(self.app, "connection", self._show, init=False)
        self.watch(self.app, "load_error", self._show, init=False)
        self._show()

    def _show(self, _value: object = None) -> None:
        data_dir: Path = self.app.data_dir  # type: ignore[attr-defined]
        connection: Connection | None = self.app.connection  # type: ignore[attr-defined]
        error: str | None = self.app.load_error  # type: ignore[attr-defined]
        self.set_class(error is not None, "-error")
        live = connection is not None and connection.live
        self.set_class(error is None and live, "-live")
        self.set_class(error is None and not live, "-read-only")
        if error is not None:
            self.update(Text(f"ERROR  {error}", no_wrap=True, overflow="ellipsis"))
        elif connection is None:
            self.update(f"connecting…  {data_dir}")
        elif connection.live:
            self.update(f"LIVE  daemon pid {connection.pid}  {data_dir}")
        elif not connection.has_database:
            self.update(
                f"READ-ONLY  {connection.reason}; no database yet in {data_dir}"
            )
        else:
            self.update(f"READ-ONLY  {connection.reason}; showing {data_dir}")


def selected_key(table: DataTable[Any]) -> str | None:
    """Return the row key under the table's cursor, or None for an empty table."""
    if table.row_count == 0:
        return None
    row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
    return row_key.value


SCROLLBAR_WIDTH = 2
"""Columns a DataTable's vertical scrollbar takes (Textual's default size),
reserved when the rows do not fit the table's height."""
MIN_LAST_COLUMN = 10
"""Narrowest the last column is cut to; a narrower table scrolls sideways."""


def fill_table(
    table: DataTable[Any],
    headers: Sequence[str],
    rows: Sequence[tuple[str, Sequence[Any]]],
    cut_last: bool = True,
) -> None:
    """Replace a table's rows, keeping the cursor on the same row key if it remains.

    Column widths are measured here and set as fixed widths. A DataTable left
    to size its own columns measures new rows only when it is next idle, and
    until then draws them cut to the header's width. With ``cut_last``, the
    last column is cut to the width the table has left, ending in an
    ellipsis, so a long error does not push the table into sideways scrolling.
    """
    cells_by_row = [list(cells) for _, cells in rows]
    widths = [
        max([cell_len(header), *(_cell_width(cells[index]) for cells in cells_by_row)])
        for index, header in enumerate(headers)
    ]
    if cut_last:
        _cut_last_column(table, headers, widths, cells_by_row)
    key = selected_key(table)
    index = table.cursor_row
    current = [column.width for column in table.ordered_columns]
    if current != widths:
        table.clear(columns=True)
        for header, width in zip(headers, widths, strict=True):
            table.add_column(header, width=width, key=header)
    else:
        table.clear()
    for (row_key, _), cells in zip(rows, cells_by_row, strict=True):
        table.add_row(*cells, key=row_key)
    if not rows:
        return
    keys = [row_key for row_key, _ in rows]
    target = keys.index(key) if key in keys else min(index, len(rows) - 1)
    table.move_cursor(row=target, animate=False)


def _cut_last_column(
    table: DataTable[Any],
    headers: Sequence[str],
    widths: list[int],
    cells_by_row: list[list[Any]],
) -> None:
    padding = 2 * table.cell_padding
    used = sum(width + padding for width in widths[:-1])
    if len(cells_by_row) + 1 > table.size.height:  # the rows and the header
        used += SCROLLBAR_WIDTH
    room = max(table.size.width - used - padding, MIN_LAST_COLUMN)
    for cells in cells_by_row:
        last = cells[-1]
        if not isinstance(last, Text):
            last = Text(str(last))
        last.no_wrap = True
        last.truncate(room, overflow="ellipsis")
        cells[-1] = last
    widths[-1] = max(min(widths[-1], room), cell_len(headers[-1]))


def _cell_width(cell: Any) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(str(cell))
