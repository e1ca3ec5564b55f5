"""Tests for opening ports and for the SerialLink reader on a real pseudo-terminal."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import PortError, PortNotFoundError, PortPermissionError
from firmware_bridge.ring_buffer import RingBuffer
from firmware_bridge.serial_link import SerialLink, open_port
from firmware_bridge.simulator import PtyPair

WAIT_SECONDS = 10.0
"""Maximum seconds to wait for the reader thread. A passing run needs far less."""


def read_from_ring(ring: RingBuffer, size: int, timeout: float = WAIT_SECONDS) -> bytes:
    """Remove up to ``size`` bytes from ``ring`` within ``timeout`` seconds."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while len(received) < size and time.monotonic() < deadline:
        received += ring.get(size - len(received), timeout=0.1)
    return bytes(received)


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pair = PtyPair()
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def link(pty_pair: PtyPair) -> Iterator[SerialLink]:
    """A started SerialLink reading the slave side of ``pty_pair``."""
    serial_link = SerialLink(
        "test", pty_pair.slave_path, RingBuffer(65536), LinkCounters()
    )
    serial_link.open()
    serial_link.start()
    try:
        yield serial_link
    finally:
        serial_link.close()


def test_open_port_missing_path_not_found(tmp_path: Path):
    missing = str(tmp_path / "ttyMISSING0")

    with pytest.raises(PortNotFoundError) as raised:
        open_port(missing, 115200, 0.1)

    assert missing in str(raised.value)
    assert "--port" in str(raised.value)
    assert raised.value.port == missing


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root, which opens files regardless of their mode",
)
def test_open_port_mode_000_permission_denied(tmp_path: Path):
    locked = tmp_path / "ttyLOCKED0"
    locked.touch()
    locked.chmod(0o000)

    with pytest.raises(PortPermissionError) as raised:
        open_port(str(locked), 115200, 0.1)

    assert str(locked) in str(raised.value)
    assert raised.value.port == str(locked)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A socket:// URL on loopback whose port rejects connections.

    The socket is bound but never listens, so the Linux kernel rejects a connect
    with a reset (ECONNREFUSED). Because the port stays bound, no other process
    can take it during the test.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        yield f"socket://127.0.0.1:{port}"


def test_open_port_refused_socket_port_error(refused_url: str):
    with pytest.raises(PortError) as raised:
        open_port(refused_url, 115200, 0.1)

    assert refused_url in str(raised.value)
    assert raised.value.port == refused_url


def test_open_port_refused_socket_not_found(refused_url: str):
    with pytest.raises(PortNotFoundError):
        open_port(refused_url, 115200, 0.1)


def test_serial_link_open_missing_path(tmp_path: Path):
    missing = str(tmp_path / "ttyMISSING0")
    serial_link = SerialLink("test", missing, RingBuffer(64), LinkCounters())

    with pytest.raises(PortNotFoundError):
        serial_link.open()

    assert serial_link.state == "closed"


def test_serial_link_reads_pty_into_ring(pty_pair: PtyPair, link: SerialLink):
    data = b"boot ok\r\ntemp=21.5\r\n"

    os.write(pty_pair.master_fd, data)

    assert read_from_ring(link.ring, len(data)) == data
    assert link.counters.bytes == len(data)
    assert link.state == "connected"
    assert link.counters.read_errors == 0


def test_serial_link_survives_invalid_bytes(pty_pair: PtyPair, link: SerialLink):
    garbage = bytes(range(256)) + b"\xff\xfe\xc3\x28\x00\x80"
    after = b"still reading\n"

    os.write(pty_pair.master_fd, garbage)
    received = read_from_ring(link.ring, len(garbage))
    os.write(pty_pair.master_fd, after)

    assert received == garbage
    assert read_from_ring(link.ring, len(after)) == after
    assert link.counters.bytes == len(garbage) + len(after)
    assert link.counters.read_errors == 0
    assert link.counters.reconnects == 0
    assert link.state == "connected"


def test_serial_link_close_stops_reader(pty_pair: PtyPair):
    serial_link = SerialLink(
        "test", pty_pair.slave_path, RingBuffer(64), LinkCounters()
    )
    serial_link.open()
    serial_link.start()

    serial_link.close()
    os.write(pty_pair.master_fd, b"after close\n")

    assert serial_link.state == "closed"
    assert serial_link.ring.get(64, timeout=0.3) == b""
    assert serial_link.counters.bytes == 0


def test_second_open_of_a_port_is_refused(tmp_path) -> None:
    from firmware_bridge.errors import PortError
    from firmware_bridge.serial_link import open_port
    from firmware_bridge.simulator import PtyPair

    pair = PtyPair()
    first = open_port(pair.slave_path, 115200, 0.1)
    try:
        with pytest.raises(PortError, match="in use by another process"):
            open_port(pair.slave_path, 115200, 0.1)
    finally:
        first.close()
        pair.close()


@pytest.mark.parametrize(
    ("path", "message"), [("/dev/null", "not a serial port"), ("/tmp", "directory")]
)
def test_non_tty_paths_are_named(path: str, message: str) -> None:
    from firmware_bridge.errors import PortError
    from firmware_bridge.serial_link import open_port

    with pytest.raises(PortError, match=message):
        open_port(path, 115200, 0.1)
