"""A sliding-window rate limiter on requests and bytes (or tokens) per minute.

Sinks and remote model endpoints publish limits per minute; staying under them
avoids 429 answers instead of reacting to them. The limiter remembers each
request of the last window with its size and, before a new one, waits until
both the request count and the size total of the window would stay within
their limits. Sinks count the size in bytes; the reviewer counts it in tokens.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0


class SlidingWindowLimiter:
    """Limits requests and bytes over any 60-second window.

    Args:
        requests_per_minute: requests allowed per window; 0 for no limit.
        bytes_per_minute: bytes allowed per window; 0 for no limit. A single
            request larger than the limit is let through once the window is
            empty, so it cannot block forever.
        clock: monotonic seconds (tests pass a fake one).
        unit: what a size counts, for log messages: ``byte`` or ``token``.
            A token limiter passes its tokens per minute as ``bytes_per_minute``.

    One limiter may be shared by several threads and sinks.
    """

    def __init__(
        self,
        requests_per_minute: int = 0,
        bytes_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "byte",
    ) -> None:
        if requests_per_minute < 0 or bytes_per_minute < 0:
            raise ValueError(
                f"limits must be >= 0, got {requests_per_minute} requests and "
                f"{bytes_per_minute} {unit}s per minute"
            )
        self.requests_per_minute = requests_per_minute
        self.bytes_per_minute = bytes_per_minute
        self._clock = clock
        self.unit = unit
        self._sent: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.waited = 0.0
        """Seconds spent waiting for the window, in total."""

    def delay(self, size: int) -> float:
        """Return the seconds to wait before a request of ``size`` bytes may go."""
        with self._lock:
            return self._delay_locked(size, self._clock())

    def _delay_locked(self, size: int, now: float) -> float:
        while self._sent and self._sent[0][0] <= now - WINDOW_SECONDS:
            self._bytes -= self._sent.popleft()[1]
        wait = 0.0
        if self.requests_per_minute and len(self._sent) >= self.requests_per_minute:
            index = len(self._sent) - self.requests_per_minute
            wait = max(wait, self._sent[index][0] + WINDOW_SECONDS - now)
        if self.bytes_per_minute and self._sent:
            excess = self._bytes + size - self.bytes_per_minute
            freed = 0
            for at, sent in self._sent:
                if freed >= excess:
                    break
                freed += sent
                wait = max(wait, at + WINDOW_SECONDS - now)
        return max(0.0, wait)

    def record(self, size: int, age: float = 0.0) -> None:
        """Count a request of ``size`` bytes as sent ``age`` seconds ago.

        A positive ``age`` restores requests sent before a restart, so a new
        limiter does not start with an empty window; record them oldest first.
        """
        with self._lock:
            self._sent.append((self._clock() - age, size))
            self._bytes += size

    def acquire(
        self,
        size: int,
        stop: threading.Event | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> float:
        """Wait until a request of ``size`` bytes fits, count it, return seconds waited.

        Returns early (without counting the request) when ``stop`` is set.
        """
        waited = 0.0
        while True:
            with self._lock:
                wait = self._delay_locked(size, self._clock())
                if wait <= 0:
                    self._sent.append((self._clock(), size))
                    self._bytes += size
                    self.waited += waited
                    return waited
            logger.debug(
                "rate limit: waiting %.2f s for a %d-%s request", wait, size, self.unit
            )
            if stop is not None:
                if stop.wait(wait):
                    self.waited += waited
                    return waited
            else:
                sleep(wait)
            waited += wait
