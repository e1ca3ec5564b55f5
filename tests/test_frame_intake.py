"""Framed intake over a real pty into a real SQLite file, without a model.

A device thread runs ``DeviceEndpoint`` on the pty's master side; the appliance
side is the production chain: SerialLink, RingBuffer, ApplianceEndpoint and
FrameIntake committing records.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.frame_intake import FrameIntake
from appliance.store import Store
from firmware_bridge.counters import LinkCounters
from firmware_bridge.frames import Flag, MessageType, encode_frame, header_bytes
from firmware_bridge.protocol import ApplianceEndpoint, DeviceEndpoint, DeviceState
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.simulator import PtyPair

LINK = "uart0"
DEVICE_ID = bytes.fromhex("00112233445566aa")
PSK = bytes(range(32))
WAIT_SECONDS = 30.0
"""Maximum seconds to wait for the threads. A passing run needs far less."""


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class DeviceThread(threading.Thread):
    """Runs a DeviceEndpoint on a pty master; ``inject`` adds raw bytes."""

    def __init__(self, fd: int, device: DeviceEndpoint) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.device = device
        self.stop_event = threading.Event()
        self.extra: list[bytes] = []
        self.sent: list[bytes] = []
        """Every byte string written, for replay attacks."""
        self.lock = threading.Lock()

    def inject(self, data: bytes) -> None:
        with self.lock:
            self.extra.append(data)

    def run(self) -> None:
        while not self.stop_event.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.01)
            now = time.monotonic()
            with self.lock:
                if ready:
                    try:
                        self.device.receive(os.read(self.fd, 65536), now)
                    except OSError:
                        return
                out = self.device.poll(now) + b"".join(self.extra)
                self.extra.clear()
            if out:
                self.sent.append(out)
                os.write(self.fd, out)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class Appliance:
    """The appliance side of one framed link over ``port``."""

    def __init__(
        self, port: str, db: Path, keys: dict[bytes, bytes], **kwargs: object
    ) -> None:
        self.counters = LinkCounters()
        self.ring = RingBuffer(4096, OverflowPolicy.BLOCK)
        self.link = SerialLink(LINK, port, self.ring, self.counters)
        self.endpoint = ApplianceEndpoint(keys.get)
        self.intake = FrameIntake(
            LINK,
            self.ring,
            self.endpoint,
            self.link.write,
            self.counters,
            db,
            threading.Event(),
            **kwargs,  # type: ignore[arg-type]
        )
        self.link.open()
        self.link.start()
        self.intake.start()

    def stop(self) -> None:
        self.link.close()
        self.intake.stop()
        self.intake.join(timeout=10)
        self.ring.close()
        assert self.intake.error is None


@pytest.fixture
def pty() -> Iterator[PtyPair]:
    pair = PtyPair()
    yield pair
    pair.close()


def stored(db: Path) -> list[tuple[int, str]]:
    store = Store(db, readonly=True)
    try:
        rows = store.query(
            "SELECT m.number, r.raw FROM records r JOIN messages m ON m.record_id = r.id"
            " ORDER BY r.seq"
        )
        return [(row["number"], row["raw"]) for row in rows]
    finally:
        store.close()


def counters(db: Path) -> dict[str, int]:
    store = Store(db, readonly=True)
    try:
        return store.load_link_counters(LINK)
    finally:
        store.close()


def test_every_message_is_stored_once_in_order(pty: PtyPair, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    bodies = [f"line {i} °C".encode() for i in range(300)]
    for body in bodies:
        device.submit(body)
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        assert wait_until(lambda: device.acked == len(bodies))
    finally:
        thread.stop()
        appliance.stop()
    assert stored(db) == [(i, b.decode()) for i, b in enumerate(bodies)]
    assert device.unacknowledged == 0


def test_appliance_restart_resumes_without_loss_or_duplicates(
    pty: PtyPair, tmp_path: Path
) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK, retransmit_after=0.2)
    thread = DeviceThread(pty.master_fd, device)
    first = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    thread.start()
    try:
        for i in range(100):
            device.submit(f"a{i}".encode())
        assert wait_until(lambda: device.acked >= 50)
        first.stop()
        with thread.lock:
            for i in range(100, 200):
                device.submit(f"a{i}".encode())
        # A new appliance process has no session: the device's frames are
        # stale, it is told to handshake again and resends what is unacked.
        second = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
        try:
            assert wait_until(lambda: device.acked == 200)
        finally:
            second.stop()
    finally:
        thread.stop()
    assert [number for number, _ in stored(db)] == list(range(200))


def test_messages_past_max_records_stay_with_the_device(
    pty: PtyPair, tmp_path: Path
) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    for i in range(40):
        device.submit(f"m{i}".encode())
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK}, max_records=25)
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        assert wait_until(appliance.intake.done.is_set)
        time.sleep(0.3)
    finally:
        thread.stop()
        appliance.stop()
    assert len(stored(db)) == 25
    assert device.acked == 25
    assert device.unacknowledged == 15


def test_forged_and_replayed_frames_are_counted(pty: PtyPair, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        device.submit(b"genuine")
        assert wait_until(lambda: device.acked == 1)
        with thread.lock:
            data_frames = [out for out in thread.sent if len(out) > 30]
            key_id = device._session.key_id  # type: ignore[union-attr]
        thread.inject(data_frames[-1])  # a replay of the sealed data frame
        header = header_bytes(MessageType.DATA, Flag.SEALED, key_id, 999, 24)
        thread.inject(encode_frame(header, bytes(24)))  # a forged tag
        plain = header_bytes(MessageType.DATA, 0, key_id, 1000, 8)
        thread.inject(encode_frame(plain, b"\x00\x00\x00\x01evil"))  # plaintext
        device.submit(b"after")
        assert wait_until(lambda: device.acked == 2)
        assert wait_until(
            lambda: (
                appliance.endpoint.stats.plaintext_refused == 1
                and appliance.endpoint.stats.auth_failures == 1
            )
        )
    finally:
        thread.stop()
        appliance.stop()
    saved = counters(db)
    assert saved["replayed_frames"] + saved["duplicate_messages"] >= 1
    assert saved["auth_failures"] == 1
    assert saved["plaintext_refused"] == 1
    assert [raw for _, raw in stored(db)] == ["genuine", "after"]


def test_unpaired_device_is_refused(pty: PtyPair, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    device.submit(b"should not land")
    appliance = Appliance(pty.slave_path, db, {})
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        assert wait_until(lambda: device.state == DeviceState.REFUSED)
    finally:
        thread.stop()
        appliance.stop()
    assert stored(db) == []
    assert counters(db)["unpaired_hellos"] >= 1


def test_link_counters_are_plain_json(pty: PtyPair, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    appliance.stop()
    saved = counters(db)
    assert json.loads(json.dumps(saved)) == saved
    assert {"crc_errors", "auth_failures", "replayed_frames", "frames"} <= set(saved)


def test_empty_message_is_acknowledged_not_stored(pty: PtyPair, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    for body in (b"first", b"   ", b"", b"last"):
        device.submit(body)
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        assert wait_until(lambda: device.acked == 4)
    finally:
        thread.stop()
        appliance.stop()
    assert [raw for _, raw in stored(db)] == ["first", "last"]
    assert counters(db)["empty_lines"] == 2


def test_text_on_a_framed_link_is_named(
    pty: PtyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "relay.db"
    appliance = Appliance(pty.slave_path, db, {DEVICE_ID: PSK})
    try:
        for n in range(3):
            os.write(pty.master_fd, f"pump {n} pressure high\r\n".encode() * 200)
        assert wait_until(lambda: 'protocol = "lines"' in caplog.text)
    finally:
        appliance.stop()
    assert stored(db) == []


def test_unusable_key_file_is_counted_apart(pty: PtyPair, tmp_path: Path) -> None:
    from firmware_bridge.errors import PairingError

    def lookup(device_id: bytes) -> bytes | None:
        raise PairingError("key file has mode 644: run chmod 600")

    db = tmp_path / "relay.db"
    device = DeviceEndpoint(DEVICE_ID, PSK)
    appliance = Appliance(pty.slave_path, db, {})
    appliance.endpoint._lookup_key = lookup
    thread = DeviceThread(pty.master_fd, device)
    thread.start()
    try:
        assert wait_until(lambda: appliance.endpoint.stats.key_errors >= 1)
    finally:
        thread.stop()
        appliance.stop()
    assert appliance.endpoint.stats.unpaired_hellos == 0


def test_rejected_frames_log_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = ApplianceEndpoint(lambda device_id: None, link="x")
    plain = header_bytes(MessageType.DATA, 0, 1, 1, 4)
    with caplog.at_level("WARNING"):
        for _ in range(50):
            endpoint.receive(encode_frame(plain, b"\x00\x00\x00\x01"), 0.0)
    assert endpoint.stats.plaintext_refused == 50
    assert caplog.text.count("plaintext") == 1
