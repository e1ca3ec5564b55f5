"""Finding serial adapters by USB identity, and `appliance scan`.

No USB adapter exists on the test machine, so pyserial's port listing is
replaced by a fixed list; the ports it names are real ptys, so the link
opens, reads and reconnects for real.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from firmware_bridge import serial_link
from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import PortNotFoundError
from firmware_bridge.link import LinkState
from firmware_bridge.ring_buffer import RingBuffer
from firmware_bridge.serial_link import SerialLink, usb_port_resolver
from firmware_bridge.simulator import PtyPair


@dataclasses.dataclass
class FakePort:
    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None = None
    description: str = "USB serial"


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> list[FakePort]:
    listed: list[FakePort] = []
    monkeypatch.setattr(serial_link.list_ports, "comports", lambda: list(listed))
    return listed


def read(ring: RingBuffer, size: int) -> bytes:
    """Collect ``size`` bytes from the ring, waiting up to 5 s in all."""
    data = b""
    deadline = time.monotonic() + 5
    while len(data) < size and time.monotonic() < deadline:
        data += ring.get(size - len(data), timeout=0.1)
    return data


def test_resolver_finds_adapter_by_identity(ports: list[FakePort]) -> None:
    ports += [
        FakePort("/dev/ttyUSB0", 0x0403, 0x6001, "OTHER"),
        FakePort("/dev/ttyUSB1", 0x0403, 0x6001, "A12"),
        FakePort("/dev/ttyS0", None, None),
    ]
    assert usb_port_resolver(0x0403, 0x6001, "A12")() == "/dev/ttyUSB1"
    assert usb_port_resolver(0x0403, 0x6001)() == "/dev/ttyUSB0"


def test_resolver_names_what_it_saw(ports: list[FakePort]) -> None:
    ports.append(FakePort("/dev/ttyACM0", 0x2341, 0x0043))
    with pytest.raises(PortNotFoundError) as caught:
        usb_port_resolver(0x0403, 0x6001, "A12")()
    message = str(caught.value)
    assert "0403:6001" in message
    assert "/dev/ttyACM0 (2341:0043)" in message
    assert "appliance scan" in message


def test_reenumerated_adapter_is_found_again(ports: list[FakePort]) -> None:
    first, second = PtyPair(), PtyPair()
    ports.append(FakePort(first.slave_path, 0x0403, 0x6001, "A12"))
    ring = RingBuffer(4096)
    counters = LinkCounters()
    link = SerialLink(
        "usb0",
        usb_port_resolver(0x0403, 0x6001, "A12"),
        ring,
        counters,
        max_backoff=0.2,
    )
    try:
        link.open()
        link.start()
        os.write(first.master_fd, b"before\n")
        assert read(ring, 7) == b"before\n"
        # Unplug: the device end goes away and the adapter comes back under
        # another name.
        ports.clear()
        first.close()
        ports.append(FakePort(second.slave_path, 0x0403, 0x6001, "A12"))
        deadline = time.monotonic() + 10
        while counters.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counters.reconnects >= 1
        assert link.url == second.slave_path
        assert link.state == LinkState.CONNECTED
        os.write(second.master_fd, b"after\n")
        assert read(ring, 6) == b"after\n"
    finally:
        link.close()
        second.close()


def test_scan_lists_usb_identity(ports: list[FakePort]) -> None:
    ports.append(FakePort("/dev/ttyUSB3", 0x10C4, 0xEA60, "0001"))
    result = CliRunner().invoke(main, ["scan", "--ble-seconds", "0"])
    assert result.exit_code == 0, result.output
    assert "/dev/ttyUSB3" in result.output
    assert "usb 10c4:ea60" in result.output
    assert "serial 0001" in result.output


def test_scan_json(ports: list[FakePort], tmp_path: Path) -> None:
    ports.append(FakePort("/dev/ttyUSB3", 0x10C4, 0xEA60))
    result = CliRunner().invoke(main, ["scan", "--ble-seconds", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert '"vid": "10c4"' in result.output
