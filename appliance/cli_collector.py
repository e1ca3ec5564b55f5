"""`appliance collector`: run the reference HTTP sink of the sync protocol."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from appliance.collector import DEFAULT_MAX_BATCH_BYTES, Collector
from appliance.errors import ApplianceError
from appliance.sync import read_token

logger = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@click.command("collector")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    required=True,
    help="TCP port to listen on; 0 picks a free port, which the startup line shows.",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="SQLite file for the received records and batches; created when missing.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The collector speaks plain HTTP, so keep it on "
    "loopback.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File (mode 0600) holding the bearer token that uploads and GET /stats "
    "must send; without it no token is required.",
)
@click.option(
    "--max-batch-bytes",
    type=click.IntRange(min=1024),
    default=DEFAULT_MAX_BATCH_BYTES,
    show_default=True,
    help="Largest request body after gzip decoding, in bytes; larger batches get "
    "HTTP 413.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every HTTP request.")
def collector_command(
    port: int,
    db_path: Path,
    host: str,
    token_file: Path | None,
    max_batch_bytes: int,
    verbose: bool,
) -> None:
    """Run the reference HTTP sink of docs/sync-protocol.md until SIGINT or SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        token = read_token(token_file) if token_file is not None else None
        collector = Collector(
            db_path, host=host, port=port, token=token, max_batch_bytes=max_batch_bytes
        )
    except ApplianceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)

    # The signals are blocked before the server threads start, so the threads
    # inherit the mask and only sigwait below receives them.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with collector:
            click.echo(
                f"collector listening on {collector.url} "
                f"(stats at {collector.stats_url}, database {db_path})"
            )
            received = signal.sigwait(STOP_SIGNALS)
            logger.info("collector stopping on %s", signal.Signals(received).name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
