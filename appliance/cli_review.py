"""`appliance review` and `appliance reviews`: queue, send and list review work.

`review` queues records and, when no daemon has locked the data directory, sends
pending reviews at once under the configured limits and budget. While a
daemon runs, it only queues, because the daemon's reviewer owns the rate
limiter and a second sender could pass the endpoint's limits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from appliance.config import ReviewConfig, load_config
from appliance.errors import ApplianceError, DataDirError
from appliance.paths import DataDirLock, default_data_dir
from appliance.review import (
    ReviewState,
    ensure_schema,
    has_review_tables,
    request_all_dead,
    request_review,
    save_settings,
)
from appliance.review_worker import drain, make_activity
from appliance.store import DB_NAME, Store


def _data_dir_option(func: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=default_data_dir,
        show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
        help="Directory holding the database.",
    )(func)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command("review")
@_data_dir_option
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration whose [review] table sets the endpoint, limits and "
    "budget; without it, work is only queued.",
)
@click.option(
    "--record",
    "record_ids",
    multiple=True,
    help="Queue a review of this record (an id prefix is enough), dead letters "
    "included; repeatable.",
)
@click.option(
    "--all-dead", is_flag=True, help="Queue a review of every dead log_event record."
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    help="Finish at most N reviews now; 0 only queues. Default: all due work.",
)
def review_command(
    data_dir: Path,
    config_path: Path | None,
    record_ids: tuple[str, ...],
    all_dead: bool,
    limit: int | None,
) -> None:
    """Queue reviews by a larger model and send pending review work now."""
    path = data_dir / DB_NAME
    if not path.exists():
        _fail(f"no database in {str(data_dir)!r}; check --data-dir")
    try:
        config = load_config(config_path).review
        store = Store(path)
    except ApplianceError as exc:
        _fail(str(exc))
    try:
        _queue(store, record_ids, all_dead)
        if limit == 0:
            return
        if not config.enabled:
            click.echo(
                "nothing sent: [review] is not enabled; pass --config with "
                "[review] enabled = true, base_url and model"
            )
            return
        lock = DataDirLock(data_dir)
        try:
            lock.acquire()
        except DataDirError:
            click.echo("queued only: a running daemon's reviewer sends the work")
            return
        try:
            _send(store, config, limit)
        finally:
            lock.release()
    except ApplianceError as exc:
        _fail(str(exc))
    finally:
        store.close()


def _queue(store: Store, record_ids: tuple[str, ...], all_dead: bool) -> None:
    for record_id in record_ids:
        full_id = request_review(store, record_id)
        click.echo(f"record {full_id} queued for review")
    if all_dead:
        count = request_all_dead(store)
        click.echo(f"{count} dead records queued for review")


def _send(store: Store, config: ReviewConfig, limit: int | None) -> None:
    ensure_schema(store)
    save_settings(store, config)
    activity = make_activity(config, clock=store.clock)
    try:
        activity.restore(store)
        summary = drain(store, activity, config, limit=limit)
    finally:
        activity.client.close()
    pending = store.query(
        "SELECT COUNT(*) AS n FROM reviews WHERE state = ?",
        (str(ReviewState.PENDING),),
    )[0]["n"]
    counts = ", ".join(f"{n} {word}" for word, n in sorted(summary.counts.items()))
    click.echo(f"review requests: {counts or 'none'}; {pending} reviews pending")
    if summary.stopped_by:
        click.echo(f"stopped: {summary.stopped_by}")


@click.command("reviews")
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@click.option(
    "--state",
    type=click.Choice([s.value for s in ReviewState]),
    help="Only reviews in this state.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Print at most N reviews.")
def reviews_command(
    data_dir: Path, as_json: bool, state: str | None, limit: int | None
) -> None:
    """List review results, newest first, with the verdict per field."""
    path = data_dir / DB_NAME
    if not path.exists():
        _fail(f"no database in {str(data_dir)!r}; check --data-dir")
    try:
        store = Store(path, readonly=True)
        try:
            rows = _review_rows(store, state, limit)
        finally:
            store.close()
    except ApplianceError as exc:
        _fail(str(exc))
    if as_json:
        for row in rows:
            click.echo(json.dumps(review_to_json(row), ensure_ascii=False))
        return
    click.echo(
        f"{'record':<8}  {'state':<7}  {'agree':>5}  {'cost':>9}  "
        "reason; disagreeing fields or error"
    )
    for row in rows:
        verdicts = json.loads(row["verdicts"]) if row["verdicts"] else {}
        differ = [field for field, verdict in verdicts.items() if verdict == "disagree"]
        note = ", ".join(differ) or (row["last_error"] or "")
        agreement = "" if row["agreement"] is None else f"{row['agreement']:.2f}"
        click.echo(
            f"{row['record_id'][:8]:<8}  {row['state']:<7}  {agreement:>5}  "
            f"{row['cost']:>9.5f}  {row['reason']}; {note[:60]}"
        )


def _review_rows(store: Store, state: str | None, limit: int | None) -> list[Any]:
    if not has_review_tables(store):
        return []
    sql = "SELECT * FROM reviews"
    params: list[Any] = []
    if state is not None:
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY updated_at DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return store.query(sql, tuple(params))


def review_to_json(row: Any) -> dict[str, Any]:
    """Return one review as ``appliance reviews --json`` prints it."""
    return {
        "record_id": row["record_id"],
        "reason": row["reason"],
        "state": row["state"],
        "attempts": row["attempts"],
        "throttled": row["throttled"],
        "last_error": row["last_error"],
        "local": json.loads(row["local_data"]) if row["local_data"] else None,
        "reviewer": json.loads(row["review_data"]) if row["review_data"] else None,
        "verdicts": json.loads(row["verdicts"]) if row["verdicts"] else None,
        "agreement": row["agreement"],
        "reviewer_model": row["reviewer_model"],
        "structured_output": row["structured_output"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cost": row["cost"],
        "reviewed_at": row["reviewed_at"],
    }
