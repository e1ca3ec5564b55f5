"""The polling screen every TUI screen builds on.

A screen reads its data in a Textual thread worker on a timer and draws the
result on the event loop when the worker finishes. A new read starts only
after the previous one finished, so a slow database or daemon slows the
refresh instead of piling up reads. Commands to the daemon run in workers
too, so screens do no file or socket I/O on the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import ComposeResult
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from tui.source import RelaySource
from tui.views import Connection
from tui.widgets import ConnectionLine, ScreenBar

if TYPE_CHECKING:
    from tui.app import RelayApp

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ActionResult:
    """The outcome of one command sent to the daemon, kept for tests and logs."""

    command: str
    ok: bool
    message: str


class RelayScreen(Screen[None]):
    """A screen that reloads its data in a worker every ``POLL_INTERVAL`` seconds."""

    MODE: ClassVar[str | None] = None
    """Mode name of a top-level screen, highlighted in the screen bar."""
    POLL_INTERVAL: ClassVar[float] = 1.0
    """Seconds between reloads while the screen is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        """Reloads finished and drawn; tests wait on it."""
        self.data: Any = None
        """The newest data drawn."""
        self._loading = False
        self._timer: Timer | None = None
        self._last_load_error: str | None = None

    @property
    def relay(self) -> RelayApp:
        return self.app  # type: ignore[return-value]

    @property
    def source(self) -> RelaySource:
        return self.relay.source

    def compose(self) -> ComposeResult:
        yield ScreenBar(self.MODE)
        yield ConnectionLine()
        yield from self.compose_body()
        yield Footer(show_command_palette=False)

    def compose_body(self) -> Iterable[Widget]:
        """Yield the widgets between the connection line and the footer."""
        return ()

    def on_mount(self) -> None:
        self._timer = self.set_interval(self.POLL_INTERVAL, self.reload)
        self.app.theme_changed_signal.subscribe(self, self._on_theme_changed)
        self.reload()

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def on_screen_resume(self) -> None:
        if self._timer is not None:
            self._timer.resume()
        self.reload()

    def reload(self) -> None:
        """Start a read unless one is still running."""
        if self._loading or not self.ready_to_load():
            return
        self._loading = True
        self.run_worker(
            self.load,
            name=f"load {type(self).__name__}",
            group="load",
            thread=True,
            exit_on_error=False,
        )

    def ready_to_load(self) -> bool:
        """Return False to skip reloads, as a paused feed does."""
        return True

    def load(self) -> Any:
        """Read the screen's data; runs on a worker thread."""
        raise NotImplementedError

    def show(self, data: Any) -> None:
        """Draw data returned by ``load``; runs on the event loop."""
        raise NotImplementedError

    def restyle(self) -> None:
        """Redraw after a theme change, since cell colours come from the theme."""
        if self.data is not None:
            self.show(self.data)

    def _on_theme_changed(self, _theme: object) -> None:
        self.restyle()

    def on_resize(self) -> None:
        # Tables cut their last column to the screen's width.
        self.restyle()

    # Workers ------------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state not in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            return
        if worker.group == "load":
            self._load_finished(worker, event.state)
        elif worker.group == "action":
            self._action_finished(worker, event.state)

    def _load_finished(self, worker: Worker[Any], state: WorkerState) -> None:
        self._loading = False
        if state is WorkerState.SUCCESS:
            self._last_load_error = None
            self.relay.load_error = None
            self.data = worker.result
            connection = getattr(worker.result, "connection", None)
            if isinstance(connection, Connection):
                self.relay.connection = connection
            self.show(worker.result)
            self.loads += 1
        elif state is WorkerState.ERROR:
            message = f"reading {self.source.data_dir} failed: {worker.error}"
            self.relay.load_error = message
            # A failure repeats on every poll; report it once until a read works.
            if message != self._last_load_error:
                self._last_load_error = message
                logger.warning("%s", message)
                self.notify(message, severity="error", timeout=10)

    def send_command(self, command: str, shell_equivalent: str, **args: Any) -> None:
        """Send a control command in a worker, or explain why it cannot be sent.

        Args:
            command: the control command (docs/control.md).
            shell_equivalent: the CLI command that does the same, shown when no
                daemon is attached.
            args: the command's arguments.
        """
        connection = self.relay.connection
        if connection is None or not connection.live:
            reason = connection.reason if connection else "not connected yet"
            message = f"Read-only ({reason}). From a shell: {shell_equivalent}"
            self.relay.action_log.append(ActionResult(command, False, message))
            self.notify(message, title="Nothing sent", severity="warning", timeout=10)
            return
        self.run_worker(
            partial(self.source.call, command, **args),
            name=command,
            group="action",
            thread=True,
            exit_on_error=False,
        )

    def _action_finished(self, worker: Worker[Any], state: WorkerState) -> None:
        command = worker.name
        if state is WorkerState.SUCCESS:
            result = worker.result
            message = result if isinstance(result, str) else f"{command}: done"
            self.relay.action_log.append(ActionResult(command, True, message))
            logger.info("control command %s: %s", command, message)
            self.notify(message, title=command)
            self.action_finished(command, result)
            self.reload()
        elif state is WorkerState.ERROR:
            message = str(worker.error)
            self.relay.action_log.append(ActionResult(command, False, message))
            logger.warning("control command %s failed: %s", command, message)
            self.notify(
                message, title=f"{command} failed", severity="error", timeout=10
            )

    def action_finished(self, command: str, result: Any) -> None:
        """Called after a command succeeded; screens that show its result override it."""

    def action_sync_now(self) -> None:
        self.send_command(
            "sync_now",
            f"appliance sync --once --upload-url URL --data-dir {self.source.data_dir}",
        )
