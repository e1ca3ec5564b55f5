"""`appliance trace`: print one record's trace from the data directory."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from appliance.errors import ApplianceError
from appliance.paths import default_data_dir


@click.command("trace")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Directory holding the database and the telemetry spool.",
)
@click.option(
    "-a",
    "--attributes",
    is_flag=True,
    help="Print every span attribute, prompts and responses included when captured.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the spans as JSON lines.")
@click.argument("record_id")
def trace_command(
    data_dir: Path, attributes: bool, as_json: bool, record_id: str
) -> None:
    """Print the trace of record RECORD_ID (an id prefix is enough, or a trace id)
    as a tree of spans with start offsets and durations in seconds."""
    from appliance.telemetry_view import format_trace, load_trace, resolve_trace_id

    try:
        spans = load_trace(data_dir, resolve_trace_id(data_dir, record_id))
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        for span in spans:
            click.echo(json.dumps(dataclasses.asdict(span), ensure_ascii=False))
        return
    click.echo(format_trace(spans, attributes))
