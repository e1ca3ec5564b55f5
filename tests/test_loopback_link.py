"""Tests for LoopbackLink: bytes both ways, states, counters and reconnection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import LinkLostError, PortNotFoundError
from firmware_bridge.frames import FrameDecoder, MessageType, encode_frame, header_bytes
from firmware_bridge.link import LinkState
from firmware_bridge.loopback_link import LoopbackLink, LoopbackPeer
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer

WAIT_SECONDS = 10.0
"""Maximum seconds to wait for the reader thread. A passing run needs far less."""


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
def link() -> Iterator[LoopbackLink]:
    """An open, started LoopbackLink with short reconnect delays."""
    loopback = LoopbackLink(
        "loop", RingBuffer(65536), LinkCounters(), backoff_base=0.02, max_backoff=0.1
    )
    loopback.open()
    loopback.start()
    try:
        yield loopback
    finally:
        loopback.close()


def test_loopback_device_bytes_reach_ring(link):
    link.peer.write(b"hello\x00")

    assert read_from_ring(link.ring, 6) == b"hello\x00"
    assert link.counters.bytes == 6
    assert link.state is LinkState.CONNECTED


def test_loopback_frames_decode_intact(link):
    payloads = [b"", bytes(range(256)) * 4, b"17.5 C\x00"]
    stream = b"".join(
        encode_frame(header_bytes(MessageType.DATA, 0, 1, seq, len(p)), p)
        for seq, p in enumerate(payloads)
    )

    for start in range(0, len(stream), 7):
        link.peer.write(stream[start : start + 7])
    frames = FrameDecoder().feed(read_from_ring(link.ring, len(stream)))

    assert [f.payload for f in frames] == payloads


def test_loopback_appliance_writes_reach_peer(link):
    assert link.write(b"ack-1\x00")
    assert link.write(b"ack-2\x00")

    assert link.peer.read(timeout=1.0) == b"ack-1\x00ack-2\x00"
    assert link.counters.write_errors == 0


def test_loopback_peer_read_times_out_empty(link):
    assert link.peer.read(timeout=0.05) == b""


def test_loopback_hang_up_backs_off_then_reconnects(link):
    link.peer.hang_up()
    assert wait_for(lambda: link.state is LinkState.BACKING_OFF)
    write_while_down = link.write(b"lost\x00")
    time.sleep(0.2)
    state_while_down = link.state

    link.peer.answer()

    assert not write_while_down
    assert state_while_down is LinkState.BACKING_OFF
    assert wait_for(lambda: link.state is LinkState.CONNECTED)
    assert link.counters.read_errors == 1
    assert link.counters.reconnects == 1
    assert link.counters.write_errors == 1
    assert link.last_error == "the loopback device is hung up"
    link.peer.write(b"back\x00")
    assert read_from_ring(link.ring, 5) == b"back\x00"


def test_loopback_quick_redial_counts_drop(link):
    link.peer.hang_up()
    link.peer.answer()

    assert wait_for(lambda: link.counters.reconnects == 1)
    assert link.counters.read_errors == 1
    assert wait_for(lambda: link.state is LinkState.CONNECTED)


def test_loopback_peer_write_while_hung_up_raises(link):
    link.peer.hang_up()

    with pytest.raises(LinkLostError, match="call answer"):
        link.peer.write(b"x")


def test_loopback_open_hung_up_peer_raises():
    peer = LoopbackPeer()
    peer.hang_up()
    link = LoopbackLink("loop", RingBuffer(64), LinkCounters(), peer=peer)

    with pytest.raises(PortNotFoundError) as raised:
        link.open()

    assert "peer.answer()" in str(raised.value)
    assert raised.value.port == "loopback:loop"
    assert link.state is LinkState.CLOSED


def test_loopback_start_without_open_connects():
    link = LoopbackLink("loop", RingBuffer(64), LinkCounters())
    try:
        link.start()
        assert wait_for(lambda: link.state is LinkState.CONNECTED)
        assert link.counters.reconnects == 0
    finally:
        link.close()


def test_loopback_full_ring_holds_device_back():
    ring = RingBuffer(16, OverflowPolicy.BLOCK)
    link = LoopbackLink(
        "loop", ring, LinkCounters(), peer=LoopbackPeer(wire_capacity=16)
    )
    link.open()
    link.start()
    data = bytes(range(64))
    accepted: list[int] = []
    writer = threading.Thread(target=lambda: accepted.append(link.peer.write(data)))
    try:
        writer.start()
        time.sleep(0.2)
        blocked = writer.is_alive()
        received = read_from_ring(ring, len(data))
        writer.join(timeout=WAIT_SECONDS)
    finally:
        link.close()

    assert blocked
    assert received == data
    assert accepted == [len(data)]
    assert link.counters.overflows >= 1
    assert link.counters.overflow_dropped_bytes == 0


def test_loopback_drop_oldest_counts_dropped_bytes():
    ring = RingBuffer(8, OverflowPolicy.DROP_OLDEST)
    small = LoopbackLink("small", ring, LinkCounters())
    small.open()
    small.start()
    try:
        small.peer.write(bytes(range(20)))
        assert wait_for(lambda: small.counters.bytes == 20)
    finally:
        small.close()

    assert ring.get(8, timeout=0) == bytes(range(12, 20))
    assert small.counters.overflow_dropped_bytes == 12


def test_loopback_close_is_idempotent(link):
    link.close()
    link.close()

    assert link.state is LinkState.CLOSED
    assert not link.write(b"late")
    assert link.counters.write_errors == 1
