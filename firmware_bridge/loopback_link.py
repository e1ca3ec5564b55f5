"""In-process link whose device end is a Python object, for tests and the simulator.

The device side, ``LoopbackPeer``, writes bytes that the link's reader thread
moves into the ring buffer, and reads the bytes that the appliance writes. The
link has the states and counters of the serial and BLE links: ``hang_up()`` on
the peer drops the connection, and the link reconnects with capped exponential
backoff and full jitter once ``answer()`` makes the device reachable again.
"""

from __future__ import annotations

import logging
import threading

from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import LinkLostError, PortNotFoundError
from firmware_bridge.link import Link, LinkState, backoff_delay
from firmware_bridge.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

READ_CHUNK = 4096
"""Maximum bytes the reader moves from the wire to the ring per step."""
WIRE_CAPACITY = 4096
"""Bytes the device may have in flight before its writes block, as a UART's
kernel buffer holds a device back when the appliance stops reading."""
POLL_INTERVAL = 0.05
"""Seconds the reader waits for wire bytes before checking for a hang-up."""


class LoopbackPeer:
    """The device end of a ``LoopbackLink``; its methods are safe from any thread.

    Args:
        wire_capacity: bytes in flight towards the appliance before ``write`` blocks.
    """

    def __init__(self, wire_capacity: int = WIRE_CAPACITY) -> None:
        self._wire = RingBuffer(wire_capacity)
        self._inbox = bytearray()
        self._lock = threading.Condition()
        self._connected = True
        self._generation = 0

    @property
    def connected(self) -> bool:
        """True while the device is reachable."""
        return self._connected

    @property
    def generation(self) -> int:
        """Count of hang-ups so far; the link compares it to see that its connection dropped."""
        return self._generation

    def write(self, data: bytes) -> int:
        """Send ``data`` towards the appliance and return the bytes accepted.

        Blocks while the wire is full, and returns early with fewer bytes when
        the peer hangs up meanwhile.

        Raises:
            LinkLostError: the peer is hung up; call ``answer`` first.
        """
        if not self._connected:
            raise LinkLostError(
                "loopback device is hung up: call answer() before write()", "loopback"
            )
        return self._wire.put(data, should_stop=lambda: not self._connected)

    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Remove and return up to ``max_bytes`` the appliance wrote.

        Waits up to ``timeout`` seconds (forever when None) and returns ``b""``
        if nothing arrived.
        """
        with self._lock:
            self._lock.wait_for(lambda: bool(self._inbox), timeout)
            data = bytes(self._inbox[:max_bytes])
            del self._inbox[:max_bytes]
            return data

    def hang_up(self) -> None:
        """Drop the connection; bytes still on the wire towards the appliance are lost."""
        with self._lock:
            self._connected = False
            self._generation += 1
        while self._wire.get(WIRE_CAPACITY, timeout=0):
            pass

    def answer(self) -> None:
        """Make the device reachable again so the link can reconnect."""
        self._connected = True

    def receive(self, data: bytes) -> None:
        """Deliver bytes written by the appliance; called by the link."""
        with self._lock:
            self._inbox += data
            self._lock.notify_all()

    def take(self, max_bytes: int, timeout: float) -> bytes:
        """Remove up to ``max_bytes`` from the wire; called by the link's reader."""
        return self._wire.get(max_bytes, timeout=timeout)


class LoopbackLink(Link):
    """A named link to a ``LoopbackPeer``, feeding a ring buffer from a reader thread.

    Counters: ``bytes`` counts bytes moved into the ring, ``read_errors``
    hang-ups seen, ``reconnects`` connections made again after one, and
    ``write_errors`` writes made while the link was down.

    Args:
        name: the link name used in records and logs.
        ring: the buffer the reader writes into.
        counters: the link's counters, updated in place.
        peer: the device end; a new one when None.
        backoff_base: seconds of the first reconnect delay's upper bound.
        max_backoff: cap, in seconds, on the delay between reconnect attempts.
    """

    def __init__(
        self,
        name: str,
        ring: RingBuffer,
        counters: LinkCounters,
        peer: LoopbackPeer | None = None,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.name = name
        self.ring = ring
        self.counters = counters
        self.peer = peer if peer is not None else LoopbackPeer()
        self.backoff_base = backoff_base
        self.max_backoff = max_backoff
        self.state = LinkState.CLOSED
        self.last_error: str | None = None
        self._up = False
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"loopback:{self.name}"

    def open(self) -> None:
        """Connect to the peer.

        Raises:
            PortNotFoundError: the peer is hung up.
        """
        if not self.peer.connected:
            raise PortNotFoundError(
                f"loopback device of link {self.name!r} is hung up: call "
                "peer.answer() before open()",
                self.label,
            )
        self._generation = self.peer.generation
        self._up = True
        self.state = LinkState.CONNECTED
        logger.info("link %s: opened %s", self.name, self.label)

    def start(self) -> None:
        """Start the reader thread; it reconnects after hang-ups until ``close``."""
        if self._thread is not None:
            return
        if not self._up:
            self.state = LinkState.CONNECTING
        self._thread = threading.Thread(
            target=self._run, name=f"link-{self.name}", daemon=True
        )
        self._thread.start()

    def write(self, data: bytes) -> bool:
        """Deliver ``data`` to the peer; return False when the link is down."""
        with self._write_lock:
            if not self._up or self.peer.generation != self._generation:
                self.counters.write_errors += 1
                return False
            self.peer.receive(data)
        return True

    def close(self) -> None:
        """Stop the reader. Safe to call more than once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._up = False
        self.state = LinkState.CLOSED

    def _run(self) -> None:
        attempt = 0
        after_loss = False
        while not self._stop.is_set():
            if not self._up:
                if self._reconnect(attempt, after_loss):
                    attempt = 0
                else:
                    attempt += 1
                continue
            if self.peer.generation != self._generation:
                self._lose("the device hung up")
                after_loss = True
                continue
            data = self.peer.take(READ_CHUNK, timeout=POLL_INTERVAL)
            if data:
                self.counters.bytes += len(data)
                self._store(data)

    def _lose(self, reason: str) -> None:
        self._up = False
        self.counters.read_errors += 1
        self.last_error = f"link lost: {reason}"
        self.state = LinkState.BACKING_OFF
        logger.warning("link %s: %s; reconnecting", self.name, self.last_error)

    def _reconnect(self, attempt: int, after_loss: bool) -> bool:
        if after_loss or attempt > 0:
            delay = backoff_delay(attempt, base=self.backoff_base, cap=self.max_backoff)
            if self._stop.wait(delay):
                return False
        if not self.peer.connected:
            self.last_error = "the loopback device is hung up"
            self.state = LinkState.BACKING_OFF
            return False
        self._generation = self.peer.generation
        self._up = True
        if after_loss:
            self.counters.reconnects += 1
        self.state = LinkState.CONNECTED
        logger.info("link %s: connected to %s", self.name, self.label)
        return True

    def _store(self, data: bytes) -> None:
        overflows, dropped = self.ring.overflows, self.ring.dropped_bytes
        self.ring.put(data, should_stop=self._stop.is_set)
        self.counters.overflows += self.ring.overflows - overflows
        self.counters.overflow_dropped_bytes += self.ring.dropped_bytes - dropped
