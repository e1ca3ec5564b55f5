"""Crash loop: the real workflow and upload, killed again and again, lose nothing.

Each iteration runs `appliance replay` (the workflow of the daemon: decode,
validate, enqueue) or `appliance sync --once` (upload) on the same data
directory and ends it abruptly: either with SIGKILL at a random moment, or
with an injected exit just before or just after the N-th transaction commit
(``FIELD_RELAY_CRASH_AT``), so every step boundary is hit in turn. At the end
one clean replay and sync finish the work, and every record must exist once,
be uploaded, and have reached the reference collector once.

The records are the first lines of the real BGL sample as JSON objects, so
the loop needs no model; the model's own step is covered by the crash-resume
acceptance check and tests/test_demo.py. 12 iterations run by default, 200 in
the ``slow`` variant (make test-crash).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.store import DB_NAME, Store
from firmware_bridge.simulator import load_sample_lines
from tests.conftest import APPLIANCE
from tests.http_receiver import unused_port_url

RECORDS = 150


def start_collector(
    tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    port = int(unused_port_url().rsplit(":", 1)[1].split("/")[0])
    proc = subprocess.Popen(
        [
            APPLIANCE,
            "collector",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "collector.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, f"http://127.0.0.1:{port}"


def run_and_crash(
    command: list[str], env: dict[str, str], rng: random.Random, boundary: str | None
) -> int:
    """Run ``command``; kill it at a random moment unless a boundary crash is set."""
    run_env = dict(env)
    if boundary:
        run_env["FIELD_RELAY_CRASH_AT"] = boundary
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env
    )
    if boundary:
        return proc.wait(timeout=120)
    try:
        return proc.wait(timeout=rng.uniform(0.2, 1.2))
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)


def crash_loop(tmp_path: Path, env: dict[str, str], iterations: int, seed: int) -> None:
    data = tmp_path / "events.jsonl"
    lines = load_sample_lines()[:RECORDS]
    data.write_text(
        "".join(
            json.dumps({"line": n + 1, "text": text}) + "\n"
            for n, text in enumerate(lines)
        ),
        encoding="utf-8",
    )
    data_dir = tmp_path / "data"
    collector, base = start_collector(tmp_path, env)
    url = f"{base}/ingest"
    replay = [
        APPLIANCE,
        "replay",
        str(data),
        "--kind",
        "json",
        "--data-dir",
        str(data_dir),
    ]
    sync = [
        APPLIANCE,
        "sync",
        "--once",
        "--timeout",
        "20",
        "--batch-size",
        "25",
        "--upload-url",
        url,
        "--data-dir",
        str(data_dir),
    ]
    rng = random.Random(seed)
    try:
        for iteration in range(iterations):
            command = replay if iteration % 3 != 2 else sync
            boundary = None
            if iteration % 2 == 0:
                where = "commit.before" if iteration % 4 == 0 else "commit.after"
                boundary = f"{where}:{1 + (iteration * 7) % 23}"
            run_and_crash(command, env, rng, boundary)

        finished = subprocess.run(replay, capture_output=True, text=True, env=env)
        assert finished.returncode == 0, finished.stderr[-2000:]
        for _ in range(5):
            uploaded = subprocess.run(sync, capture_output=True, text=True, env=env)
            if uploaded.returncode == 0:
                break
            time.sleep(1)
        assert uploaded.returncode == 0, uploaded.stderr[-2000:]

        store = Store(data_dir / DB_NAME, readonly=True)
        try:
            rows = store.query("SELECT id, seq, state FROM records ORDER BY seq")
        finally:
            store.close()
        assert [row["seq"] for row in rows] == list(range(1, RECORDS + 1))
        assert {row["state"] for row in rows} == {"uploaded"}

        with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
            stats = json.loads(response.read())
        assert stats["records"] == RECORDS, stats
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.communicate(timeout=30)


@pytest.fixture
def env(child_env: dict[str, str]) -> dict[str, str]:
    clean = dict(child_env)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        clean.pop(name, None)
    clean["NO_PROXY"] = "127.0.0.1,localhost"
    return clean


def test_crash_loop_short(tmp_path: Path, env: dict[str, str]) -> None:
    crash_loop(tmp_path, env, iterations=12, seed=1)


@pytest.mark.slow
def test_crash_loop_200_iterations(tmp_path: Path, env: dict[str, str]) -> None:
    crash_loop(tmp_path, env, iterations=200, seed=2)
