"""Tests for BleLink: bleak's real BlueZ backend against the emulated BlueZ.

Each test starts a private dbus-daemon, serves ``org.bluez`` on it from
tests/bluez_emulator.py and points bleak at it through
``DBUS_SYSTEM_BUS_ADDRESS``. docs/testing.md lists what the emulation covers
and what only real hardware shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import bleak.exc
import pytest
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)

from firmware_bridge.ble_link import (
    MAPPED_BLEAK_ERRORS,
    BleLink,
    BleTarget,
    bridge_error,
)
from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import (
    AdapterUnavailableError,
    BridgeError,
    DeviceNotFoundError,
    LinkLostError,
    PortError,
)
from firmware_bridge.frames import FrameDecoder, MessageType, encode_frame, header_bytes
from firmware_bridge.link import LinkState
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from tests.bluez_emulator import (
    BATTERY_SERVICE,
    IN_PROGRESS,
    NOT_PERMITTED,
    NUS_TX_UUID,
    BluezEmulator,
    PrivateBus,
    nus_service,
    write_bluetoothctl_shim,
)

ADDRESS = "C4:7F:0E:12:34:56"
NAME = "relay-sensor"
WAIT_SECONDS = 10.0
"""Maximum seconds to wait for the link. A passing run needs far less."""

CUSTOM_SERVICE = "a0b10001-1d5e-4c3a-9a6b-7c2d8e9f0a1b"
CUSTOM_RX = "a0b10002-1d5e-4c3a-9a6b-7c2d8e9f0a1b"
CUSTOM_TX = "a0b10003-1d5e-4c3a-9a6b-7c2d8e9f0a1b"


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def read_from_ring(ring: RingBuffer, size: int, timeout: float = WAIT_SECONDS) -> bytes:
    """Remove up to ``size`` bytes from ``ring`` within ``timeout`` seconds."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while len(received) < size and time.monotonic() < deadline:
        received += ring.get(size - len(received), timeout=0.1)
    return bytes(received)


@pytest.fixture
def bluez(monkeypatch: pytest.MonkeyPatch) -> Iterator[BluezEmulator]:
    """An emulated BlueZ on a private D-Bus daemon, with bleak pointed at it."""
    with PrivateBus() as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        # bleak runs `bluetoothctl --version` once per process and refuses
        # BlueZ older than 5.55. bluetoothd is emulated here, so the shim
        # reports the BlueZ version the emulator models instead of whatever
        # BlueZ the machine has, if any.
        shim = write_bluetoothctl_shim(bus.directory)
        monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
        emulator = BluezEmulator(bus.address)
        emulator.start()
        try:
            yield emulator
        finally:
            emulator.stop()


@pytest.fixture
def make_link(bluez: BluezEmulator) -> Iterator[Callable[..., BleLink]]:
    """Build BleLinks with short timeouts and delays; closes them afterwards."""
    links: list[BleLink] = []

    def make(
        target: BleTarget | None = None,
        ring: RingBuffer | None = None,
        **options: object,
    ) -> BleLink:
        settings: dict[str, object] = {
            "backoff_base": 0.05,
            "max_backoff": 0.2,
            "adapter_poll_interval": 0.05,
            "in_progress_delay": 0.02,
        }
        settings.update(options)
        link = BleLink(
            "ble-test",
            target or BleTarget(name=NAME, scan_timeout=2.0, connect_timeout=5.0),
            ring if ring is not None else RingBuffer(65536),
            LinkCounters(),
            **settings,  # type: ignore[arg-type]
        )
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


def encoded_frames(payloads: list[bytes]) -> bytes:
    """Return DATA frames carrying ``payloads`` with sequence numbers 0, 1, ..."""
    return b"".join(
        encode_frame(header_bytes(MessageType.DATA, 0, 1, seq, len(p)), p)
        for seq, p in enumerate(payloads)
    )


# Connecting


def test_open_by_name_connects_and_subscribes(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()

    link.open()

    assert link.state is LinkState.CONNECTED
    assert bluez.is_connected(ADDRESS)
    assert bluez.is_notifying(ADDRESS)
    assert link.last_error is None
    assert link.counters.reconnects == 0


def test_open_by_address_ignores_case(bluez, make_link):
    bluez.add_peripheral("C4:7F:0E:00:00:01", "other-sensor")
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link(BleTarget(address=ADDRESS.lower(), scan_timeout=2.0))

    link.open()

    assert bluez.is_connected(ADDRESS)
    assert not bluez.is_connected("C4:7F:0E:00:00:01")


def test_open_by_service_uuid_skips_other_devices(bluez, make_link):
    bluez.add_peripheral(
        "C4:7F:0E:00:00:02", "battery-only", services=(BATTERY_SERVICE,)
    )
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link(BleTarget(scan_timeout=2.0))

    link.open()

    assert bluez.is_connected(ADDRESS)
    assert not bluez.is_connected("C4:7F:0E:00:00:02")


def test_open_no_match_names_target(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link(BleTarget(name="absent-sensor", scan_timeout=0.3))

    with pytest.raises(DeviceNotFoundError) as raised:
        link.open()

    message = str(raised.value)
    assert "name 'absent-sensor'" in message
    assert "advertising and in range" in message
    assert raised.value.port == "ble:name=absent-sensor"
    assert link.state is LinkState.CLOSED
    assert link.last_error == message


def test_open_adapter_powered_off_raises(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    bluez.set_powered(False)
    link = make_link()

    with pytest.raises(AdapterUnavailableError) as raised:
        link.open()

    assert "bluetoothctl power on" in str(raised.value)
    assert link.state is LinkState.CLOSED


def test_open_custom_uuids(bluez, make_link):
    service = nus_service(CUSTOM_SERVICE, rx_uuid=CUSTOM_RX, tx_uuid=CUSTOM_TX)
    peripheral = bluez.add_peripheral(ADDRESS, NAME, services=(service,))
    target = BleTarget(
        name=NAME, service_uuid=CUSTOM_SERVICE, tx_uuid=CUSTOM_TX, rx_uuid=CUSTOM_RX
    )
    link = make_link(target)

    link.open()
    bluez.notify(ADDRESS, b"custom\x00", 20, uuid=CUSTOM_TX)

    assert read_from_ring(link.ring, 7) == b"custom\x00"
    assert link.write(b"ack\x00")
    assert bytes(peripheral.received) == b"ack\x00"


def test_target_rejects_malformed_address():
    with pytest.raises(ValueError, match="six hex octets"):
        BleTarget(address="C4:7F:0E:12:34")


def test_target_rejects_malformed_uuid():
    with pytest.raises(ValueError, match="tx_uuid 'not-a-uuid' is not a UUID"):
        BleTarget(tx_uuid="not-a-uuid")


# Data through the ring


@pytest.mark.parametrize(
    ("mtu", "size"),
    [(23, 20), (247, 244), (247, 7), (23, 1)],
    ids=["20-byte", "244-byte", "7-byte", "1-byte"],
)
def test_frames_split_across_notifications_decode_intact(bluez, make_link, mtu, size):
    bluez.add_peripheral(ADDRESS, NAME, mtu=mtu)
    link = make_link()
    link.open()
    link.start()
    payloads = [
        b"",
        b"\x00",
        bytes(range(256)) * 4,
        b"reading 17.5 C\x00\x00",
        b"x" * 300,
    ]
    stream = encoded_frames(payloads)

    bluez.notify(ADDRESS, stream, size)
    received = read_from_ring(link.ring, len(stream))
    decoder = FrameDecoder()
    frames = decoder.feed(received)

    assert received == stream
    assert [f.seq for f in frames] == list(range(len(payloads)))
    assert [f.payload for f in frames] == payloads
    assert decoder.stats.crc_errors == 0
    assert decoder.stats.malformed_frames == 0
    assert link.counters.bytes == len(stream)


def test_full_ring_under_block_never_stalls_event_loop(bluez, make_link):
    peripheral = bluez.add_peripheral(ADDRESS, NAME, mtu=23)
    ring = RingBuffer(64, OverflowPolicy.BLOCK)
    link = make_link(ring=ring, max_pending_bytes=100)
    link.open()
    stream = bytes(range(200))

    bluez.notify(ADDRESS, stream, 20)
    assert wait_for(lambda: link.counters.bytes == len(stream))
    # The ring is full and unread, yet the event loop still serves writes.
    started = time.monotonic()
    assert link.write(b"ack\x00")
    write_seconds = time.monotonic() - started
    dropped = link.counters.overflow_dropped_bytes
    received = read_from_ring(ring, len(stream) - dropped)

    assert write_seconds < 1.0
    assert bytes(peripheral.received) == b"ack\x00"
    # Whole notifications are dropped, never parts, and the rest keep their order.
    sent = [stream[i : i + 20] for i in range(0, len(stream), 20)]
    delivered = [received[i : i + 20] for i in range(0, len(received), 20)]
    assert len(received) % 20 == 0
    positions = [sent.index(piece) for piece in delivered]
    assert positions == sorted(positions)
    assert len(received) + dropped == len(stream)
    assert dropped >= 40
    assert link.counters.overflows >= 2


# Writes


@pytest.mark.parametrize(
    ("mtu", "configured_mtu", "chunk"),
    [(23, None, 20), (247, None, 244), (247, 100, 97)],
    ids=["mtu-23", "mtu-247", "configured-100"],
)
def test_write_splits_into_max_write_size_chunks(
    bluez, make_link, mtu, configured_mtu, chunk
):
    peripheral = bluez.add_peripheral(ADDRESS, NAME, mtu=mtu)
    link = make_link(BleTarget(name=NAME, mtu=configured_mtu))
    link.open()
    data = bytes(range(256)) * 3

    assert link.write(data)

    full, rest = divmod(len(data), chunk)
    assert link.max_write_size == chunk
    assert bytes(peripheral.received) == data
    assert peripheral.write_sizes == [chunk] * full + ([rest] if rest else [])
    assert link.counters.write_errors == 0


def test_write_with_response_uses_write_requests(bluez, make_link):
    peripheral = bluez.add_peripheral(ADDRESS, NAME, mtu=23)
    link = make_link(BleTarget(name=NAME, write_with_response=True))
    link.open()

    assert link.write(b"a" * 45)

    assert peripheral.write_sizes == [20, 20, 5]


def test_write_before_open_counts_error(make_link):
    link = make_link()

    assert not link.write(b"ack\x00")

    assert link.counters.write_errors == 1


# Recovery


def test_forced_disconnect_reconnects(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()
    link.open()
    link.start()

    bluez.force_disconnect(ADDRESS)
    assert wait_for(lambda: link.counters.reconnects == 1)
    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    bluez.notify(ADDRESS, b"after\x00", 20)

    assert read_from_ring(link.ring, 6) == b"after\x00"
    assert link.counters.read_errors == 1
    assert "the device disconnected" in (link.last_error or "")


def test_device_away_backs_off_until_back(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link(BleTarget(name=NAME, scan_timeout=0.2))
    link.open()
    link.start()

    bluez.set_advertising(ADDRESS, False)
    bluez.force_disconnect(ADDRESS)
    assert wait_for(lambda: "no BLE device" in (link.last_error or ""))
    state_while_away = link.state
    bluez.set_advertising(ADDRESS, True)

    assert state_while_away is LinkState.BACKING_OFF
    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    assert link.counters.reconnects == 1
    assert link.counters.read_errors == 1


def test_start_without_open_connects(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()

    link.start()

    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    assert link.counters.reconnects == 0


@pytest.mark.parametrize("member", ["StartDiscovery", "Connect", "StartNotify"])
def test_in_progress_is_retried(bluez, make_link, member):
    bluez.add_peripheral(ADDRESS, NAME)
    bluez.fail_next(member, IN_PROGRESS, "Operation already in progress")
    link = make_link()

    link.open()

    assert link.state is LinkState.CONNECTED
    assert bluez.calls[member] == 2
    assert bluez.is_notifying(ADDRESS)


def test_in_progress_gives_up_after_attempts(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    bluez.fail_next("Connect", IN_PROGRESS, "Operation already in progress", count=10)
    link = make_link()

    with pytest.raises(LinkLostError, match="org.bluez.Error.InProgress"):
        link.open()

    assert bluez.calls["Connect"] == 5


def test_notify_acquired_error_recovers(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    bluez.fail_next("StartNotify", NOT_PERMITTED, "Notify acquired")
    link = make_link()

    link.open()

    assert bluez.calls["StartNotify"] == 2
    assert bluez.calls["StopNotify"] == 1
    assert bluez.is_notifying(ADDRESS)


def test_notify_held_by_other_client_is_released(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    bluez.acquire_notify_on_connect(ADDRESS, NUS_TX_UUID)
    link = make_link()

    link.open()
    bluez.notify(ADDRESS, b"mine\x00", 20)

    assert bluez.calls["StopNotify"] == 1
    assert read_from_ring(link.ring, 5) == b"mine\x00"


def test_adapter_power_cycle_reconnects(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()
    link.open()
    link.start()

    bluez.set_powered(False)
    assert wait_for(lambda: "not available" in (link.last_error or ""))
    time.sleep(0.2)
    state_while_off = link.state
    bluez.set_powered(True)

    assert state_while_off is LinkState.BACKING_OFF
    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    assert link.counters.reconnects == 1
    assert link.counters.read_errors == 1
    bluez.notify(ADDRESS, b"powered\x00", 20)
    assert read_from_ring(link.ring, 8) == b"powered\x00"


def test_stale_cache_handles_rediscovered(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()
    link.open()
    link.start()

    bluez.change_gatt_handles(ADDRESS, 0x0020)
    bluez.force_disconnect(ADDRESS)
    assert wait_for(lambda: link.counters.reconnects == 1)
    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    bluez.notify(ADDRESS, b"moved\x00", 20)

    assert bluez.calls["RemoveDevice"] == 1
    assert any("/service0020" in path for path in bluez.exported_paths(ADDRESS))
    assert read_from_ring(link.ring, 6) == b"moved\x00"


def test_stale_cache_missing_characteristic_rediscovered(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME, cached_services=(BATTERY_SERVICE,))
    link = make_link()

    link.open()

    assert bluez.calls["RemoveDevice"] == 1
    assert bluez.calls["Connect"] == 2
    assert bluez.is_notifying(ADDRESS)


def test_stale_cache_on_write_rediscovered(bluez, make_link):
    peripheral = bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()
    link.open()
    link.start()

    bluez.change_gatt_handles(ADDRESS, 0x0030)
    first_write = link.write(b"lost\x00")
    assert wait_for(lambda: link.counters.reconnects == 1)
    assert wait_for(lambda: link.state is LinkState.CONNECTED)

    assert not first_write
    assert link.counters.write_errors == 1
    assert link.counters.read_errors == 0
    assert bluez.calls["RemoveDevice"] == 1
    assert link.write(b"kept\x00")
    assert bytes(peripheral.received) == b"kept\x00"


def test_missing_service_after_rediscovery_raises(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME, services=(BATTERY_SERVICE,))
    link = make_link()

    with pytest.raises(PortError) as raised:
        link.open()

    assert "6e400001-b5a3-f393-e0a9-e50e24dcca9e" in str(raised.value)
    assert "Set the service, TX and RX UUIDs" in str(raised.value)
    assert bluez.calls["RemoveDevice"] == 1
    assert not bluez.is_connected(ADDRESS)


def test_close_disconnects_and_is_idempotent(bluez, make_link):
    bluez.add_peripheral(ADDRESS, NAME)
    link = make_link()
    link.open()
    link.start()

    link.close()
    link.close()

    assert link.state is LinkState.CLOSED
    assert wait_for(lambda: not bluez.is_connected(ADDRESS))
    assert not link.write(b"late\x00")
    assert link.counters.write_errors == 1
    assert link.counters.read_errors == 0


# Error translation


def test_every_bleak_error_class_is_mapped():
    classes = {
        value
        for value in vars(bleak.exc).values()
        if isinstance(value, type) and issubclass(value, BleakError)
    }

    assert classes - set(MAPPED_BLEAK_ERRORS) == set()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            BleakBluetoothNotAvailableError(
                "off", BleakBluetoothNotAvailableReason.POWERED_OFF
            ),
            AdapterUnavailableError,
        ),
        (
            BleakDBusError("org.bluez.Error.NotReady", ["Resource Not Ready"]),
            AdapterUnavailableError,
        ),
        (
            FileNotFoundError(2, "No such file", "/run/dbus/system_bus_socket"),
            AdapterUnavailableError,
        ),
        (BleakDeviceNotFoundError(ADDRESS, "gone"), DeviceNotFoundError),
        (BleakCharacteristicNotFoundError(NUS_TX_UUID), PortError),
        (BleakGATTProtocolError(0x0E), LinkLostError),
        (BleakDBusError("org.bluez.Error.Failed", ["Operation failed"]), LinkLostError),
        (TimeoutError(), LinkLostError),
        (BleakError("anything else"), LinkLostError),
    ],
    ids=lambda value: type(value).__name__,
)
def test_bridge_error_translates(error, expected):
    translated = bridge_error(BleTarget(name=NAME), "ble-test", error)

    assert isinstance(translated, BridgeError)
    assert type(translated) is expected


# Real hardware


@pytest.mark.ble_hardware
def test_real_device_connects_and_writes(ble_hardware_target):
    """Connect to the device from the environment and write one empty frame."""
    link = BleLink(
        "ble-hardware", ble_hardware_target, RingBuffer(65536), LinkCounters()
    )
    try:
        link.open()
        link.start()
        # A lone 0x00 is an empty COBS frame, which frame decoders skip.
        written = link.write(b"\x00")
    finally:
        link.close()

    assert written
    assert link.counters.write_errors == 0
