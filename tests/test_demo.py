"""`appliance run --demo` end to end: pty, simulator, real model, SQLite, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import APPLIANCE, REPO_ROOT, SAMPLE

pytestmark = pytest.mark.model

SAMPLE_LINES = {
    line.split(" ", 1)[1]
    for line in SAMPLE.read_text(encoding="utf-8", errors="replace").splitlines()
}
FINAL = {"queued", "uploaded", "dead"}


def _records(data_dir: Path) -> list[dict]:
    out = subprocess.run(
        [APPLIANCE, "records", "--data-dir", str(data_dir), "--format", "jsonl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _run_demo(
    data_dir: Path, n: int, env: dict[str, str]
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            APPLIANCE,
            "run",
            "--demo",
            "--max-records",
            str(n),
            "--demo-rate",
            "20",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, child_env_module) -> Path:
    data_dir = tmp_path_factory.mktemp("demo")
    result = _run_demo(data_dir, 6, child_env_module)
    assert result.returncode == 0, result.stderr[-2000:]
    return data_dir


@pytest.fixture(scope="module")
def child_env_module() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FIELD_RELAY_DATA_DIR", None)
    return env


def test_demo_stores_requested_record_count(demo_dir: Path) -> None:
    assert len(_records(demo_dir)) == 6


def test_demo_raw_lines_come_from_sample_without_label(demo_dir: Path) -> None:
    assert all(r["raw"] in SAMPLE_LINES for r in _records(demo_dir))


def test_demo_records_are_final(demo_dir: Path) -> None:
    assert {r["state"] for r in _records(demo_dir)} <= FINAL


def test_demo_data_validates_against_schema_file(demo_dir: Path) -> None:
    schema = json.loads((REPO_ROOT / "grammars" / "log_event.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for record in _records(demo_dir):
        if record["data"] is not None:
            assert not list(validator.iter_errors(record["data"])), record


def _status(data_dir: Path) -> dict:
    out = subprocess.run(
        [APPLIANCE, "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_demo_uses_the_sealed_framed_protocol(demo_dir: Path) -> None:
    link = _status(demo_dir)["links"]["demo"]
    assert link["handshakes"] >= 1
    assert link["messages"] >= 6
    assert link["auth_failures"] == 0
    assert link["crc_errors"] == 0


def test_demo_pairs_its_device(demo_dir: Path) -> None:
    out = subprocess.run(
        [APPLIANCE, "devices", "--json", "--data-dir", str(demo_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "demo-device" in out
    key_file = next((demo_dir / "devices").glob("*.json"))
    assert key_file.stat().st_mode & 0o077 == 0


def test_demo_in_line_mode_counts_lines(tmp_path: Path, child_env_module) -> None:
    result = subprocess.run(
        [
            APPLIANCE,
            "run",
            "--demo",
            "--protocol",
            "lines",
            "--max-records",
            "2",
            "--demo-rate",
            "20",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env_module,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _status(tmp_path)["links"]["demo"]["lines"] >= 2
    assert all(r["raw"] in SAMPLE_LINES for r in _records(tmp_path))


def test_demo_rerun_continues_the_sample(demo_dir: Path, child_env_module) -> None:
    before = _records(demo_dir)
    result = _run_demo(demo_dir, 2, child_env_module)
    after = _records(demo_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["seq"] for r in after] == list(range(1, len(before) + 3))
    sample = [
        line.split(" ", 1)[1]
        for line in SAMPLE.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    assert [r["raw"] for r in after] == sample[: len(after)]


def test_sigkill_then_rerun_loses_nothing(tmp_path: Path, child_env_module) -> None:
    data_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            APPLIANCE,
            "run",
            "--demo",
            "--max-records",
            "12",
            "--demo-rate",
            "20",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env_module,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (data_dir / "appliance.db").exists() and len(_records(data_dir)) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["id"] for r in _records(data_dir)}

    result = _run_demo(data_dir, 3, child_env_module)
    after = _records(data_dir)
    ids = [r["id"] for r in after]
    assert result.returncode == 0, result.stderr[-2000:]
    assert before <= set(ids)
    assert len(ids) == len(set(ids))
    assert {r["state"] for r in after} <= FINAL


def test_replay_twice_adds_no_duplicates(tmp_path: Path, child_env_module) -> None:
    sample = tmp_path / "three.log"
    sample.write_text("".join(line + "\n" for line in sorted(SAMPLE_LINES)[:3]))
    for _ in range(2):
        result = subprocess.run(
            [APPLIANCE, "replay", str(sample), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=300,
            env=child_env_module,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert len(_records(tmp_path / "d")) == 3


def test_sigterm_stops_cleanly_and_in_bounded_time(
    tmp_path: Path, child_env_module
) -> None:
    data_dir = tmp_path / "term"
    proc = subprocess.Popen(
        [
            APPLIANCE,
            "run",
            "--demo",
            "--demo-rate",
            "20",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env_module,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (data_dir / "appliance.db").exists() and len(_records(data_dir)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    # One model call may be running; the daemon waits for it, then exits.
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-2000:]
    assert "received signal 15" in stderr
    assert not (data_dir / "control.sock").exists()
    records = _records(data_dir)
    assert len({r["id"] for r in records}) == len(records)
