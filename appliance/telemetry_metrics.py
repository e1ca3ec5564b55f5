"""Pipeline metrics through the OpenTelemetry metrics API.

Model calls and retries are recorded when they happen: the GenAI semantic
conventions' ``gen_ai.client.operation.duration`` and
``gen_ai.client.token.usage`` histograms, and ``field_relay.workflow.retries``.
Everything else is observed at each collection from the same numbers that
``appliance status`` prints (``collect_status``), read once per collection,
plus the ring-buffer fill of the running links, which only the daemon has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

SNAPSHOT_SECONDS = 1.0
"""Seconds one status snapshot serves the callbacks of a collection."""

LinkFill = Callable[[], dict[str, float]]
"""Returns each running link's ring-buffer fill, from 0 to 1."""


class PipelineMetrics:
    """The appliance's instruments on one meter.

    Args:
        meter: the meter to create instruments on.
        data_dir: the data directory whose status the observed instruments read.
        link_fill: the running links' ring-buffer fill; None outside the daemon.
    """

    def __init__(
        self, meter: Meter, data_dir: Path, link_fill: LinkFill | None = None
    ) -> None:
        self.data_dir = data_dir
        self.link_fill = link_fill
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = 0.0

        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of a model call, cache hits included.",
        )
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per model call.",
        )
        self.retries = meter.create_counter(
            "field_relay.workflow.retries",
            unit="{attempt}",
            description="Failed step attempts that sent a record back for another.",
        )
        self._observe(meter)

    def record_model_call(
        self,
        attributes: dict[str, Any],
        seconds: float,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """Record one model call's duration and token usage."""
        self.operation_duration.record(seconds, attributes)
        self.token_usage.record(
            input_tokens, {**attributes, "gen_ai.token.type": "input"}
        )
        self.token_usage.record(
            output_tokens, {**attributes, "gen_ai.token.type": "output"}
        )

    # Observed instruments ---------------------------------------------------

    def _observe(self, meter: Meter) -> None:
        gauges: list[
            tuple[str, str, str, Callable[[dict[str, Any]], Iterable[Observation]]]
        ] = [
            (
                "field_relay.records",
                "{record}",
                "Records per workflow state.",
                _records,
            ),
            (
                "field_relay.workflow.dead_letters",
                "{record}",
                "Records in the dead state.",
                _dead,
            ),
            (
                "field_relay.outbox.depth",
                "{record}",
                "Records queued for upload.",
                _outbox_depth,
            ),
            (
                "field_relay.outbox.oldest_age",
                "s",
                "Age of the oldest record not yet uploaded.",
                _oldest_age,
            ),
            (
                "field_relay.sync.throughput",
                "{record}/s",
                "Records uploaded per second over the last 5 minutes.",
                _sync_rate,
            ),
            (
                "field_relay.model.tokens_per_second",
                "{token}/s",
                "Output tokens per second of the newest model calls.",
                _tokens_per_s,
            ),
            (
                "field_relay.model.latency",
                "s",
                "Mean seconds per call of the newest model calls.",
                _latency,
            ),
            (
                "field_relay.telemetry.spooled",
                "{span}",
                "Spans waiting in the telemetry spool.",
                _spooled,
            ),
        ]
        for name, unit, description, read in gauges:
            meter.create_observable_gauge(
                name, [self._callback(read)], unit=unit, description=description
            )
        counters: list[
            tuple[str, str, str, Callable[[dict[str, Any]], Iterable[Observation]]]
        ] = [
            (
                "field_relay.link.bytes",
                "By",
                "Bytes read from each link.",
                _link("bytes"),
            ),
            (
                "field_relay.link.frames",
                "{frame}",
                "Valid frames per link.",
                _link("frames"),
            ),
            (
                "field_relay.link.crc_errors",
                "{frame}",
                "Frames with a CRC error per link.",
                _link("crc_errors"),
            ),
            (
                "field_relay.link.auth_errors",
                "{frame}",
                "Frames that failed authentication per link.",
                _link("auth_failures"),
            ),
            (
                "field_relay.answer_cache.hits",
                "{call}",
                "Model calls answered from the cache.",
                _cache("hits"),
            ),
            (
                "field_relay.answer_cache.misses",
                "{call}",
                "Model calls the cache could not answer.",
                _cache("misses"),
            ),
            (
                "field_relay.telemetry.dropped",
                "{span}",
                "Spans dropped because the spool was full.",
                _dropped,
            ),
        ]
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                name, [self._callback(read)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "field_relay.link.ring_fill",
            [self._ring_fill],
            unit="1",
            description="Share of each link's ring buffer in use.",
        )

    def _callback(
        self, read: Callable[[dict[str, Any]], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return list(read(self.snapshot()))

        return callback

    def snapshot(self) -> dict[str, Any]:
        """Return ``collect_status`` output, read at most once per collection."""
        from appliance.status import collect_status

        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._snapshot_at > SNAPSHOT_SECONDS:
                self._snapshot = collect_status(self.data_dir)
                self._snapshot_at = now
            return self._snapshot

    def _ring_fill(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.link_fill is None:
            return []
        return [
            Observation(fill, {"field_relay.link": name})
            for name, fill in self.link_fill().items()
        ]


def _records(status: dict[str, Any]) -> Iterable[Observation]:
    for state, count in status["records"].items():
        yield Observation(count, {"field_relay.record.state": state})


def _dead(status: dict[str, Any]) -> Iterable[Observation]:
    yield Observation(status["records"].get("dead", 0))


def _outbox_depth(status: dict[str, Any]) -> Iterable[Observation]:
    yield Observation(status["outbox"]["queued"])


def _oldest_age(status: dict[str, Any]) -> Iterable[Observation]:
    age = status["outbox"].get("oldest_queued_age_s")
    if age is not None:
        yield Observation(age)


def _sync_rate(status: dict[str, Any]) -> Iterable[Observation]:
    rate = (status.get("sync") or {}).get("throughput_records_per_s")
    if rate is not None:
        yield Observation(rate)


def _tokens_per_s(status: dict[str, Any]) -> Iterable[Observation]:
    value = (status.get("model") or {}).get("tokens_per_s")
    if value is not None:
        yield Observation(value)


def _latency(status: dict[str, Any]) -> Iterable[Observation]:
    value = (status.get("model") or {}).get("latency_s")
    if value is not None:
        yield Observation(value)


def _spooled(status: dict[str, Any]) -> Iterable[Observation]:
    yield Observation(status["telemetry"]["spooled"])


def _dropped(status: dict[str, Any]) -> Iterable[Observation]:
    yield Observation(status["telemetry"]["dropped"])


def _link(counter: str) -> Callable[[dict[str, Any]], Iterable[Observation]]:
    def read(status: dict[str, Any]) -> Iterable[Observation]:
        for name, counters in status["links"].items():
            if counter in counters:
                yield Observation(counters[counter], {"field_relay.link": name})

    return read


def _cache(counter: str) -> Callable[[dict[str, Any]], Iterable[Observation]]:
    def read(status: dict[str, Any]) -> Iterable[Observation]:
        cache = status.get("answer_cache")
        if cache:
            yield Observation(cache[counter])

    return read
