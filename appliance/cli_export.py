"""`appliance export` and `appliance import`: records on a USB stick instead of a network.

Both run while the daemon runs: export reads in short queries, and import
writes in transactions of its own, as ``appliance retry`` does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from appliance.errors import ApplianceError
from appliance.paths import default_data_dir
from appliance.states import RecordState

_DATA_DIR_HELP = "Data directory whose database is read or written."


class TimeParam(click.ParamType):
    """A ``--since``/``--until`` value: ISO 8601 (UTC unless zoned) or an age."""

    name = "TIME"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        from appliance.export_import import parse_time

        if isinstance(value, float):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command("export")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help=_DATA_DIR_HELP,
)
@click.option(
    "--since",
    type=TimeParam(),
    required=True,
    help="Export records received at or after TIME: ISO 8601 such as "
    "2026-12-01T08:00Z (UTC unless a zone is given), or an age such as 12h or 7d.",
)
@click.option(
    "--until",
    type=TimeParam(),
    help="Export records received before TIME, in the form of --since.",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([str(state) for state in RecordState]),
    help="Export records in this state; repeat for more. "
    "[default: queued, uploaded and dead]",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="NDJSON file to write, for example on a mounted USB stick.",
)
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
def export_command(
    data_dir: Path,
    since: float,
    until: float | None,
    states: tuple[str, ...],
    output: Path,
    force: bool,
) -> None:
    """Write records as NDJSON for a manual copy off the appliance.

    The first line is a header with the record count and the SHA-256 of the
    rest of the file. Each further line is a record as `appliance sync`
    uploads it. `appliance import` reads the file on another appliance or next
    to the collector. The exported records stay as they are, so queued records
    stay queued here.
    """
    from appliance.export_import import DEFAULT_EXPORT_STATES, export_records

    if until is not None and until <= since:
        raise click.UsageError("--until must be later than --since")
    try:
        header = export_records(
            data_dir,
            output,
            since=since,
            until=until,
            states=states or DEFAULT_EXPORT_STATES,
            force=force,
        )
    except ApplianceError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"writing {str(output)!r} failed: {exc}; check the free space there")
    click.echo(
        f"exported {header.records} records ({', '.join(header.states)}) received "
        f"since {header.since}"
        + (f" until {header.until}" if header.until else "")
        + f" to {output}, sha256 {header.sha256}"
    )


@click.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help=_DATA_DIR_HELP,
)
@click.option(
    "--link-prefix",
    default="",
    help="Text put in front of every imported record's link, such as 'pump-7/', "
    "to keep two appliances' links of the same name apart.",
)
@click.option(
    "--collector-db",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Store the records in this `appliance collector --db` file instead of "
    "the appliance database.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def import_command(
    file: Path,
    data_dir: Path,
    link_prefix: str,
    collector_db: Path | None,
    as_json: bool,
) -> None:
    """Store the records of an `appliance export` FILE, each record id once.

    The file's checksum and every line are checked before anything is stored.
    Importing the same file again changes nothing. On an appliance, queued and
    validated records arrive queued for upload, uploaded records as uploaded,
    dead records as dead, and received or inferred records as received, so
    this appliance's model triages them. With --collector-db, queued,
    validated and uploaded records are stored in the collector's database and
    the rest are skipped.
    """
    from appliance.export_import import import_into_appliance, import_into_collector

    if collector_db is not None and link_prefix:
        raise click.UsageError("--link-prefix applies only to an appliance import")
    started = time.perf_counter()
    try:
        if collector_db is not None:
            result = import_into_collector(file, collector_db)
        else:
            result = import_into_appliance(file, data_dir, link_prefix=link_prefix)
    except ApplianceError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    states = ", ".join(f"{state} {count}" for state, count in result.states.items())
    click.echo(
        f"imported {result.inserted} of {result.records} records"
        + (f" ({states})" if states else "")
        + f", {result.existing} already present"
        + (f", {result.skipped} skipped by state" if result.skipped else "")
        + f", in {time.perf_counter() - started:.1f} s"
    )
