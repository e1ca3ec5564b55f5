"""Soak run: many distinct log lines through one engine, with RSS and latency.

The slow soak test and ``benchmarks/soak.py`` both use it. Lines go straight to
the engine with the schema decoder, with no answer cache in between, so every
record runs the model and a per-call leak shows as RSS growth. Memory and
latency are summarised per window of consecutive records.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from appliance.errors import InvalidOutputError
from appliance.inference import Completion, OutputSpec, SamplingParams
from appliance.loghub import load_dataset
from appliance.prompts import build_messages
from appliance.workflow import parse_log_event

SOAK_RECORDS_ENV = "FIELD_RELAY_SOAK_RECORDS"
"""Environment variable that sets the number of soak records."""
DEFAULT_SOAK_RECORDS = 10_000

_LEADING_NUMBER = re.compile(r"\d+")


def soak_record_count(default: int = DEFAULT_SOAK_RECORDS) -> int:
    """Return the record count from ``FIELD_RELAY_SOAK_RECORDS``, else ``default``.

    Raises:
        ValueError: the variable is set but is not a positive integer.
    """
    raw = os.environ.get(SOAK_RECORDS_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{SOAK_RECORDS_ENV}={raw!r} is not a positive integer; set it to the "
            "number of soak records, such as 300"
        )
    return int(raw)


def load_base_lines(datasets: Iterable[Path]) -> list[str]:
    """Return the raw lines of loghub structured CSV files, interleaved, no repeats.

    Interleaving mixes the formats, so every window of a soak run contains
    lines of each file. A line that occurs twice is kept once.

    Raises:
        SetupError: a file is not a readable loghub BGL or HPC CSV file.
    """
    per_file = [[line.raw for line in load_dataset(path)[1]] for path in datasets]
    mixed: list[str] = []
    for index in range(max((len(lines) for lines in per_file), default=0)):
        mixed += [lines[index] for lines in per_file if index < len(lines)]
    return list(dict.fromkeys(mixed))


def soak_lines(base: Sequence[str], count: int) -> list[str]:
    """Return ``count`` distinct lines that cycle through ``base``.

    The first pass uses the lines unchanged. Pass ``k`` (from 1) adds
    ``k * 10**9`` to the number a line starts with, a BGL timestamp in seconds
    or an HPC log id. A repeated line therefore differs only where a new event
    would. A line without a leading number gets the prefix ``k``.

    Raises:
        ValueError: ``base`` is empty or holds repeated lines.
    """
    if not base:
        raise ValueError("soak lines need at least one base line")
    if len(set(base)) != len(base):
        raise ValueError("soak base lines must be distinct")
    lines = []
    for index in range(count):
        pass_number, position = divmod(index, len(base))
        lines.append(_shift_line(base[position], pass_number))
    return lines


def _shift_line(line: str, pass_number: int) -> str:
    if pass_number == 0:
        return line
    match = _LEADING_NUMBER.match(line)
    if match is None:
        return f"{pass_number} {line}"
    shifted = int(match.group()) + pass_number * 10**9
    return f"{shifted}{line[match.end() :]}"


def read_rss_bytes() -> int:
    """Return this process's resident set size (``VmRSS`` in /proc/self/status).

    Raises:
        OSError: /proc/self/status is unreadable or has no VmRSS line (not Linux).
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS line in /proc/self/status")


@dataclasses.dataclass(frozen=True)
class SoakWindow:
    """Measurements of one window of consecutive soak records."""

    records: int
    """Records finished when the window closed, counted from the start."""
    rss_bytes: int
    """Resident set size when the window closed."""
    median_seconds: float
    """Median wall time of one record in the window."""
    p95_seconds: float
    """95th percentile of the record wall times in the window."""
    invalid: int
    """Outputs in the window that failed to parse or validate."""

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / 2**20


class Completer(Protocol):
    """The engine interface of a soak run, met by ``LlamaEngine`` and test fakes."""

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> Completion: ...


def run_soak(
    engine: Completer,
    output: OutputSpec | str | None,
    lines: Sequence[str],
    window_size: int,
    on_window: Callable[[SoakWindow], None] | None = None,
) -> list[SoakWindow]:
    """Triage every line with ``engine`` and return one ``SoakWindow`` per window.

    Each record's wall time covers prompt building, the model call and output
    validation. The last window may hold fewer than ``window_size`` records.
    ``on_window`` is called as each window closes, for progress output.
    """
    if window_size < 1:
        raise ValueError(f"window_size must be at least 1, not {window_size}")
    params = SamplingParams()
    windows: list[SoakWindow] = []
    durations: list[float] = []
    invalid = 0
    for index, line in enumerate(lines, start=1):
        started = time.perf_counter()
        completion = engine.complete(build_messages(line), output, params)
        try:
            parse_log_event(completion.text)
        except InvalidOutputError:
            invalid += 1
        durations.append(time.perf_counter() - started)
        if len(durations) == window_size or index == len(lines):
            window = _close_window(index, durations, invalid)
            windows.append(window)
            if on_window is not None:
                on_window(window)
            durations, invalid = [], 0
    return windows


def _close_window(records: int, durations: list[float], invalid: int) -> SoakWindow:
    ordered = sorted(durations)
    # Nearest-rank percentile: the smallest value with 95 % of values at or below.
    rank = max(1, math.ceil(len(ordered) * 95 / 100))
    return SoakWindow(
        records=records,
        rss_bytes=read_rss_bytes(),
        median_seconds=statistics.median(ordered),
        p95_seconds=ordered[rank - 1],
        invalid=invalid,
    )


def format_windows(windows: Sequence[SoakWindow]) -> str:
    """Render windows as a Markdown table."""
    rows = [
        "| records | RSS MiB | median ms per record | p95 ms per record | invalid |",
        "| --- | --- | --- | --- | --- |",
    ]
    for window in windows:
        rows.append(
            f"| {window.records:,} | {window.rss_mib:.1f} | "
            f"{1000 * window.median_seconds:.0f} | {1000 * window.p95_seconds:.0f} | "
            f"{window.invalid} |"
        )
    return "\n".join(rows)


def rss_growth_mib(windows: Sequence[SoakWindow]) -> float:
    """Return the RSS change from the first window to the last, in MiB."""
    return (windows[-1].rss_bytes - windows[0].rss_bytes) / 2**20


def latency_drift(windows: Sequence[SoakWindow]) -> float:
    """Return the last window's median latency over the first window's."""
    return windows[-1].median_seconds / windows[0].median_seconds
