"""`appliance run --config` with several links at once and the real model.

Two framed devices (one of them dropping frames and unplugging) and one
legacy line device feed one daemon; each link's records, counters and state
must be its own.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from firmware_bridge.device_simulator import FaultOptions, FramedDeviceSimulator
from firmware_bridge.pairing import PairingStore
from firmware_bridge.simulator import LineDeviceSimulator, PtyPair
from tests.conftest import APPLIANCE

pytestmark = pytest.mark.model

PER_LINK = 3


def _link_state(data_dir: Path, link: str) -> str | None:
    result = subprocess.run(
        [APPLIANCE, "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)["links"].get(link, {}).get("state")


def test_three_links_in_one_daemon(tmp_path: Path, child_env: dict[str, str]) -> None:
    data_dir = tmp_path / "data"
    pairing = PairingStore(data_dir / "devices")
    keys = [pairing.pair(name) for name in ("pump-a", "pump-b")]
    faults = [FaultOptions(), FaultOptions(drop=0.2, disconnect_every=2, seed=3)]
    simulators = [
        FramedDeviceSimulator(
            key,
            str(tmp_path / f"tty{index}"),
            messages=[f"{key.name} reading {n} at 71 °C".encode() for n in range(5)],
            faults=fault,
            retransmit_after=0.3,
        )
        for index, (key, fault) in enumerate(zip(keys, faults, strict=True))
    ]
    pty = PtyPair()
    legacy = LineDeviceSimulator(
        pty.master_fd, [f"legacy line {n}" for n in range(5)], rate=20.0
    )
    for simulator in simulators:
        simulator.start()
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[[links]]
name = "pump-a"
port = "{simulators[0].port_path}"

[[links]]
name = "pump-b"
port = "{simulators[1].port_path}"

[[links]]
name = "legacy"
port = "{pty.slave_path}"
protocol = "lines"
""",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [
            APPLIANCE,
            "run",
            "--config",
            str(config),
            "--max-records",
            str(PER_LINK),
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    try:
        # Opening a tty discards bytes already waiting in it, and a line device
        # has no acknowledgements to resend them: start it once the link is up.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _link_state(data_dir, "legacy") == "connected":
                break
            time.sleep(0.2)
        legacy.start()
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        legacy.stop()
        for simulator in simulators:
            simulator.stop()
        pty.close()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [
        json.loads(line)
        for line in subprocess.run(
            [APPLIANCE, "records", "--format", "jsonl", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    ]
    by_link: dict[str, list[str]] = {}
    for record in records:
        by_link.setdefault(record["link"], []).append(record["raw"])
    assert by_link["pump-a"] == [f"pump-a reading {n} at 71 °C" for n in range(3)]
    assert by_link["pump-b"] == [f"pump-b reading {n} at 71 °C" for n in range(3)]
    assert by_link["legacy"] == [f"legacy line {n}" for n in range(3)]

    status = json.loads(
        subprocess.run(
            [APPLIANCE, "status", "--json", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    links = status["links"]
    assert set(links) == {"pump-a", "pump-b", "legacy"}
    assert links["pump-a"]["protocol"] == "framed"
    assert links["legacy"]["protocol"] == "lines"
    assert links["legacy"]["lines"] >= PER_LINK
    assert links["pump-a"]["handshakes"] >= 1
    assert all(link["state"] for link in links.values())
