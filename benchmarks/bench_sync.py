"""Benchmark the outbox: durable enqueue, sync over HTTP and MQTT on loopback, disk use.

Enqueue inserts JSON records through ``Store`` in transactions of ``--batch``
records, each record inserted and moved to queued with its validated data, as
``appliance replay --kind json`` and the step worker do together. Every commit
is durable (WAL, ``synchronous = FULL``).

Sync uploads ``--records`` queued records in one ``sync`` run and divides by
its wall time. HTTP goes to the reference collector (``appliance.collector``)
on 127.0.0.1, which stores every record in its own SQLite file before it responds, and to ``tests.http_receiver``, which only keeps the requests in
memory and so leaves the appliance side's cost. MQTT goes to a Mosquitto broker on 127.0.0.1 started from
``/usr/sbin/mosquitto`` with a temporary configuration. No client subscribes, so the broker only acknowledges the messages. The sender, the receiver and the
databases share the machine's cores.

Disk use is the database file's size after a TRUNCATE checkpoint divided by the
number of records, once while they are queued and once after their upload with
its history events. Run it with ``make bench``; ``--output`` appends the results
to a Markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import command_line, machine_description

# The MQTT broker helper lives with the tests, which are not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.collector import Collector  # noqa: E402
from appliance.config import SyncConfig  # noqa: E402
from appliance.mqtt_sink import MqttUploader  # noqa: E402
from appliance.states import RecordKind, RecordState  # noqa: E402
from appliance.store import DB_NAME, Store  # noqa: E402
from appliance.sync import make_uploader  # noqa: E402
from tests.http_receiver import HttpReceiver  # noqa: E402
from tests.mosquitto import MOSQUITTO, Mosquitto, mosquitto_version  # noqa: E402

TARGET_ENQUEUE = 20_000
"""Records per second that enqueue in batches should reach."""
TARGET_HTTP_SYNC = 10_000
"""Records per second that sync over HTTP to a loopback sink should reach."""
SYNC_DEADLINE_S = 600.0
"""Seconds one measured sync run may take before it gives up."""

Row = tuple[str, str, str]
"""One table row: what was measured, the result, the target and whether it was met."""


def reading(seq: int) -> str:
    """Return one JSON reading of about 110 bytes, the record body used throughout."""
    return json.dumps(
        {
            "device": "pump-3",
            "sensor": "outlet_temperature",
            "seq": seq,
            "value": round(20 + (seq % 97) * 0.173, 3),
            "unit": "degC",
            "status": "ok",
        }
    )


def enqueue(db_path: Path, count: int, batch: int) -> float:
    """Insert ``count`` queued records in transactions of ``batch``; return seconds."""
    store = Store(db_path)
    try:
        link = "bench"
        first = store.next_seq(link)
        started = time.perf_counter()
        for start in range(first, first + count, batch):
            stop = min(start + batch, first + count)
            with store.transaction() as conn:
                for seq in range(start, stop):
                    raw = reading(seq)
                    record_id = store.insert_record(
                        conn, link, seq, raw, raw.encode("utf-8"), RecordKind.JSON
                    )
                    assert record_id is not None
                    store.move(
                        conn,
                        record_id,
                        RecordState.RECEIVED,
                        RecordState.QUEUED,
                        data=raw,
                        attempts=1,
                    )
        return time.perf_counter() - started
    finally:
        store.close()


def bytes_per_record(db_path: Path, count: int) -> float:
    """Return the database file's size per record after emptying the WAL."""
    store = Store(db_path)
    try:
        store.checkpoint("TRUNCATE")
    finally:
        store.close()
    wal = db_path.with_name(db_path.name + "-wal")
    size = db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return size / count


def timed_sync(db_path: Path, count: int, upload: Callable[[], int]) -> float:
    """Run one upload callable and return records per second; check all went."""
    started = time.perf_counter()
    uploaded = upload()
    elapsed = time.perf_counter() - started
    if uploaded != count:
        raise RuntimeError(f"only {uploaded} of {count} records were uploaded")
    return count / elapsed


def sync_http(db_path: Path, count: int, url: str, batch_records: int) -> float:
    uploader = make_uploader(db_path, url, SyncConfig(batch_records=batch_records))
    try:
        return timed_sync(
            db_path,
            count,
            lambda: uploader.sync(time.monotonic() + SYNC_DEADLINE_S).records,
        )
    finally:
        uploader.close()


def sync_mqtt(db_path: Path, count: int, broker: Mosquitto, inflight: int) -> float:
    uploader = MqttUploader(
        db_path,
        broker.host,
        broker.port,
        client_id=f"bench-{inflight}",
        max_inflight=inflight,
        batch_size=1000,
    )
    try:
        if not uploader.probe(timeout=10):
            raise RuntimeError(f"broker {uploader.url} did not accept a connection")
        return timed_sync(
            db_path,
            count,
            lambda: uploader.sync(time.monotonic() + SYNC_DEADLINE_S).records,
        )
    finally:
        uploader.close()


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "not met"


def fresh_queue(workdir: Path, name: str, records: int, batch: int) -> Path:
    """Create a database under ``workdir/name`` holding ``records`` queued records."""
    db_path = workdir / name / DB_NAME
    db_path.parent.mkdir()
    enqueue(db_path, records, batch)
    return db_path


def measure_enqueue(workdir: Path, records: int, batch: int, repeats: int) -> Row:
    best = 0.0
    for attempt in range(repeats):
        db_path = workdir / f"enqueue-{attempt}" / DB_NAME
        db_path.parent.mkdir()
        best = max(best, records / enqueue(db_path, records, batch))
    return (
        f"enqueue, {batch} records per transaction, best of {repeats}",
        f"{best:,.0f} records/s",
        f"≥ {TARGET_ENQUEUE:,} records/s: {verdict(best, TARGET_ENQUEUE)}",
    )


def measure_http(workdir: Path, records: int, batch: int) -> list[Row]:
    """Sync over HTTP to the collector at two batch sizes, then to a receiver
    that keeps requests in memory, which leaves the appliance side's cost.
    The first run also gives the disk figures."""
    rows: list[Row] = []
    disk: list[Row] = []
    runs = [("collector", 200), ("collector", 1000), ("in-memory receiver", 200)]
    for receiver, batch_records in runs:
        name = f"http-{len(rows)}"
        db_path = fresh_queue(workdir, name, records, batch)
        if not disk:
            queued = bytes_per_record(db_path, records)
        if receiver == "collector":
            with Collector(workdir / f"{name}-collector.db") as collector:
                rate = sync_http(db_path, records, collector.url, batch_records)
        else:
            with HttpReceiver() as memory:
                rate = sync_http(db_path, records, memory.url, batch_records)
        rows.append(
            (
                f"sync over HTTP to the {receiver}, {batch_records} records per "
                "batch, gzip",
                f"{rate:,.0f} records/s",
                f"≥ {TARGET_HTTP_SYNC:,} records/s: {verdict(rate, TARGET_HTTP_SYNC)}",
            )
        )
        if not disk:
            uploaded = bytes_per_record(db_path, records)
            disk = [
                (
                    f"outbox on disk per queued record ({len(reading(1))}-byte "
                    "JSON body)",
                    f"{queued:,.0f} bytes",
                    "none",
                ),
                (
                    "on disk per uploaded record, with its history events",
                    f"{uploaded:,.0f} bytes",
                    "none",
                ),
            ]
    return rows + disk


def measure_mqtt(workdir: Path, records: int, batch: int) -> list[Row]:
    if not MOSQUITTO.is_file():
        return [("sync over MQTT", f"skipped: {MOSQUITTO} is not installed", "none")]
    rows: list[Row] = []
    with Mosquitto(workdir / "broker") as broker:
        for inflight in (100, 1000):
            db_path = fresh_queue(workdir, f"mqtt-{inflight}", records, batch)
            rate = sync_mqtt(db_path, records, broker, inflight)
            rows.append(
                (
                    f"sync over MQTT to Mosquitto, QoS 1, {inflight} in flight",
                    f"{rate:,.0f} records/s",
                    "none",
                )
            )
    return rows


def run(records: int, batch: int, repeats: int) -> list[Row]:
    """Measure every figure; return table rows of (measure, result, target)."""
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as name:
        workdir = Path(name)
        rows = [measure_enqueue(workdir, records, batch, repeats)]
        http = measure_http(workdir, records, batch)
        mqtt = measure_mqtt(workdir, records, batch)
    sync_rows = [row for row in http if "records/s" in row[1]]
    disk_rows = [row for row in http if "records/s" not in row[1]]
    return rows + sync_rows + mqtt + disk_rows


def report(rows: list[Row], records: int) -> str:
    broker = mosquitto_version() if MOSQUITTO.is_file() else "no Mosquitto"
    lines = [
        f"## {datetime.date.today().isoformat()}: outbox enqueue and sync",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_description()}",
        f"- Software: Python {sys.version.split()[0]}, {broker}",
        f"- Method: {records:,} records per run. A sync rate is one `sync` run's "
        "records divided by its wall time, with sender, receiver and their "
        "databases on the same machine. The HTTP receiver is the reference "
        "collector, which commits every batch to its own SQLite file before it "
        "responds; the in-memory receiver (`tests/http_receiver.py`) only keeps "
        "the requests in a list. The MQTT broker has no subscriber; its "
        "persistence file is "
        "written at shutdown, not per message.",
        "",
        "| measure | result | target |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {measure} | {result} | {target} |" for measure, result, target in rows
    ]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records",
        type=int,
        default=10_000,
        help="records enqueued and synced per run [default: %(default)s]",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1000,
        help="records per enqueue transaction [default: %(default)s]",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="enqueue runs, of which the fastest counts [default: %(default)s]",
    )
    parser.add_argument(
        "--output", type=Path, help="Markdown file to append the results to"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    text = report(run(args.records, args.batch, args.repeats), args.records)
    print(text)
    if args.output is not None:
        with args.output.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
