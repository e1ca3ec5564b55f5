"""Export records to an NDJSON file and import it on another appliance or a collector.

For an appliance that never gets a network, records travel on a USB stick.
An export file has one header line and then one record per line, each record
line byte for byte what ``appliance sync`` would send (``sync.ndjson_line``).
The header is a JSON object with the key ``field_relay_export`` (the format
version) and the record count and SHA-256 of all bytes after the header line,
so an importer rejects a truncated or altered copy before it stores anything.

Import on an appliance inserts each record under its own id, so importing the
same file again, or two files that share records, stores each record once.
``IMPORT_STATES`` gives the state an imported record gets. Queued and
validated records arrive queued, so this appliance uploads them. Uploaded
records arrive uploaded, and dead records arrive dead with their error.
Received and inferred records arrive received with no attempts, so this
appliance's model triages them. A collector de-duplicates by record id, so a
record that both appliances upload is stored there once.

Import into a collector database stores the records that the pipeline
finished with a result (queued, validated, uploaded) through the collector's
own ``ingest``, in batches whose Idempotency-Key derives from the export id.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from appliance.collector import CollectorStore, parse_ndjson
from appliance.errors import ApplianceError
from appliance.paths import prepare_data_dir
from appliance.states import FINAL_STATES, RecordKind, RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import ndjson_line

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Value of ``field_relay_export`` in the header of files this code writes and reads."""
DEFAULT_EXPORT_STATES = tuple(sorted(str(state) for state in FINAL_STATES))
"""States exported without ``--state``: every record the local pipeline finished."""
IMPORT_STATES = {
    RecordState.RECEIVED: RecordState.RECEIVED,
    RecordState.INFERRED: RecordState.RECEIVED,
    RecordState.VALIDATED: RecordState.QUEUED,
    RecordState.QUEUED: RecordState.QUEUED,
    RecordState.UPLOADED: RecordState.UPLOADED,
    RecordState.DEAD: RecordState.DEAD,
}
"""State an imported record gets on this appliance, by its state in the file."""
COLLECTOR_STATES = frozenset(
    {RecordState.VALIDATED, RecordState.QUEUED, RecordState.UPLOADED}
)
"""States of the records that an import into a collector stores."""
PAGE_RECORDS = 500
"""Records read per query on export and written per transaction on import."""

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RELATIVE_TIME = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ExportFileError(ApplianceError):
    """An export file cannot be written or read, or its content is invalid.

    Attributes:
        path: the file.
        line: the 1-based line number of the problem, or None for the whole file.
    """

    def __init__(self, message: str, path: Path, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class ImportConflictError(ApplianceError):
    """Imported records would take the link and sequence number of other records.

    Attributes:
        conflicts: ``(record id, link, seq, id of the record that has them)``.
    """

    def __init__(
        self, message: str, conflicts: list[tuple[str, str, int, str]]
    ) -> None:
        super().__init__(message)
        self.conflicts = conflicts


# Times --------------------------------------------------------------------------


def parse_time(text: str, now: float | None = None) -> float:
    """Parse ``--since``/``--until``: ISO 8601 or an age such as ``90m``, ``12h``, ``7d``.

    An ISO time without a zone is UTC. An age counts back from ``now``
    (default: the current time). Returns seconds since the epoch.

    Raises:
        ValueError: the text is neither form, with both forms in the message.
    """
    text = text.strip()
    match = _RELATIVE_TIME.fullmatch(text)
    if match:
        current = time.time() if now is None else now
        return current - float(match[1]) * _UNIT_SECONDS[match[2]]
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 such as 2026-12-01 or "
            "2026-12-01T08:00:00Z (UTC unless a zone is given), or an age such as "
            "30m, 12h or 7d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def format_time(epoch: float | None) -> str | None:
    """Return ``epoch`` as ISO 8601 UTC with milliseconds, as records show times."""
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Export -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportHeader:
    """The first line of an export file."""

    export_id: str
    """Random UUID of this export; import batches into a collector derive from it."""
    exported_at: str
    since: str | None
    until: str | None
    states: tuple[str, ...]
    records: int
    sha256: str
    """SHA-256 of every byte after the header line."""

    def to_json(self) -> dict[str, Any]:
        return {
            "field_relay_export": FORMAT_VERSION,
            **dataclasses.asdict(self),
            "states": list(self.states),
        }


def export_records(
    data_dir: Path,
    output: Path,
    *,
    since: float | None,
    until: float | None = None,
    states: Sequence[str] = DEFAULT_EXPORT_STATES,
    force: bool = False,
) -> ExportHeader:
    """Write the records received in ``[since, until)`` in ``states`` to ``output``.

    Records are written oldest first. The file appears under its name only
    when it is complete: it is written to a temporary file in the same
    directory, flushed to disk and renamed.

    Raises:
        ExportFileError: ``output`` exists and ``force`` is false, or the data
            directory has no database.
        StoreError: the database cannot be read.
        OSError: ``output`` cannot be written.
    """
    if output.exists() and not force:
        raise ExportFileError(
            f"{str(output)!r} already exists; choose another --output or pass "
            "--force to replace it",
            output,
        )
    db = data_dir / DB_NAME
    if not db.is_file():
        raise ExportFileError(
            f"no database in {str(data_dir)!r}; check --data-dir", data_dir / DB_NAME
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    store = Store(db, readonly=True)
    try:
        with tempfile.TemporaryFile(dir=output.parent) as body:
            digest = hashlib.sha256()
            count = 0
            for row in _exported_rows(store, since, until, states):
                line = ndjson_line(row)
                digest.update(line)
                body.write(line)
                count += 1
            header = ExportHeader(
                export_id=str(uuid.uuid4()),
                exported_at=format_time(time.time()) or "",
                since=format_time(since),
                until=format_time(until),
                states=tuple(states),
                records=count,
                sha256=digest.hexdigest(),
            )
            body.seek(0)
            _write_export(output, header, body)
    finally:
        store.close()
    logger.info(
        "exported %d records to %s (export %s)", count, output, header.export_id
    )
    return header


def _exported_rows(
    store: Store, since: float | None, until: float | None, states: Sequence[str]
) -> Iterator[sqlite3.Row]:
    # Keyset pagination on the listing order, so no read transaction stays
    # open for the whole export and the daemon's checkpoints are not held up.
    marks = ",".join("?" * len(states))
    after: tuple[float, str, int] = (float("-inf"), "", -1)
    while True:
        rows = store.query(
            f"SELECT * FROM records WHERE state IN ({marks})"
            " AND received_at >= ? AND received_at < ?"
            " AND (received_at, link, seq) > (?, ?, ?)"
            " ORDER BY received_at, link, seq LIMIT ?",
            (
                *states,
                float("-inf") if since is None else since,
                float("inf") if until is None else until,
                *after,
                PAGE_RECORDS,
            ),
        )
        yield from rows
        if len(rows) < PAGE_RECORDS:
            return
        last = rows[-1]
        after = (last["received_at"], last["link"], last["seq"])


def _write_export(output: Path, header: ExportHeader, body: IO[bytes]) -> None:
    handle = tempfile.NamedTemporaryFile(
        dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle:
            handle.write(json.dumps(header.to_json()).encode("utf-8") + b"\n")
            shutil.copyfileobj(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


# Reading an export file -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportedRecord:
    """One record line of an export file, validated."""

    line: int
    text: str
    """The line without its newline, as the collector stores it."""
    id: str
    link: str
    seq: int
    kind: RecordKind
    state: RecordState
    received_at: float
    raw: str
    data: dict[str, Any] | None
    error: str | None
    attempts: int
    flags: tuple[str, ...]


def verify_export(path: Path) -> ExportHeader:
    """Check an export file's header, every record line, the count and the checksum.

    Raises:
        ExportFileError: the file is missing or not an export file, its count
            or checksum differs from the header (a truncated or altered copy),
            or a record line is invalid. Then ``line`` is the first bad line.
    """
    header = _read_header(path)
    digest = hashlib.sha256()
    count = 0
    first_error: ExportFileError | None = None
    for number, raw_line in _body_lines(path):
        digest.update(raw_line)
        count += 1
        if first_error is None:
            try:
                _parse_record(path, number, raw_line)
            except ExportFileError as exc:
                first_error = exc
    # A damaged copy usually also breaks a line; the checksum names the cause.
    if count != header.records or digest.hexdigest() != header.sha256:
        raise ExportFileError(
            f"export file {str(path)!r} is damaged: its header announces "
            f"{header.records} records with sha256 {header.sha256}, but it contains "
            f"{count} with sha256 {digest.hexdigest()}, so the copy is incomplete or "
            "was changed; copy it again from the source appliance",
            path,
        )
    if first_error is not None:
        raise first_error
    return header


def iter_records(path: Path) -> Iterator[ExportedRecord]:
    """Yield the record lines of an export file that ``verify_export`` passed.

    Raises:
        ExportFileError: a record line is invalid, which means the file
            changed after it was verified.
    """
    for number, raw_line in _body_lines(path):
        yield _parse_record(path, number, raw_line)


def _read_header(path: Path) -> ExportHeader:
    try:
        with path.open("rb") as file:
            first = file.readline(64 * 1024)
    except OSError as exc:
        raise ExportFileError(
            f"cannot read export file {str(path)!r}: {exc.strerror}", path
        ) from exc
    try:
        value = json.loads(first)
        if value.get("field_relay_export") != FORMAT_VERSION:
            raise ValueError(f"format version {value.get('field_relay_export')!r}")
        header = ExportHeader(
            export_id=str(value["export_id"]),
            exported_at=str(value["exported_at"]),
            since=value["since"],
            until=value["until"],
            states=tuple(value["states"]),
            records=int(value["records"]),
            sha256=str(value["sha256"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ExportFileError(
            f"{str(path)!r} is not an export file of format {FORMAT_VERSION} "
            f"({exc!s}); write it with `appliance export`",
            path,
            1,
        ) from exc
    return header


def _body_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as file:
        file.readline(64 * 1024)
        yield from enumerate(file, start=2)


def _parse_record(path: Path, number: int, raw_line: bytes) -> ExportedRecord:
    def invalid(problem: str) -> ExportFileError:
        return ExportFileError(
            f"export file {str(path)!r} line {number}: {problem}", path, number
        )

    try:
        text = raw_line.decode("utf-8").removesuffix("\n")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise invalid("not a JSON object")
    try:
        record = ExportedRecord(
            line=number,
            text=text,
            id=_checked(value, "id", str),
            link=_checked(value, "link", str),
            seq=_checked(value, "seq", int),
            kind=RecordKind(value["kind"]),
            state=RecordState(value["state"]),
            received_at=datetime.datetime.fromisoformat(
                _checked(value, "received_at", str)
            ).timestamp(),
            raw=_checked(value, "raw", str),
            data=_checked(value, "data", dict, optional=True),
            error=_checked(value, "error", str, optional=True),
            attempts=_checked(value, "attempts", int),
            flags=tuple(_checked(value, "flags", list)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise invalid(f"invalid record: {exc}") from exc
    if not _UUID.fullmatch(record.id):
        raise invalid(f"id {record.id!r} is not a lower-case UUID")
    if not record.link:
        raise invalid("link is empty")
    if record.state in COLLECTOR_STATES and record.data is None:
        raise invalid(f"a {record.state} record must have data")
    return record


def _checked(
    value: dict[str, Any], key: str, kind: type, optional: bool = False
) -> Any:
    item = value[key]
    if item is None and optional:
        return None
    if not isinstance(item, kind) or isinstance(item, bool):
        raise TypeError(f"{key} {item!r} is not a {kind.__name__}")
    if isinstance(item, list) and not all(isinstance(element, str) for element in item):
        raise TypeError(f"{key} {item!r} is not a list of strings")
    return item


# Import into an appliance ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """Counts of one import."""

    export_id: str
    records: int
    """Record lines in the file."""
    inserted: int
    existing: int
    """Records already stored here (by id), left unchanged."""
    skipped: int = 0
    """Records not imported because of their state (collector import only)."""
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    """Inserted records by the state they got here."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def import_into_appliance(
    path: Path, data_dir: Path, *, link_prefix: str = ""
) -> ImportResult:
    """Insert the file's records into ``data_dir``'s database by their ids.

    Records whose id is already stored are left unchanged, so importing a file
    twice is a no-op. ``link_prefix`` is put in front of every imported link,
    which keeps two appliances' links of the same name apart. The daemon may
    run during the import.

    Raises:
        ExportFileError: the file is damaged or invalid; nothing was stored.
        ImportConflictError: an imported record's link and seq belong to another
            record here; nothing was stored.
        DataDirError: ``data_dir`` cannot be created or written.
        StoreError: the database failed; records committed before stay.
    """
    header = verify_export(path)
    store = Store(prepare_data_dir(data_dir) / DB_NAME)
    try:
        conflicts = _find_conflicts(store, iter_records(path), link_prefix)
        if conflicts:
            raise _conflict_error(path, conflicts, link_prefix)
        inserted: Counter[str] = Counter()
        batch: list[ExportedRecord] = []
        for record in iter_records(path):
            batch.append(record)
            if len(batch) == PAGE_RECORDS:
                inserted += _insert_batch(store, batch, header, path, link_prefix)
                batch = []
        inserted += _insert_batch(store, batch, header, path, link_prefix)
    finally:
        store.close()
    total = sum(inserted.values())
    logger.info(
        "imported %s: %d records inserted, %d already present (export %s)",
        path,
        total,
        header.records - total,
        header.export_id,
    )
    return ImportResult(
        export_id=header.export_id,
        records=header.records,
        inserted=total,
        existing=header.records - total,
        states=dict(sorted(inserted.items())),
    )


def _find_conflicts(
    store: Store, records: Iterator[ExportedRecord], link_prefix: str
) -> list[tuple[str, str, int, str]]:
    conflicts = []
    for record in records:
        if store.query("SELECT 1 FROM records WHERE id = ?", (record.id,)):
            continue
        link = link_prefix + record.link
        holder = store.query(
            "SELECT id FROM records WHERE link = ? AND seq = ?", (link, record.seq)
        )
        if holder:
            conflicts.append((record.id, link, record.seq, holder[0]["id"]))
    return conflicts


def _conflict_error(
    path: Path, conflicts: list[tuple[str, str, int, str]], link_prefix: str
) -> ImportConflictError:
    record_id, link, seq, holder = conflicts[0]
    links = sorted({item[1] for item in conflicts})
    fix = (
        "import again with another --link-prefix"
        if link_prefix
        else "import again with --link-prefix NAME/ (for example the source "
        "appliance's name) to keep both appliances' links apart"
    )
    return ImportConflictError(
        f"cannot import {str(path)!r}: {len(conflicts)} records would take the link "
        f"and sequence number of other records here, on links {links[:5]!r} (first: "
        f"record {record_id} as {link!r} seq {seq}, held by record {holder}); "
        f"nothing was imported; {fix}",
        conflicts,
    )


def _insert_batch(
    store: Store,
    batch: list[ExportedRecord],
    header: ExportHeader,
    path: Path,
    link_prefix: str,
) -> Counter[str]:
    inserted: Counter[str] = Counter()
    if not batch:
        return inserted
    now = store.clock()
    with store.transaction() as conn:
        for record in batch:
            state = IMPORT_STATES[record.state]
            cursor = conn.execute(
                "INSERT INTO records (id, link, seq, kind, state, raw, raw_bytes,"
                " flags, received_at, updated_at, attempts, next_attempt_at, data,"
                " error, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?,"
                " ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    record.id,
                    link_prefix + record.link,
                    record.seq,
                    str(record.kind),
                    str(state),
                    record.raw,
                    record.raw.encode("utf-8"),
                    ",".join(record.flags),
                    record.received_at,
                    now,
                    0 if state is RecordState.RECEIVED else record.attempts,
                    None
                    if state is RecordState.RECEIVED or record.data is None
                    else json.dumps(record.data, separators=(",", ":")),
                    record.error if state is RecordState.DEAD else None,
                    now if state is RecordState.UPLOADED else None,
                ),
            )
            if cursor.rowcount == 0:
                continue
            store.add_event(
                conn,
                record.id,
                "import",
                None,
                state,
                0,
                0.0,
                detail={
                    "export_id": header.export_id,
                    "file": path.name,
                    "exported_state": str(record.state),
                },
            )
            inserted[str(state)] += 1
    return inserted


# Import into a collector ------------------------------------------------------------


def import_into_collector(path: Path, collector_db: Path) -> ImportResult:
    """Store the file's finished records in a collector database, once per id.

    Batches of ``PAGE_RECORDS`` records go through ``CollectorStore.ingest``
    with the Idempotency-Key ``import:<export id>:<batch number>``, so a
    repeated import replays the stored responses and stores nothing. Records
    in other states than ``COLLECTOR_STATES`` are skipped.

    Raises:
        ExportFileError: the file is damaged or invalid; nothing was stored.
        ExportFileError: ``collector_db`` does not exist.
        SetupError: ``collector_db`` is not a collector database.
        StoreError: the collector database failed; batches committed before stay.
    """
    header = verify_export(path)
    if not collector_db.is_file():
        raise ExportFileError(
            f"no collector database at {str(collector_db)!r}; pass the --db file "
            "of `appliance collector`",
            collector_db,
        )
    store = CollectorStore(collector_db)
    inserted = existing = skipped = 0
    try:
        batch: list[bytes] = []
        batches = 0
        for record in iter_records(path):
            if record.state not in COLLECTOR_STATES:
                skipped += 1
                continue
            batch.append(record.text.encode("utf-8"))
            if len(batch) == PAGE_RECORDS:
                stored = _ingest(store, header, batches, batch)
                inserted, existing = inserted + stored, existing + len(batch) - stored
                batch, batches = [], batches + 1
        if batch:
            stored = _ingest(store, header, batches, batch)
            inserted, existing = inserted + stored, existing + len(batch) - stored
    finally:
        store.close()
    logger.info(
        "imported %s into collector %s: %d stored, %d already present, %d skipped",
        path,
        collector_db,
        inserted,
        existing,
        skipped,
    )
    return ImportResult(
        export_id=header.export_id,
        records=header.records,
        inserted=inserted,
        existing=existing,
        skipped=skipped,
    )


def _ingest(
    store: CollectorStore, header: ExportHeader, number: int, lines: list[bytes]
) -> int:
    """Ingest one batch and return how many of its records were new."""
    key = f"import:{header.export_id}:{number}"
    response = store.ingest(key, parse_ndjson(b"\n".join(lines)))
    if response.replayed:
        return 0
    return int(response.body["accepted"])
