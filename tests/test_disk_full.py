"""A full disk: the appliance stops with a clear error and keeps what it committed.

The data directory lives on a tmpfs of a few hundred KiB that the test mounts
(root only; skipped otherwise). A replay larger than the space fails with an
error naming the cause; the records committed before it stay readable and
intact, and once space is freed a rerun finishes the file with no record
lost or doubled.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.store import DB_NAME, Store
from tests.conftest import APPLIANCE

RECORDS = 3000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_committed_records(
    small_disk: Path, tmp_path: Path, child_env: dict[str, str]
) -> None:
    data = tmp_path / "events.jsonl"
    data.write_text(
        "".join(
            json.dumps({"n": n, "text": "pump pressure high " * 8}) + "\n"
            for n in range(RECORDS)
        ),
        encoding="utf-8",
    )
    data_dir = small_disk / "data"
    # Fill most of the disk first, so the database runs out of room early.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 200_000)
    command = [
        APPLIANCE,
        "replay",
        str(data),
        "--kind",
        "json",
        "--data-dir",
        str(data_dir),
    ]

    full = subprocess.run(command, capture_output=True, text=True, env=child_env)

    assert full.returncode == 1, full.stderr[-2000:]
    error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert error, full.stderr[-2000:]
    assert "full" in error[-1].lower()

    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        assert store.query("PRAGMA integrity_check")[0][0] == "ok"
        before = store.query("SELECT COUNT(*) AS n FROM records")[0]["n"]
    finally:
        store.close()

    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = subprocess.run(command, capture_output=True, text=True, env=child_env)
    assert again.returncode == 0, again.stderr[-2000:]

    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        seqs = [
            row["seq"] for row in store.query("SELECT seq FROM records ORDER BY seq")
        ]
    finally:
        store.close()
    assert seqs == list(range(1, RECORDS + 1))
    assert before <= RECORDS
