"""The CLI reference lists every command."""

from __future__ import annotations

import click

from appliance.cli import main
from tests.conftest import REPO_ROOT


def _command_names(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            names += _command_names(command, f"{prefix}{name} ")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_cli_reference_lists_every_command() -> None:
    text = (REPO_ROOT / "docs" / "cli.md").read_text()
    missing = [n for n in _command_names(main) if f"`appliance {n}" not in text]
    assert missing == []
