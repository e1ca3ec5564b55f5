"""Record detail: why a record is where it is, attempt by attempt."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from appliance.states import RecordState
from tui.formatting import format_clock, format_when, short_id, state_text
from tui.screens.base import RelayScreen
from tui.views import Connection, HistoryEntry, RecordDetail

TRACE_PLACEHOLDER = "not recorded (the daemon does not write trace ids yet)"
"""Shown where a trace id belongs until the daemon stores ``trace_id`` in
event details."""


class RecordScreen(RelayScreen):
    """One record: raw input, validated JSON, history, model output, prompt."""

    POLL_INTERVAL = 2.0
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("r", "retry", "Retry"),
        Binding("n", "sync_now", "Sync now"),
    ]

    DEFAULT_CSS = """
    RecordScreen #detail {
        height: 1fr;
    }
    RecordScreen .section {
        border: round $primary;
        padding: 0 1;
        height: auto;
    }
    RecordScreen #error {
        border: round $error;
    }
    RecordScreen #error.-none {
        display: none;
    }
    """

    def __init__(self, record_id: str) -> None:
        super().__init__()
        self.record_id = record_id

    def compose_body(self) -> Iterable[Widget]:
        with VerticalScroll(id="detail"):
            for section_id, title in (
                ("summary", "Record"),
                ("error", "Why it failed"),
                ("raw", "Raw input"),
                ("data", "Validated JSON"),
                ("history", "History: every step and attempt"),
                ("output", "Model output (raw)"),
                ("prompt", "Prompt (rebuilt from the raw input)"),
            ):
                section = Static(id=section_id, classes="section")
                section.border_title = title
                yield section

    def on_screen_resume(self) -> None:
        self.query_one("#detail", VerticalScroll).focus()

    def load(self) -> tuple[Connection, RecordDetail | None]:
        connection, _ = self.source.probe()
        return connection, self.source.record(self.record_id)

    def show(self, data: tuple[Connection, RecordDetail | None]) -> None:
        connection, record = data
        self.relay.connection = connection
        if record is None:
            self._section("summary").update(
                f"Record {self.record_id} is not in the database (any more)."
            )
            return
        colours = self.app.get_css_variables()
        now = self.source.clock()
        self._section("summary").update(_summary(record, colours, now))
        error = self._section("error")
        error.set_class(not record.error, "-none")
        error.update(Text(record.error or ""))
        self._section("raw").update(Text(record.raw))
        self._section("data").update(_json_text(record.data))
        self._section("history").update(_history_table(record.history))
        self._section("output").update(_outputs(record))
        self._section("prompt").update(_prompt(record))

    def _section(self, section_id: str) -> Static:
        return self.query_one(f"#{section_id}", Static)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_retry(self) -> None:
        record = self.data[1] if self.data else None
        if record is not None and record.state != RecordState.DEAD:
            self.notify(
                f"Record {short_id(self.record_id)} is {record.state}; only dead "
                "records can be retried.",
                severity="warning",
            )
            return
        self.send_command(
            "retry",
            f"appliance retry {short_id(self.record_id)} "
            f"--data-dir {self.source.data_dir}",
            id=self.record_id,
        )


def _summary(record: RecordDetail, colours: Mapping[str, str], now: float) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("Id", record.record_id)
    table.add_row("Trace id", record.trace_id or Text(TRACE_PLACEHOLDER, style="dim"))
    state = Text()
    state.append_text(state_text(record.state, colours))
    state.append(f"  attempts {record.attempts}, kind {record.kind}")
    table.add_row("State", state)
    table.add_row("Link", f"{record.link} #{record.seq}")
    table.add_row("Received", format_when(record.received_at, now))
    table.add_row("Updated", format_when(record.updated_at, now))
    return table


def _json_text(value: Any) -> RenderableType:
    if value is None:
        return Text("none: the record has not been validated", style="dim")
    return Text(json.dumps(value, indent=2, ensure_ascii=False))


def _history_table(history: list[HistoryEntry]) -> RenderableType:
    if not history:
        return Text("no events", style="dim")
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
    for column in ("Time", "Step", "From→to", "Try", "Took"):
        table.add_column(column, no_wrap=True)
    table.add_column("Error or detail", ratio=1)
    for entry in history:
        table.add_row(
            format_clock(entry.at),
            entry.step,
            f"{entry.from_state or '-'}→{entry.to_state or '-'}",
            str(entry.attempt),
            f"{entry.duration_s:.2f} s",
            _event_note(entry),
        )
    return table


def _event_note(entry: HistoryEntry) -> Text:
    if entry.error:
        return Text(entry.error, style="bold")
    detail = {k: v for k, v in (entry.detail or {}).items() if k != "output"}
    if not detail:
        return Text("")
    parts = [f"{key}={value}" for key, value in detail.items()]
    return Text(", ".join(parts), style="dim")


def _outputs(record: RecordDetail) -> RenderableType:
    """Return the stored output, then each attempt's output kept in the history."""
    parts: list[RenderableType] = []
    if record.output is not None:
        parts.append(Text("kept on the record:", style="bold"))
        parts.append(Text(record.output))
    for entry in record.history:
        output = (entry.detail or {}).get("output")
        if isinstance(output, str) and output != record.output:
            parts.append(Text(f"{entry.step} attempt {entry.attempt}:", style="bold"))
            parts.append(Text(output))
    if not parts:
        return Text("none: the model has not answered for this record", style="dim")
    return Group(*parts)


def _prompt(record: RecordDetail) -> RenderableType:
    if record.prompt is None:
        return Text(f"none: {record.kind} records skip the model", style="dim")
    parts: list[RenderableType] = [
        Text(
            "The daemon does not store prompts; this is the current prompt "
            "template applied to the raw input.",
            style="dim",
        )
    ]
    for message in record.prompt:
        parts.append(Text(f"{message['role']}:", style="bold"))
        parts.append(Text(message["content"]))
    return Group(*parts)
