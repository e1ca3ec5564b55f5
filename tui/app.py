"""The Field Relay TUI: a Textual app over one data directory.

It attaches to the daemon through the control socket when one runs and reads
everything else from the SQLite database. Without a daemon it is read-only
and shows that on its connection line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive

from tui.screens.base import ActionResult
from tui.screens.dashboard import DashboardScreen
from tui.screens.dead import DeadLettersScreen
from tui.screens.devices import DevicesScreen
from tui.screens.feed import FeedScreen
from tui.screens.record import RecordScreen
from tui.screens.sync import SyncScreen
from tui.source import RelaySource
from tui.views import Connection
from tui.widgets import SCREENS

_SCREEN_KEYS = Binding.Group("Screens", compact=True)

LIGHT_THEME = "textual-light"
DARK_THEME = "textual-dark"


class RelayApp(App[None]):
    """Dashboard, live feed, record detail, sync, devices and dead letters.

    Args:
        data_dir: the daemon's data directory.
        clock: seconds since the epoch for ages on screen; tests pass a fixed one.
    """

    TITLE = "Field Relay"
    MODES = {
        "dashboard": DashboardScreen,
        "feed": FeedScreen,
        "sync": SyncScreen,
        "devices": DevicesScreen,
        "dead": DeadLettersScreen,
    }
    DEFAULT_MODE = "dashboard"
    BINDINGS = [
        *(
            Binding(key, f"switch_mode('{mode}')", title, group=_SCREEN_KEYS)
            for key, mode, title in SCREENS
        ),
        Binding("question_mark", "toggle_keys", "Keys", show=False),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+t", "toggle_theme", "Light or dark theme", show=False),
    ]

    connection: reactive[Connection | None] = reactive(None)
    """The newest connection state any screen read; the connection line shows it."""
    load_error: reactive[str | None] = reactive(None)
    """Error message of the current screen's last failed read; None after a read worked."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.source = RelaySource(data_dir, clock=clock)
        self.action_log: list[ActionResult] = []
        """Every command sent to the daemon, or refused, in order."""

    def open_record(self, record_id: str) -> None:
        """Show one record's detail screen over the current screen."""
        self.push_screen(RecordScreen(record_id))

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT_THEME if self.theme == DARK_THEME else DARK_THEME

    def action_toggle_keys(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()
