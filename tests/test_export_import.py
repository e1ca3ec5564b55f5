"""`appliance export` and `appliance import`: NDJSON files carried between machines.

Records are written into real SQLite files with the store's own API, and the
collector side uses the real collector database and, for the end-to-end case,
the real collector and uploader on loopback.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.collector import Collector, CollectorStore
from appliance.export_import import (
    ExportFileError,
    ImportConflictError,
    export_records,
    import_into_appliance,
    import_into_collector,
    parse_time,
    verify_export,
)
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader, ndjson_line
from tests.conftest import APPLIANCE

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
DAY = 86400.0
T0 = 1_780_000_000.0
"""A fixed receive time, 2026-05-28T20:26:40Z."""


@pytest.fixture(autouse=True)
def _direct_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours proxy variables, which would send loopback requests elsewhere.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _add(
    data_dir: Path,
    link: str,
    seq: int,
    state: RecordState,
    *,
    received_at: float = T0,
    kind: RecordKind = RecordKind.LOG_EVENT,
) -> str:
    """Insert one record received at ``received_at`` and set it to ``state``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / DB_NAME, clock=lambda: received_at)
    try:
        with store.transaction() as conn:
            raw = f"line {seq} on {link}"
            record_id = store.insert_record(
                conn, link, seq, raw, raw.encode("utf-8"), kind
            )
            assert record_id is not None
            fields: dict[str, Any] = {"attempts": 2}
            if state in (
                RecordState.VALIDATED,
                RecordState.QUEUED,
                RecordState.UPLOADED,
            ):
                fields["data"] = json.dumps({"severity": "info", "seq": seq})
            if state is RecordState.INFERRED:
                fields["output"] = "{}"
            if state is RecordState.DEAD:
                fields["error"] = "invalid output after 3 attempts"
            if state is not RecordState.RECEIVED:
                assert store.move(
                    conn, record_id, RecordState.RECEIVED, state, **fields
                )
        return record_id
    finally:
        store.close()


def _rows(data_dir: Path) -> dict[str, Any]:
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        return {row["id"]: row for row in store.list_records()}
    finally:
        store.close()


def _events(data_dir: Path, record_id: str) -> list[Any]:
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        return store.events_for(record_id)
    finally:
        store.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A data directory with one record in every state, a day apart in order."""
    data_dir = tmp_path / "source"
    for seq, state in enumerate(RecordState, start=1):
        _add(data_dir, "pump-1", seq, state, received_at=T0 + seq * DAY)
    return data_dir


def _export_all(source: Path, output: Path) -> Path:
    states = [str(state) for state in RecordState]
    export_records(source, output, since=None, states=states)
    return output


# Times ---------------------------------------------------------------------------------


def test_parse_time_iso_without_zone_is_utc() -> None:
    expected = datetime.datetime(2026, 12, 1, 8, 0, tzinfo=datetime.UTC).timestamp()

    assert parse_time("2026-12-01T08:00") == expected
    assert parse_time("2026-12-01T08:00Z") == expected
    assert parse_time("2026-12-01T10:00+02:00") == expected


def test_parse_time_age_counts_back() -> None:
    assert parse_time("12h", now=T0) == T0 - 12 * 3600
    assert parse_time("7d", now=T0) == T0 - 7 * DAY
    assert parse_time("90m", now=T0) == T0 - 90 * 60


def test_parse_time_invalid_names_both_forms() -> None:
    with pytest.raises(ValueError) as caught:
        parse_time("last tuesday")

    assert "ISO 8601" in str(caught.value)
    assert "7d" in str(caught.value)


# Export --------------------------------------------------------------------------------


def test_export_lines_are_sync_lines(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")

    lines = output.read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0])
    store = Store(source / DB_NAME, readonly=True)
    expected = [ndjson_line(row) for row in store.list_records()]
    store.close()

    assert header["field_relay_export"] == 1
    assert header["records"] == len(RecordState)
    assert lines[1:] == expected
    assert verify_export(output).sha256 == header["sha256"]


def test_export_default_states_are_final(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "final.ndjson"

    header = export_records(source, output, since=None)

    states = [json.loads(line)["state"] for line in output.read_text().splitlines()[1:]]
    assert header.states == ("dead", "queued", "uploaded")
    assert sorted(states) == ["dead", "queued", "uploaded"]


def test_export_since_until_window(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "window.ndjson"
    states = [str(state) for state in RecordState]

    header = export_records(
        source, output, since=T0 + 2 * DAY, until=T0 + 4 * DAY, states=states
    )

    seqs = [json.loads(line)["seq"] for line in output.read_text().splitlines()[1:]]
    assert seqs == [2, 3]
    assert header.since == "2026-05-30T20:26:40.000Z"
    assert header.until == "2026-06-01T20:26:40.000Z"


def test_export_pages_through_many_records(tmp_path: Path) -> None:
    data_dir = tmp_path / "many"
    data_dir.mkdir()
    store = Store(data_dir / DB_NAME, clock=lambda: T0)
    with store.transaction() as conn:
        for seq in range(1, 1202):
            record_id = store.insert_record(conn, "bulk", seq, "x", b"x")
            store.move(
                conn, record_id, RecordState.RECEIVED, RecordState.QUEUED, data="{}"
            )
    store.close()

    header = export_records(data_dir, tmp_path / "many.ndjson", since=None)

    seqs = [
        json.loads(line)["seq"]
        for line in (tmp_path / "many.ndjson").read_text().splitlines()[1:]
    ]
    assert header.records == 1201
    assert seqs == list(range(1, 1202))


def test_export_keeps_existing_output(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "kept.ndjson"
    output.write_text("mine")

    with pytest.raises(ExportFileError) as caught:
        export_records(source, output, since=None)

    assert "--force" in str(caught.value)
    assert output.read_text() == "mine"
    export_records(source, output, since=None, force=True)
    assert verify_export(output).records == 3


# Import into an appliance ---------------------------------------------------------------


def test_import_maps_states(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    target = tmp_path / "target"

    result = import_into_appliance(output, target)

    exported = {row["id"]: row for row in _rows(source).values()}
    imported = _rows(target)
    assert result.inserted == len(RecordState)
    assert result.existing == 0
    expected = {
        "received": "received",
        "inferred": "received",
        "validated": "queued",
        "queued": "queued",
        "uploaded": "uploaded",
        "dead": "dead",
    }
    for record_id, row in exported.items():
        assert imported[record_id]["state"] == expected[row["state"]], row["state"]
        assert imported[record_id]["link"] == row["link"]
        assert imported[record_id]["seq"] == row["seq"]
        assert imported[record_id]["raw"] == row["raw"]
        assert imported[record_id]["received_at"] == pytest.approx(row["received_at"])


def test_import_keeps_fields_per_state(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    target = tmp_path / "target"
    import_into_appliance(output, target)

    by_state = {row["state"]: row for row in _rows(source).values()}
    imported = _rows(target)
    queued = imported[by_state["queued"]["id"]]
    received = imported[by_state["inferred"]["id"]]
    uploaded = imported[by_state["uploaded"]["id"]]
    dead = imported[by_state["dead"]["id"]]

    assert json.loads(queued["data"]) == json.loads(by_state["queued"]["data"])
    assert queued["attempts"] == 2
    assert queued["batch_id"] is None
    assert received["attempts"] == 0
    assert received["data"] is None
    assert uploaded["uploaded_at"] is not None
    assert dead["error"] == "invalid output after 3 attempts"
    event = _events(target, queued["id"])[-1]
    assert event["step"] == "import"
    assert json.loads(event["detail"])["exported_state"] == "queued"


def test_reimport_is_noop(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    target = tmp_path / "target"
    import_into_appliance(output, target)
    before = {record_id: dict(row) for record_id, row in _rows(target).items()}

    again = import_into_appliance(output, target)

    assert again.inserted == 0
    assert again.existing == len(RecordState)
    assert {k: dict(v) for k, v in _rows(target).items()} == before
    for record_id in before:
        assert len(_events(target, record_id)) == 1


def test_import_into_source_is_noop(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")

    result = import_into_appliance(output, source)

    assert result.inserted == 0


def test_import_truncated_file_rejected(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    data = output.read_bytes()
    output.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])
    target = tmp_path / "target"

    with pytest.raises(ExportFileError) as caught:
        import_into_appliance(output, target)

    assert "is damaged" in str(caught.value)
    assert "copy it again" in str(caught.value)
    assert not (target / DB_NAME).exists()


def test_import_altered_line_rejected(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    output.write_text(output.read_text().replace('"info"', '"warning"'))

    with pytest.raises(ExportFileError) as caught:
        import_into_appliance(output, tmp_path / "target")

    assert "sha256" in str(caught.value)


def test_import_invalid_line_named_by_number(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    lines = output.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["seq"] = "two"
    lines[2] = json.dumps(record) + "\n"
    header = json.loads(lines[0])
    header["sha256"] = hashlib.sha256("".join(lines[1:]).encode()).hexdigest()
    lines[0] = json.dumps(header) + "\n"
    output.write_text("".join(lines))

    with pytest.raises(ExportFileError) as caught:
        import_into_appliance(output, tmp_path / "target")

    assert caught.value.line == 3
    assert "seq 'two' is not a int" in str(caught.value)


def test_import_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "records.jsonl"
    other.write_text('{"id": "x"}\n')

    with pytest.raises(ExportFileError) as caught:
        import_into_appliance(other, tmp_path / "target")

    assert "is not an export file" in str(caught.value)
    assert caught.value.line == 1


def test_import_conflict_needs_link_prefix(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    target = tmp_path / "target"
    local = _add(target, "pump-1", 3, RecordState.QUEUED)

    with pytest.raises(ImportConflictError) as caught:
        import_into_appliance(output, target)

    assert "--link-prefix" in str(caught.value)
    assert caught.value.conflicts[0][1:] == ("pump-1", 3, local)
    assert list(_rows(target)) == [local]

    result = import_into_appliance(output, target, link_prefix="box-a/")

    links = {row["link"] for row in _rows(target).values()}
    assert result.inserted == len(RecordState)
    assert links == {"pump-1", "box-a/pump-1"}


# Import into a collector -------------------------------------------------------------------


@pytest.fixture
def collector_db(tmp_path: Path) -> Path:
    path = tmp_path / "collector.db"
    CollectorStore(path).close()
    return path


def _collector_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM records ORDER BY id")]


def test_collector_import_stores_finished_records(
    source: Path, tmp_path: Path, collector_db: Path
) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")

    result = import_into_collector(output, collector_db)

    finished = sorted(
        row["id"]
        for row in _rows(source).values()
        if row["state"] in ("validated", "queued", "uploaded")
    )
    assert result.inserted == 3
    assert result.skipped == 3
    assert _collector_ids(collector_db) == finished


def test_collector_reimport_stores_nothing(
    source: Path, tmp_path: Path, collector_db: Path
) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    import_into_collector(output, collector_db)

    again = import_into_collector(output, collector_db)

    assert again.inserted == 0
    assert again.existing == 3
    assert len(_collector_ids(collector_db)) == 3


def test_collector_import_needs_existing_db(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")

    with pytest.raises(ExportFileError) as caught:
        import_into_collector(output, tmp_path / "typo.db")

    assert "no collector database" in str(caught.value)
    assert not (tmp_path / "typo.db").exists()


@pytest.fixture
def collector(collector_db: Path) -> Iterator[Collector]:
    with Collector(collector_db) as server:
        yield server


def test_imported_records_upload_once(
    source: Path, tmp_path: Path, collector: Collector, collector_db: Path
) -> None:
    """A record reaches the collector once, whether by USB, by upload, or both."""
    output = _export_all(source, tmp_path / "all.ndjson")
    relay = tmp_path / "relay"
    import_into_appliance(output, relay)
    uploader = Uploader(relay / DB_NAME, collector.url, compress=False)
    try:
        synced = uploader.sync(deadline=None)
    finally:
        uploader.close()

    direct = import_into_collector(output, collector_db)

    assert synced.records == 2
    assert synced.remaining == 0
    assert direct.inserted == 1
    assert direct.existing == 2
    assert len(_collector_ids(collector_db)) == 3


# Command line -------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, *args], capture_output=True, text=True, timeout=120
    )


def test_cli_export_import_roundtrip(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "usb" / "records.ndjson"
    target = tmp_path / "target"

    exported = _cli(
        "export",
        "--data-dir",
        str(source),
        "--since",
        "2020-01-01",
        "--state",
        "queued",
        "--state",
        "uploaded",
        "--output",
        str(output),
    )
    imported = _cli("import", str(output), "--data-dir", str(target), "--json")
    again = _cli("import", str(output), "--data-dir", str(target))

    assert exported.returncode == 0, exported.stderr
    assert "exported 2 records (queued, uploaded)" in exported.stdout
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["states"] == {"queued": 1, "uploaded": 1}
    assert again.returncode == 0, again.stderr
    assert "imported 0 of 2 records, 2 already present" in again.stdout


def test_cli_import_damaged_file_fails(source: Path, tmp_path: Path) -> None:
    output = _export_all(source, tmp_path / "all.ndjson")
    output.write_bytes(output.read_bytes()[:-20])

    result = _cli("import", str(output), "--data-dir", str(tmp_path / "target"))

    assert result.returncode == 1
    assert result.stderr.startswith("error: export file")
    assert "is damaged" in result.stderr


def test_cli_export_rejects_bad_time(source: Path, tmp_path: Path) -> None:
    result = _cli(
        "export",
        "--data-dir",
        str(source),
        "--since",
        "yesterday",
        "--output",
        str(tmp_path / "x.ndjson"),
    )

    assert result.returncode == 2
    assert "is not a time" in result.stderr
