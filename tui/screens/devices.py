"""Devices: links, paired devices, serial ports and a BLE scan."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from textual.binding import Binding
from textual.containers import Grid
from textual.widget import Widget
from textual.widgets import DataTable
from textual.worker import Worker, WorkerState

from tui.formatting import short_link
from tui.screens.base import RelayScreen
from tui.screens.dialogs import ConfirmScreen, NameScreen
from tui.views import DevicesView
from tui.widgets import fill_table, selected_key

BLE_SCAN_SECONDS = 5.0
"""Length of one BLE scan, the default of ``appliance scan``."""


TABLES = {
    "links": ("Links: c connect, d disconnect", ("Link", "State", "Transport")),
    "paired": ("Paired: a pair, f forget", ("Name", "Device id", "Paired")),
    "ports": ("Serial ports", ("Port", "USB id", "Description")),
    "ble": ("BLE: b scan", ("Address", "RSSI", "Name")),
}
"""Title and column headers of each table, by widget id."""


class DevicesScreen(RelayScreen):
    """Connect and disconnect links, pair and forget devices, find ports."""

    MODE = "devices"
    POLL_INTERVAL = 3.0
    BINDINGS = [
        Binding("c", "connect", "Connect"),
        Binding("d", "disconnect", "Disconnect"),
        Binding("a", "pair", "Pair"),
        Binding("f", "forget", "Forget"),
        Binding("b", "ble_scan", "BLE scan"),
    ]

    DEFAULT_CSS = """
    DevicesScreen #devices-grid {
        grid-size: 2 2;
        height: 1fr;
    }
    DevicesScreen DataTable {
        height: 1fr;
        border: round $primary;
    }
    DevicesScreen DataTable:focus {
        border: heavy $primary;
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.ble_devices: list[dict[str, Any]] | None = None
        """Devices found by the last BLE scan; None before the first scan."""
        self.ble_error: str | None = None
        self.scanning = False

    def compose_body(self) -> Iterable[Widget]:
        with Grid(id="devices-grid"):
            for table_id, (title, columns) in TABLES.items():
                table: DataTable[Any] = DataTable(id=table_id, cursor_type="row")
                table.border_title = title
                table.add_columns(*columns)
                yield table

    def load(self) -> DevicesView:
        return self.source.devices()

    def show(self, data: DevicesView) -> None:
        self._fill(
            "links",
            [
                (
                    link.name,
                    (
                        short_link(link.name),
                        "paused" if link.paused else link.state,
                        f"{link.transport}/{link.protocol}",
                    ),
                )
                # Counters of a replayed file look like a link without a
                # transport; only real links can be connected.
                for link in data.links
                if link.transport != "-"
            ],
        )
        paired = [
            (
                device["device_id"],
                (
                    device["name"],
                    device["device_id"],
                    device["created_at"][:16].replace("T", " "),
                ),
            )
            for device in data.paired
        ]
        self._fill("paired", paired)
        self._table("paired").border_subtitle = data.paired_error or ""
        ports = [
            (
                port["device"],
                (port["device"], _usb_id(port), port.get("description") or ""),
            )
            for port in data.serial
        ]
        self._fill("ports", ports)
        self._show_ble()

    def _show_ble(self) -> None:
        table = self._table("ble")
        if self.scanning:
            table.border_subtitle = f"scanning for {BLE_SCAN_SECONDS:g} s…"
        elif self.ble_error:
            table.border_subtitle = self.ble_error
        elif self.ble_devices is None:
            table.border_subtitle = "not scanned yet"
        else:
            table.border_subtitle = f"{len(self.ble_devices)} found"
        rows = [
            (
                str(device["address"]),
                (
                    str(device["address"]),
                    str(device.get("rssi")),
                    device.get("name") or "",
                ),
            )
            for device in self.ble_devices or []
        ]
        self._fill("ble", rows)

    def _fill(self, table_id: str, rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
        fill_table(self._table(table_id), TABLES[table_id][1], rows)

    def _table(self, table_id: str) -> DataTable[Any]:
        return self.query_one(f"#{table_id}", DataTable)

    # Actions ------------------------------------------------------------------

    def action_connect(self) -> None:
        self._link_command("link_connect")

    def action_disconnect(self) -> None:
        self._link_command("link_disconnect")

    def _link_command(self, command: str) -> None:
        name = selected_key(self._table("links"))
        if name is None:
            self.notify("No link is selected.", severity="warning")
            return
        self.send_command(
            command,
            f"appliance control {command} name={name} (needs a running daemon)",
            name=name,
        )

    def action_pair(self) -> None:
        def answered(name: str | None) -> None:
            if name:
                self.send_command(
                    "pair",
                    f"appliance pair {name} --export {name}.json "
                    f"--data-dir {self.source.data_dir}",
                    name=name,
                )

        self.app.push_screen(
            NameScreen("Name of the device to pair:", "pump-3"), answered
        )

    def action_forget(self) -> None:
        device_id = selected_key(self._table("paired"))
        if device_id is None:
            self.notify("No paired device is selected.", severity="warning")
            return

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self.send_command(
                    "unpair",
                    f"appliance unpair {device_id} --data-dir {self.source.data_dir}",
                    device=device_id,
                )

        self.app.push_screen(
            ConfirmScreen(
                f"Forget device {device_id}? Its next handshake will be rejected."
            ),
            answered,
        )

    def action_ble_scan(self) -> None:
        if self.scanning:
            return
        self.scanning = True
        self._show_ble()
        self.run_worker(
            lambda: self.source.ble_scan(BLE_SCAN_SECONDS),
            name="ble_scan",
            group="scan",
            thread=True,
            exit_on_error=False,
        )

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "scan":
            return
        result = event.worker.result
        if event.state is WorkerState.SUCCESS and result is not None:
            self.ble_devices, self.ble_error = result
        elif event.state is WorkerState.ERROR:
            self.ble_devices, self.ble_error = [], str(event.worker.error)
        else:
            return
        self.scanning = False
        self._show_ble()


def _usb_id(port: dict[str, Any]) -> str:
    if port.get("vid") and port.get("pid"):
        return f"{port['vid']}:{port['pid']}"
    return ""
