"""Bounded byte ring buffer between a link's reader thread and its consumer.

The buffer holds at most ``capacity`` bytes. When a write does not fit, the
overflow policy decides what happens:

- ``block``: the writer waits until the consumer frees space. The reader then
  stops draining the port, so the kernel's tty buffer fills and the device is
  held back by flow control (RTS/CTS or XON/XOFF where the port has it) or by
  its own blocking writes. No byte is lost inside the appliance.
- ``drop_oldest``: the oldest buffered bytes are discarded to make room and
  counted in ``dropped_bytes``; the writer never waits.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from firmware_bridge.errors import BufferClosedError


class OverflowPolicy(enum.StrEnum):
    """Behaviour of a full ring buffer towards a write that does not fit."""

    BLOCK = "block"
    """Wait for free space; pushes back on the device."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest bytes and count them."""


class RingBuffer:
    """A thread-safe bounded FIFO of bytes for one producer and one consumer.

    Args:
        capacity: maximum number of buffered bytes; must be positive.
        policy: behaviour when a write does not fit.
    """

    def __init__(
        self, capacity: int, policy: OverflowPolicy = OverflowPolicy.BLOCK
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, got {capacity!r}")
        self.capacity = capacity
        self.policy = OverflowPolicy(policy)
        self._buf = bytearray(capacity)
        self._start = 0
        self._size = 0
        self._closed = False
        self._cond = threading.Condition()
        self.dropped_bytes = 0
        """Bytes discarded by the ``drop_oldest`` policy since creation."""
        self.overflows = 0
        """Writes that found the buffer full (blocked or dropped)."""
        self.high_water = 0
        """Largest fill level seen, in bytes."""

    def __len__(self) -> int:
        with self._cond:
            return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, data: bytes, should_stop: Callable[[], bool] | None = None) -> int:
        """Append ``data`` and return the number of bytes stored.

        Under ``block`` the call waits for space in slices of 0.1 s and returns
        early, with fewer bytes stored, once ``should_stop()`` is true or the
        buffer closes. Under ``drop_oldest`` it never waits; if ``data`` alone
        exceeds the capacity, only its last ``capacity`` bytes are kept.

        Raises:
            BufferClosedError: the buffer was closed before the call.
        """
        view = memoryview(data)
        with self._cond:
            if self._closed:
                raise BufferClosedError("ring buffer is closed")
            if self.policy is OverflowPolicy.DROP_OLDEST:
                return self._put_dropping(view)

            stored = 0
            counted_overflow = False
            while stored < len(view):
                free = self.capacity - self._size
                if free == 0:
                    if not counted_overflow:
                        self.overflows += 1
                        counted_overflow = True
                    if self._closed or (should_stop is not None and should_stop()):
                        break
                    self._cond.wait(0.1)
                    continue
                chunk = view[stored : stored + free]
                self._write(chunk)
                stored += len(chunk)
                self._cond.notify_all()
            return stored

    def _put_dropping(self, view: memoryview) -> int:
        overflowed = False
        if len(view) > self.capacity:
            overflowed = True
            self.dropped_bytes += len(view) - self.capacity
            view = view[len(view) - self.capacity :]
        excess = self._size + len(view) - self.capacity
        if excess > 0:
            overflowed = True
            self.dropped_bytes += excess
            self._start = (self._start + excess) % self.capacity
            self._size -= excess
        if overflowed:
            self.overflows += 1
        self._write(view)
        self._cond.notify_all()
        return len(view)

    def _write(self, chunk: memoryview) -> None:
        end = (self._start + self._size) % self.capacity
        first = min(len(chunk), self.capacity - end)
        self._buf[end : end + first] = chunk[:first]
        if first < len(chunk):
            self._buf[0 : len(chunk) - first] = chunk[first:]
        self._size += len(chunk)
        self.high_water = max(self.high_water, self._size)

    def get(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Remove and return up to ``max_bytes`` bytes.

        Waits up to ``timeout`` seconds (forever when None) for data and returns
        ``b""`` if none arrived or the buffer is closed and empty.
        """
        with self._cond:
            if self._size == 0 and not self._closed:
                self._cond.wait_for(lambda: self._size > 0 or self._closed, timeout)
            n = min(max_bytes, self._size)
            if n == 0:
                return b""
            first = min(n, self.capacity - self._start)
            out = bytes(self._buf[self._start : self._start + first])
            if first < n:
                out += bytes(self._buf[0 : n - first])
            self._start = (self._start + n) % self.capacity
            self._size -= n
            self._cond.notify_all()
            return out

    def close(self) -> None:
        """Wake every waiter; later ``put`` calls raise. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
