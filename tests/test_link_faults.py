"""Fault runs through the production chain: simulator, pty, SerialLink, FrameIntake, SQLite.

The device simulator publishes its pty as a symlink and injects faults into
what it writes; the appliance side is the daemon's own link and intake, which
commit to a real SQLite file. Each run checks that every message the device
sent is stored exactly once, in order. The default runs send 1,000 messages;
the ``slow`` runs send 10,000 (make test-slow).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from appliance.frame_intake import FrameIntake
from appliance.store import Store
from firmware_bridge.counters import LinkCounters
from firmware_bridge.device_simulator import FaultOptions, FramedDeviceSimulator
from firmware_bridge.pairing import PairingStore
from firmware_bridge.protocol import ApplianceEndpoint
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from firmware_bridge.serial_link import SerialLink

LINK = "uart0"
NOISE = FaultOptions(
    drop=0.02,
    corrupt=0.02,
    duplicate=0.02,
    reorder=0.02,
    delay=0.01,
    split_writes=True,
    garbage=0.02,
    seed=11,
)
FAULTS = {
    "noise": NOISE,
    "resets": dataclasses.replace(NOISE, reset_every=300),
    "disconnects": dataclasses.replace(
        NOISE, disconnect_every=400, disconnect_seconds=0.3
    ),
}


def run_link(tmp_path: Path, faults: FaultOptions, count: int) -> tuple[Path, dict]:
    """Send ``count`` messages through a faulty link; return the db and counters."""
    pairing = PairingStore(tmp_path / "devices")
    key = pairing.pair("bench-device")
    bodies = [f"{i:06d} pump 3 pressure {i % 97} kPa".encode() for i in range(count)]
    db = tmp_path / "relay.db"
    Store(db).close()
    simulator = FramedDeviceSimulator(
        key,
        str(tmp_path / "ttyDEVICE"),
        messages=bodies,
        faults=faults,
        window=16,
        retransmit_after=0.2,
        handshake_timeout=0.3,
    )
    simulator.start()
    counters = LinkCounters()
    ring = RingBuffer(16384, OverflowPolicy.BLOCK)
    assert simulator.port_path is not None
    link = SerialLink(LINK, simulator.port_path, ring, counters, max_backoff=0.5)
    intake = FrameIntake(
        LINK,
        ring,
        ApplianceEndpoint(pairing.lookup),
        link.write,
        counters,
        db,
        threading.Event(),
    )
    link.open()
    link.start()
    intake.start()
    try:
        # A passing 10,000-message run takes about a minute on two cores.
        assert simulator.finished.wait(timeout=60 + count * 0.05), simulator.stats
    finally:
        link.close()
        intake.stop()
        intake.join(timeout=10)
        ring.close()
        simulator.stop()
    assert intake.error is None
    assert simulator.error is None
    store = Store(db, readonly=True)
    try:
        saved = store.load_link_counters(LINK)
        rows = store.query(
            "SELECT m.number, r.raw FROM records r JOIN messages m ON m.record_id = r.id"
            " ORDER BY r.seq"
        )
    finally:
        store.close()
    numbers = [row["number"] for row in rows]
    assert numbers == list(range(count)), "lost, doubled or reordered messages"
    assert [row["raw"].encode() for row in rows] == bodies
    return db, saved | {"simulator": dataclasses.asdict(simulator.stats)}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_faulty_link_stores_each_message_once(tmp_path: Path, name: str) -> None:
    _, counts = run_link(tmp_path, FAULTS[name], 1000)
    assert counts["crc_errors"] + counts["malformed_frames"] > 0
    if name == "disconnects":
        assert counts["reconnects"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_faulty_link_ten_thousand_messages(tmp_path: Path, name: str) -> None:
    started = time.monotonic()
    _, counts = run_link(tmp_path, FAULTS[name], 10_000)
    print(
        f"\n{name}: 10,000 messages in {time.monotonic() - started:.1f} s, "
        f"{counts['frames']} frames accepted, {counts['crc_errors']} CRC errors, "
        f"{counts['duplicate_messages']} duplicates dropped, "
        f"{counts['reconnects']} reconnects, pid {os.getpid()}"
    )
    assert counts["frames"] >= 10_000
