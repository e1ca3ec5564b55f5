"""`appliance retry`: put dead records back into the workflow.

It writes to the database while the daemon runs; both take the write lock per
transaction, so neither has to stop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.errors import ApplianceError
from appliance.paths import default_data_dir
from appliance.retry import requeue_all_dead, requeue_dead
from appliance.store import DB_NAME, Store


@click.command("retry")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
    help="Directory holding the database.",
)
@click.option("--all-dead", is_flag=True, help="Retry every dead record.")
@click.argument("record_id", required=False)
def retry_command(data_dir: Path, all_dead: bool, record_id: str | None) -> None:
    """Put dead record RECORD_ID (an id prefix is enough), or every dead record,
    back into the workflow with its attempts reset."""
    if all_dead == (record_id is not None):
        raise click.UsageError("pass either RECORD_ID or --all-dead")
    path = data_dir / DB_NAME
    if not path.exists():
        click.echo(
            f"error: no database in {str(data_dir)!r}; check --data-dir", err=True
        )
        sys.exit(1)
    try:
        store = Store(path)
        try:
            if all_dead:
                moved = requeue_all_dead(store)
                click.echo(f"{moved} dead records put back into the workflow")
                return
            assert record_id is not None
            full_id, state = requeue_dead(store, record_id)
            click.echo(f"record {full_id} put back in state {state}")
        finally:
            store.close()
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
