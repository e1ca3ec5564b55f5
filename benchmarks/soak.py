"""Soak the engine with distinct real log lines and print RSS and latency per window.

Lines come from the loghub BGL and HPC copies in tests/data/loghub, made
distinct by ``appliance.soak.soak_lines``. Each line goes through the real
engine and the schema decoder with no answer cache. The record count is
--records, else $FIELD_RELAY_SOAK_RECORDS, else 10,000; at the roughly 0.7
records/s measured on a 2-core machine with 1 thread, 10,000 records take about
4 hours. Run with `make soak`; results are appended to --output with the
command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

from machine import command_line, machine_description

from appliance.decoding import plan_from_schema
from appliance.grammar import schema_to_gbnf
from appliance.inference import OutputSpec, load_engine
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import DEFAULT_MODEL, select_model
from appliance.soak import (
    SoakWindow,
    format_windows,
    latency_drift,
    load_base_lines,
    read_rss_bytes,
    rss_growth_mib,
    run_soak,
    soak_lines,
    soak_record_count,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "loghub"
DATASETS = (
    DATA_DIR / "BGL_2k.log_structured.csv",
    DATA_DIR / "HPC_2k.log_structured.csv",
)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records",
        type=int,
        help="records to run [default: $FIELD_RELAY_SOAK_RECORDS, else 10000]",
    )
    parser.add_argument(
        "--windows", type=int, default=10, help="windows in the table [default: 10]"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model manifest name [default: %(default)s]",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="llama.cpp threads [default: the manifest's n_threads]",
    )
    parser.add_argument(
        "--output", type=Path, help="markdown file to append results to"
    )
    args = parser.parse_args()
    if args.records is None:
        try:
            args.records = soak_record_count()
        except ValueError as exc:
            parser.error(str(exc))
    if args.records < 1 or args.windows < 1:
        parser.error("--records and --windows must be at least 1")
    return args


def _print_window(started: float, window: SoakWindow) -> None:
    print(
        f"{window.records:>7,} records  RSS {window.rss_mib:7.1f} MiB  "
        f"median {1000 * window.median_seconds:6.0f} ms  "
        f"p95 {1000 * window.p95_seconds:6.0f} ms  "
        f"invalid {window.invalid}  elapsed {time.perf_counter() - started:7.0f} s",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    args = _parse_args()
    lines = soak_lines(load_base_lines(DATASETS), args.records)
    selection = select_model(args.model)
    schema = log_event_schema()
    output = OutputSpec(SCHEMA_ID, schema_to_gbnf(schema), plan_from_schema(schema))
    machine = machine_description()
    rss_before_load = read_rss_bytes()
    engine = load_engine(selection, args.threads)
    started = time.perf_counter()
    try:
        windows = run_soak(
            engine,
            output,
            lines,
            window_size=math.ceil(args.records / args.windows),
            on_window=lambda window: _print_window(started, window),
        )
    finally:
        engine.close()
    wall = time.perf_counter() - started

    report = [
        f"## {datetime.date.today().isoformat()}: soak, {args.records:,} records",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine}",
        f"- Model: {selection.manifest.name} ({selection.path.name}), "
        f"{engine.n_threads} thread{'s' if engine.n_threads != 1 else ''}, "
        "schema decoder, temperature 0, no answer cache",
        f"- Input: {args.records:,} distinct lines cycling through the "
        "BGL and HPC 2k samples, BGL and HPC lines alternating",
        f"- Wall time {wall:.0f} s ({args.records / wall:.2f} records/s); RSS "
        f"{rss_before_load / 2**20:.0f} MiB before the model loaded",
        "",
        format_windows(windows),
        "",
        f"RSS growth from the first window to the last: "
        f"{rss_growth_mib(windows):+.1f} MiB. Median latency of the last window "
        f"over the first: {latency_drift(windows):.2f}.",
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.output:
        with args.output.open("a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
