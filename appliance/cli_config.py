"""`appliance config`: check, show and document the TOML configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.config import load_config, masked, reference_markdown, to_toml
from appliance.errors import ApplianceError

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@click.group("config")
def config_group() -> None:
    """Check, show and document the configuration file."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def check(file: Path) -> None:
    """Validate FILE (with environment overrides) and exit 1 on any problem."""
    try:
        config = load_config(file)
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{file}: valid, {len(config.links)} link(s)")


@config_group.command("show")
@click.option(
    "--config",
    "file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The file to read; without it, the defaults.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def show(file: Path | None, as_json: bool) -> None:
    """Print the effective settings, defaults filled in and secrets masked."""
    try:
        config = load_config(file)
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    data = masked(config)
    click.echo(json.dumps(data, indent=2) if as_json else to_toml(data), nl=False)
    if as_json:
        click.echo()


@config_group.command("docs")
@click.option(
    "--write", is_flag=True, help=f"Rewrite {DOCS_PATH.name} instead of printing."
)
def docs(write: bool) -> None:
    """Print (or write) docs/configuration.md, generated from the models."""
    text = reference_markdown()
    if write:
        DOCS_PATH.write_text(text, encoding="utf-8")
        click.echo(f"wrote {DOCS_PATH}")
    else:
        click.echo(text, nl=False)
