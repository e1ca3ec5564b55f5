"""The interface every transport offers: serial, BLE and loopback links.

A link owns one connection to one device. A background thread (or event loop)
reads bytes into the link's ring buffer; the intake thread consumes the ring
and calls ``write`` for replies. A link reconnects on its own after a failure,
with capped exponential backoff and full jitter, until ``close``.
"""

from __future__ import annotations

import abc
import enum
import random

from firmware_bridge.counters import LinkCounters
from firmware_bridge.ring_buffer import RingBuffer


class LinkState(enum.StrEnum):
    """Where a link is in its connection life cycle."""

    CONNECTING = "connecting"
    """Opening the port or connecting to the device for the first time."""
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    """The connection failed; waiting before the next attempt."""
    CLOSED = "closed"
    """Stopped by ``close``, or never started."""


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Return a reconnect delay: full jitter over a capped exponential.

    Full jitter (a uniform draw between zero and the capped exponential) keeps
    many links that failed together from retrying in step.
    """
    return random.uniform(0, min(cap, base * 2**attempt))


class Link(abc.ABC):
    """One named connection to a device, feeding ``ring``.

    Attributes:
        name: the link name stored on records and shown in status.
        ring: the bounded buffer the reader fills.
        counters: the link's counters, updated in place.
        state: the current ``LinkState``.
        last_error: the last connection or I/O error, for status; None if none.
    """

    name: str
    ring: RingBuffer
    counters: LinkCounters
    state: LinkState
    last_error: str | None

    @abc.abstractmethod
    def open(self) -> None:
        """Connect now so that a configuration error fails at start.

        Raises:
            BridgeError: the port or device cannot be used as configured.
        """

    @abc.abstractmethod
    def start(self) -> None:
        """Start reading in the background; reconnect on failure until closed."""

    @abc.abstractmethod
    def write(self, data: bytes) -> bool:
        """Send ``data`` to the device; return False when the link is down.

        Failed writes are counted, not retried: the protocol above resends.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the reader and release the connection. Safe to call twice."""
