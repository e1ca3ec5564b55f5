"""`appliance control`: send one command to the running daemon's control socket.

Every action of the TUI goes through the same socket, so a headless box can do
all of them from a shell: `appliance control sync_now`, `appliance control
retry id=3f2a`, `appliance control link_disconnect name=pump-a`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.control import ControlClient
from appliance.errors import ApplianceError
from appliance.paths import default_data_dir


def _parse(pairs: tuple[str, ...]) -> dict[str, object]:
    args: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"argument {pair!r} is not KEY=VALUE")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


@click.command("control")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Data directory of the running daemon.",
)
@click.argument("command")
@click.argument("args", nargs=-1)
def control_command(data_dir: Path, command: str, args: tuple[str, ...]) -> None:
    """Send COMMAND with KEY=VALUE ARGS to the running daemon and print the result
    as JSON. `appliance control commands` lists the commands."""
    try:
        with ControlClient(data_dir) as client:
            result = client.call(command, **_parse(args))
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if isinstance(result, str):
        click.echo(result)
    else:
        click.echo(json.dumps(result, indent=2, default=str))
