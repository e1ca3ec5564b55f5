"""The `appliance` command line: a thin layer over the library.

Every command takes ``--data-dir``; library errors become one ``error:`` line
on stderr and exit code 1 (2 for usage errors, from click).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from appliance.cli_options import model_options
from appliance.errors import ApplianceError
from appliance.paths import DataDirLock, default_data_dir, prepare_data_dir
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store, record_to_json
from firmware_bridge.errors import BridgeError
from firmware_bridge.lines import LineEnding
from firmware_bridge.ring_buffer import OverflowPolicy

logger = logging.getLogger("appliance")


def _data_dir_option(func: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=default_data_dir,
        show_default="$FIELD_RELAY_DATA_DIR or ~/.local/share/field-relay",
        help="Directory holding the database and the answer cache.",
    )(func)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group()
@click.version_option(package_name="field-relay")
def main() -> None:
    """Field Relay appliance: read device messages over serial or BLE links,
    triage them with a local model, store them durably and upload them when a
    network is present."""


@main.command()
@_data_dir_option
@click.option(
    "--demo",
    is_flag=True,
    help="Read the bundled BGL sample from a simulated device on a pty.",
)
@click.option(
    "--port", help="Serial port path or pyserial URL (socket://, rfc2217://)."
)
@click.option(
    "--baud",
    type=click.IntRange(min=50),
    default=115200,
    show_default=True,
    help="Line speed in bit/s.",
)
@click.option(
    "--protocol",
    type=click.Choice(["framed", "lines"]),
    default="framed",
    show_default=True,
    help="Wire protocol: sealed, acknowledged frames (docs/protocol.md), or "
    "plain text lines for legacy devices.",
)
@click.option(
    "--line-ending",
    type=click.Choice([e.value for e in LineEnding]),
    default="auto",
    show_default=True,
    help="Bytes that end a line; auto accepts LF, CR and CRLF.",
)
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    help="Stop reading after N new records; exit 0 once all are final.",
)
@click.option(
    "--upload-url",
    help="Upload queued records to this HTTP endpoint in the background.",
)
@model_options
@click.option(
    "--demo-rate",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Lines per second the demo device sends (0: as fast as read).",
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=16),
    default=4096,
    show_default=True,
    help="Bytes kept per line; the rest is dropped and counted.",
)
@click.option(
    "--line-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a partial line waits for its line ending.",
)
@click.option(
    "--ring-bytes",
    type=click.IntRange(min=64),
    default=65536,
    show_default=True,
    help="Ring buffer size per link, in bytes.",
)
@click.option(
    "--overflow",
    type=click.Choice([p.value for p in OverflowPolicy]),
    default="block",
    show_default=True,
    help="When the ring buffer is full: block the reader, or drop the oldest bytes.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration with [[links]], [model], [sync] and [limits] "
    "(docs/configuration.md); replaces --port and the link options.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every state change.")
def run(
    data_dir: Path,
    config_path: Path | None,
    demo: bool,
    port: str | None,
    baud: int,
    protocol: str,
    line_ending: str,
    max_records: int | None,
    upload_url: str | None,
    model: str | None,
    threads: int | None,
    demo_rate: float,
    max_line_bytes: int,
    line_timeout: float,
    ring_bytes: int,
    overflow: str,
    verbose: bool,
) -> None:
    """Run the pipeline: read a link, infer, validate, queue and (optionally) upload."""
    from appliance.config import LinkConfig, Protocol, load_config
    from appliance.daemon import Daemon, RunOptions, install_signal_handlers

    _setup_logging(verbose)
    try:
        config = load_config(config_path)
    except ApplianceError as exc:
        _fail(exc)
    if config_path is not None:
        if port:
            raise click.UsageError("pass either --config or --port, not both")
        if not demo and not config.links:
            raise click.UsageError(
                f"{config_path} has no [[links]] entry; add one or pass --demo"
            )
        links = list(config.links)
    elif demo == bool(port):
        raise click.UsageError("pass exactly one of --demo, --port and --config")
    else:
        links = []
    if port:
        try:
            links = [
                LinkConfig(
                    name=re.sub(r"[^A-Za-z0-9_.-]", "_", Path(port).name)[:32]
                    or "port",
                    port=port,
                    protocol=Protocol(protocol),
                    baud=baud,
                    line_ending=line_ending,
                    max_line_bytes=max_line_bytes,
                    line_timeout=line_timeout,
                    ring_bytes=ring_bytes,
                    overflow=overflow,
                )
            ]
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    options = RunOptions(
        links=links,
        demo=demo,
        demo_rate=demo_rate,
        demo_protocol=Protocol(protocol),
        max_records=max_records,
        max_pending=config.limits.max_pending,
        upload_url=upload_url or config.sync.url,
        sync=config.sync,
        mqtt=config.mqtt,
        outbox=config.outbox,
        model=model or config.model.name,
        threads=threads or config.model.threads,
        review=config.review,
        telemetry=config.telemetry,
    )
    if config.data_dir is not None and data_dir == default_data_dir():
        data_dir = config.data_dir
    try:
        prepare_data_dir(data_dir)
        lock = DataDirLock(data_dir)
        lock.acquire()
        daemon = Daemon(data_dir, options)
        install_signal_handlers(daemon)
        code = daemon.run()
    except (ApplianceError, BridgeError) as exc:
        _fail(exc)
    sys.exit(code)


@main.command()
@_data_dir_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--kind",
    type=click.Choice([k.value for k in RecordKind]),
    default="log_event",
    show_default=True,
    help="log_event: free text for the model; json: one JSON object per line.",
)
@model_options
@click.option("-v", "--verbose", is_flag=True, help="Log every state change.")
def replay(
    data_dir: Path,
    file: Path,
    kind: str,
    model: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Push each line of FILE through the workflow and exit when all are final."""
    from appliance.replay import replay_file

    _setup_logging(verbose)
    stop = threading.Event()
    try:
        prepare_data_dir(data_dir)
        lock = DataDirLock(data_dir)
        lock.acquire()
        counts = replay_file(data_dir, file, RecordKind(kind), model, threads, stop)
    except (ApplianceError, BridgeError) as exc:
        _fail(exc)
    click.echo(" ".join(f"{state}={n}" for state, n in counts.items() if n))


def _open_readonly(data_dir: Path) -> Store | None:
    path = data_dir / DB_NAME
    if not path.exists():
        return None
    return Store(path, readonly=True)


@main.command()
@_data_dir_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "table"]),
    default="table",
    show_default=True,
)
@click.option(
    "--state",
    type=click.Choice([s.value for s in RecordState]),
    help="Only records in this state.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Print at most N records.")
def records(data_dir: Path, fmt: str, state: str | None, limit: int | None) -> None:
    """List records, oldest first."""
    try:
        store = _open_readonly(data_dir)
        rows = store.list_records(state, limit) if store else []
    except ApplianceError as exc:
        _fail(exc)
    if store is None:
        click.echo(
            f"note: no database in {str(data_dir)!r}; check --data-dir "
            "(or FIELD_RELAY_DATA_DIR)",
            err=True,
        )
    if fmt == "jsonl":
        for row in rows:
            click.echo(json.dumps(record_to_json(row), ensure_ascii=False))
        return
    click.echo(
        f"{'id':<8}  {'link#seq':<16}  {'state':<9}  {'severity':<8}  summary or error"
    )
    for row in rows:
        data = json.loads(row["data"]) if row["data"] else {}
        text = data.get("summary") or row["error"] or row["raw"]
        link = row["link"] if len(row["link"]) <= 10 else row["link"][:9] + "…"
        where = f"{link}#{row['seq']}"
        click.echo(
            f"{row['id'][:8]:<8}  {where:<16}  {row['state']:<9}  "
            f"{data.get('severity', ''):<8}  {text[:60]}"
        )


@main.command()
@_data_dir_option
@click.argument("record_id")
def inspect(data_dir: Path, record_id: str) -> None:
    """Print one record's whole history: states, attempts, timings, errors, model output."""
    row = None
    try:
        store = _open_readonly(data_dir)
        if store is not None:
            matches = store.query(
                "SELECT id FROM records WHERE substr(id, 1, ?) = ?",
                (len(record_id), record_id),
            )
            if len(matches) == 1:
                row = store.get_record(matches[0]["id"])
    except ApplianceError as exc:
        _fail(exc)
    if store is None or row is None:
        _fail(
            ApplianceError(
                f"no single record with id {record_id!r} in {str(data_dir)!r}"
            )
        )
    assert store is not None and row is not None
    record = record_to_json(row)
    record["model_output"] = row["output"]
    record["history"] = [
        {
            "at": event["at"],
            "step": event["step"],
            "from": event["from_state"],
            "to": event["to_state"],
            "attempt": event["attempt"],
            "duration_s": round(event["duration"] or 0.0, 3),
            "error": event["error"],
            "detail": json.loads(event["detail"]) if event["detail"] else None,
        }
        for event in store.events_for(row["id"])
    ]
    click.echo(json.dumps(record, indent=2, ensure_ascii=False))


@main.command()
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(data_dir: Path, as_json: bool) -> None:
    """Show record counts per state, link counters and the outbox."""
    from appliance.status import collect_status, format_status

    if not (data_dir / DB_NAME).exists():
        click.echo(
            f"note: no database in {str(data_dir)!r}; check --data-dir "
            "(or FIELD_RELAY_DATA_DIR)",
            err=True,
        )
    try:
        result = collect_status(data_dir)
    except ApplianceError as exc:
        _fail(exc)
    click.echo(json.dumps(result) if as_json else format_status(result))


@main.command()
@_data_dir_option
@click.option(
    "--upload-url",
    help="HTTP endpoint that accepts NDJSON batches; default: [sync] url of --config.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration whose [sync] table sets the sink (http or mqtt), "
    "URL, token file, CA bundle, batch sizes and rate limits; [mqtt] sets the broker.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Drain the outbox once and exit instead of running until stopped.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="With --once: seconds to keep retrying before giving up.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Records per batch (default: [sync] batch_records, 200).",
)
@click.option("--no-gzip", is_flag=True, help="Send uncompressed bodies.")
def sync(
    data_dir: Path,
    upload_url: str | None,
    config_path: Path | None,
    once: bool,
    timeout: float,
    batch_size: int | None,
    no_gzip: bool,
) -> None:
    """Upload queued records as NDJSON batches with an Idempotency-Key each, or
    publish them to the MQTT broker when --config sets [sync] sink = "mqtt"."""
    from appliance.config import load_config
    from appliance.mqtt_sink import make_sink

    _setup_logging(False)
    try:
        loaded = load_config(config_path)
    except ApplianceError as exc:
        _fail(exc)
    config = loaded.sync
    url = upload_url or config.url
    if config.sink == "mqtt":
        if upload_url:
            raise click.UsageError(
                '--upload-url sets an HTTP sink, but --config sets [sync] sink = "mqtt"'
            )
    elif not url:
        raise click.UsageError("pass --upload-url, or --config with a [sync] url")
    if not (data_dir / DB_NAME).exists():
        click.echo("nothing to upload: no database in the data directory")
        return
    try:
        uploader = make_sink(
            data_dir / DB_NAME,
            config,
            loaded.mqtt,
            url=url,
            batch_size=batch_size,
            compress=False if no_gzip else None,
        )
    except ApplianceError as exc:
        _fail(exc)
    try:
        if once:
            result = uploader.sync(deadline=time.monotonic() + timeout)
            click.echo(
                f"uploaded {result.records} records in {result.batches} batches;"
                f" {result.remaining} still queued"
            )
            if result.remaining:
                reason = result.last_error or (
                    f"the --timeout of {timeout:g} s passed; run sync again or raise "
                    "--timeout"
                )
                _fail(
                    ApplianceError(
                        f"{result.remaining} records still queued after sync: {reason}"
                    )
                )
            return
        stop = threading.Event()
        while True:
            try:
                uploader.sync(deadline=None, stop=stop)
                stop.wait(2.0)
            except KeyboardInterrupt:
                return
    except ApplianceError as exc:
        _fail(exc)
    finally:
        uploader.close()


@main.group()
def grammars() -> None:
    """Generate and check the JSON schemas and GBNF grammars in grammars/."""


@grammars.command("write")
def grammars_write() -> None:
    """Write grammars/log_event.schema.json and grammars/log_event.gbnf."""
    from appliance.grammar_files import write_grammar_files

    for path in write_grammar_files():
        click.echo(f"wrote {path}")


def _register_commands() -> None:
    from appliance.cli_collector import collector_command
    from appliance.cli_config import config_group
    from appliance.cli_control import control_command
    from appliance.cli_devices import DEVICE_COMMANDS
    from appliance.cli_doctor import doctor_command
    from appliance.cli_eval import eval_command
    from appliance.cli_export import export_command, import_command
    from appliance.cli_models import models_group
    from appliance.cli_retry import retry_command
    from appliance.cli_review import review_command, reviews_command
    from appliance.cli_scan import scan_command
    from appliance.cli_trace import trace_command
    from appliance.cli_tui import tui_command

    main.add_command(collector_command)
    main.add_command(config_group)
    main.add_command(control_command)
    main.add_command(doctor_command)
    main.add_command(eval_command)
    main.add_command(export_command)
    main.add_command(import_command)
    main.add_command(models_group)
    main.add_command(retry_command)
    main.add_command(review_command)
    main.add_command(reviews_command)
    main.add_command(scan_command)
    main.add_command(trace_command)
    main.add_command(tui_command)
    for command in DEVICE_COMMANDS:
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
