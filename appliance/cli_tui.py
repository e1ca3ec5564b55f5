"""`appliance tui`: the terminal UI over a data directory and its daemon."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from appliance.paths import default_data_dir


@click.command("tui")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Data directory of the daemon to watch.",
)
def tui_command(data_dir: Path) -> None:
    """Open the terminal UI: dashboard, live feed, record detail, sync, devices
    and dead letters. It attaches to the running daemon through its control
    socket. Without a daemon it opens the database read-only. Keys:
    docs/tui.md."""
    from textual.logging import TextualHandler

    from tui.app import RelayApp

    # Log lines written to the terminal would corrupt the screen, so they go to
    # Textual's devtools console instead (`textual console`).
    logging.basicConfig(level=logging.INFO, handlers=[TextualHandler()], force=True)
    RelayApp(data_dir).run()
