"""The `status`, `records` and `replay --kind json` commands, run without a network or model.

Each test runs the installed ``appliance`` command in a subprocess. JSON lines
are decoded without the model, so these tests never load llama.cpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APPLIANCE = Path(sys.executable).parent / "appliance"
CLI_TIMEOUT = 60.0
"""Seconds any single CLI run may take before the test fails."""

READINGS = [
    '{"sensor": "t1", "value": 21.5}',
    '{"sensor": "t2", "value": -3}',
    '{"sensor": "t3", "value": 0.25, "unit": "µm"}',
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``appliance`` command and return its exit code and output."""
    return subprocess.run(
        [str(APPLIANCE), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def replay_lines(tmp_path: Path, data_dir: Path, lines: list[str]) -> None:
    """Write ``lines`` to a file and replay it into ``data_dir`` as JSON records."""
    source = tmp_path / "replay.jsonl"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    replay = run_cli(
        "replay", str(source), "--kind", "json", "--data-dir", str(data_dir)
    )
    assert replay.returncode == 0, replay.stderr


def test_status_json_counts_states_and_outbox(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # The last line is not a JSON object, so decoding moves it to dead.
    replay_lines(tmp_path, data_dir, [*READINGS, "[1, 2]"])

    status = run_cli("status", "--json", "--data-dir", str(data_dir))

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["data_dir"] == str(data_dir)
    assert report["records"] == {
        "received": 0,
        "inferred": 0,
        "validated": 0,
        "queued": 3,
        "uploaded": 0,
        "dead": 1,
    }
    assert report["outbox"]["queued"] == 3
    assert report["outbox"]["oldest_queued_age_s"] >= 0
    assert report["batches"] == {"delivered": 0, "open": 0}
    link = f"replay:{(tmp_path / 'replay.jsonl').resolve()}"
    assert list(report["links"]) == [link]
    assert report["links"][link]["lines"] == 4


def test_records_jsonl_filters_state_and_limit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    replay_lines(tmp_path, data_dir, ["not json", *READINGS])

    listing = run_cli(
        "records",
        "--format",
        "jsonl",
        "--state",
        "queued",
        "--limit",
        "2",
        "--data-dir",
        str(data_dir),
    )

    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    # Oldest first, and the dead "not json" record is filtered out.
    for record, raw in zip(records, READINGS[:2], strict=True):
        assert record["id"]
        assert record["state"] == "queued"
        assert record["raw"] == raw
        assert record["data"] == json.loads(raw)
    assert records[0]["id"] != records[1]["id"]


def test_records_jsonl_keeps_non_ascii(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    replay_lines(tmp_path, data_dir, READINGS[2:])

    listing = run_cli("records", "--format", "jsonl", "--data-dir", str(data_dir))

    assert listing.returncode == 0, listing.stderr
    assert "µm" in listing.stdout
    record = json.loads(listing.stdout)
    assert record["data"]["unit"] == "µm"


def test_replay_twice_adds_no_duplicates(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    replay_lines(tmp_path, data_dir, READINGS)
    replay_lines(tmp_path, data_dir, READINGS)

    status = run_cli("status", "--json", "--data-dir", str(data_dir))

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["records"]["queued"] == len(READINGS)


def test_missing_data_dir_reports_zero_records(tmp_path: Path) -> None:
    data_dir = tmp_path / "absent"

    status = run_cli("status", "--json", "--data-dir", str(data_dir))
    text_status = run_cli("status", "--data-dir", str(data_dir))
    listing = run_cli("records", "--format", "jsonl", "--data-dir", str(data_dir))

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert set(report["records"].values()) == {0}
    assert len(report["records"]) == 6
    assert report["outbox"] == {"queued": 0, "bytes": 0, "oldest_queued_age_s": None}
    assert text_status.returncode == 0, text_status.stderr
    assert "0 queued" in text_status.stdout
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout == ""
    # Reading commands must not create the directory as a side effect.
    assert not data_dir.exists()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores directory permissions, so chmod 500 cannot make it unwritable",
)
def test_replay_unwritable_data_dir_fails_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    source = tmp_path / "replay.jsonl"
    source.write_text(READINGS[0] + "\n", encoding="utf-8")
    data_dir.chmod(0o500)
    try:
        replay = run_cli(
            "replay", str(source), "--kind", "json", "--data-dir", str(data_dir)
        )
    finally:
        data_dir.chmod(0o700)

    assert replay.returncode == 1
    stderr_lines = replay.stderr.splitlines()
    assert stderr_lines
    assert "Traceback" not in replay.stderr
    errors = [line for line in stderr_lines if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0] == stderr_lines[-1]
    assert str(data_dir) in errors[0]
    assert not (data_dir / "appliance.db").exists()
