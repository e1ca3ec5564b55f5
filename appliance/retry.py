"""Retry policies for workflow activities and uploads."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed activity is tried again.

    Delays grow as ``initial_interval * backoff_coefficient ** (attempt - 1)``,
    capped at ``maximum_interval``.
    """

    initial_interval: float = 1.0
    """Seconds before the first retry. Default 1."""
    backoff_coefficient: float = 2.0
    """Factor applied to the delay after each failed attempt. Default 2."""
    maximum_interval: float = 60.0
    """Cap on the delay between attempts, in seconds. Default 60."""
    maximum_attempts: int = 3
    """Attempts in total, the first included; 0 means no limit. Default 3."""
    non_retryable_errors: tuple[type[BaseException], ...] = ()
    """Exception types that end the activity at once, without retry."""

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = self.initial_interval * self.backoff_coefficient ** max(attempt - 1, 0)
        return min(self.maximum_interval, raw)

    def jittered_delay(self, attempt: int) -> float:
        """Return a full-jitter delay: uniform between 0 and ``delay(attempt)``."""
        return random.uniform(0, self.delay(attempt))

    def allows_retry(self, attempt: int, error: BaseException) -> bool:
        """Return True when failed attempt ``attempt`` may be followed by another."""
        if isinstance(error, self.non_retryable_errors):
            return False
        return self.maximum_attempts == 0 or attempt < self.maximum_attempts
