"""Retry policy arithmetic."""

from __future__ import annotations

from appliance.errors import InvalidOutputError, ModelLoadError
from appliance.retry import RetryPolicy


def test_delay_grows_by_coefficient() -> None:
    policy = RetryPolicy(
        initial_interval=1.0, backoff_coefficient=3.0, maximum_interval=100.0
    )
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(
        initial_interval=1.0, backoff_coefficient=2.0, maximum_interval=5.0
    )
    assert policy.delay(10) == 5.0


def test_jittered_delay_stays_within_delay() -> None:
    policy = RetryPolicy(initial_interval=2.0)
    assert all(0 <= policy.jittered_delay(3) <= policy.delay(3) for _ in range(200))


def test_attempt_limit_stops_retries() -> None:
    policy = RetryPolicy(maximum_attempts=3)
    error = InvalidOutputError("bad")
    assert [policy.allows_retry(n, error) for n in (1, 2, 3)] == [True, True, False]


def test_non_retryable_error_stops_at_once() -> None:
    policy = RetryPolicy(maximum_attempts=0, non_retryable_errors=(ModelLoadError,))
    assert not policy.allows_retry(1, ModelLoadError("x", path=None))  # type: ignore[arg-type]


def test_zero_attempts_means_unlimited() -> None:
    policy = RetryPolicy(maximum_attempts=0)
    assert policy.allows_retry(1000, InvalidOutputError("bad"))
