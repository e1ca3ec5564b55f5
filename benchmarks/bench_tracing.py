"""Benchmark the pipeline's throughput with tracing off and on.

Two workloads run through the real workflow workers and SQLite database:

- fake model: ``log_event`` records completed at once by a model stand-in, so
  only the durable commits remain. This is the worst case for tracing, whose
  cost is otherwise hidden behind the model.
- real model: the default model through the schema decoder, as the daemon
  runs it, on distinct lines of the BGL sample. The model is loaded once and
  every run gets a fresh data directory, so the answer cache never hits.

Each run commits its records, starts the workers and measures the wall time
until every record is final. Runs alternate between tracing off (no telemetry
object) and on (the SDK, the spool and the OTLP/HTTP exporter sending to a
loopback receiver in its own process, capture ``redacted``), and the median
of the repeats counts.
The final telemetry flush at shutdown is not timed, because it runs after the
pipeline has finished. Run it with ``make bench``; ``--output`` appends the
results to a Markdown file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from machine import command_line, machine_description

REPO_ROOT = Path(__file__).resolve().parent.parent
# The OTLP receiver and the fake model live with the tests, which are not an
# installed package.
sys.path.insert(0, str(REPO_ROOT))

from appliance.config import TelemetryConfig  # noqa: E402
from appliance.decoding import plan_from_schema  # noqa: E402
from appliance.grammar import schema_to_gbnf  # noqa: E402
from appliance.inference import (  # noqa: E402
    CachedEngine,
    OutputSpec,
    SamplingParams,
    load_engine,
)
from appliance.log_event import SCHEMA_ID, log_event_schema  # noqa: E402
from appliance.models import select_model  # noqa: E402
from appliance.retry import RetryPolicy  # noqa: E402
from appliance.states import RecordKind  # noqa: E402
from appliance.store import DB_NAME, Store  # noqa: E402
from appliance.telemetry import Telemetry  # noqa: E402
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs  # noqa: E402
from firmware_bridge.simulator import load_sample_lines  # noqa: E402
from tests.conftest import FakeEngine  # noqa: E402

TARGET_CHANGE = 0.05
"""Largest allowed drop in records/s with tracing on."""
VALID = (
    '{"severity":"error","component":"KERNEL","event_type":"hardware",'
    '"summary":"Data TLB error.","action_required":true,'
    '"suggested_action":"Replace the node card."}'
)
NO_WAIT = RetryPolicy(initial_interval=0.0, maximum_interval=0.0, maximum_attempts=3)

EngineFactory = Callable[[Path], Any]
"""Returns the engine of one run, given its data directory."""


def run_once(
    engine_for: EngineFactory,
    output: OutputSpec | str,
    sampling: SamplingParams,
    lines: list[str],
    receiver: str | None,
) -> float:
    """Push ``lines`` through a fresh data directory; return records per second."""
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        data_dir = Path(tmp)
        store = Store(data_dir / DB_NAME)
        with store.transaction() as conn:
            for seq, line in enumerate(lines, start=1):
                store.insert_record(
                    conn, "bench", seq, line, line.encode(), RecordKind.LOG_EVENT
                )
        engine = engine_for(data_dir)
        workflow = Workflow(
            store.path,
            engine,
            output,
            sampling,
            policies={"infer": NO_WAIT, "validate": NO_WAIT},
        )
        telemetry = None
        if receiver is not None:
            config = TelemetryConfig.model_validate({"otlp_endpoint": receiver})
            telemetry = Telemetry(data_dir, config, environ={})
            telemetry.start()
            workflow.telemetry = telemetry
        workers = [
            Worker("inference", workflow, inference_jobs(workflow)),
            Worker("steps", workflow, step_jobs(workflow)),
        ]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        while store.unfinished_count() > 0:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=60)
        if telemetry is not None:
            telemetry.close()
        if isinstance(engine, CachedEngine):
            engine.cache.close()
        store.close()
    return len(lines) / elapsed


def compare(
    name: str,
    engine_for: EngineFactory,
    output: OutputSpec | str,
    sampling: SamplingParams,
    lines: list[str],
    repeats: int,
    receiver: str,
) -> tuple[str, int, float, float]:
    """Alternate runs with tracing off and on; return the medians."""
    off: list[float] = []
    on: list[float] = []
    for repeat in range(repeats):
        off.append(run_once(engine_for, output, sampling, lines, None))
        on.append(run_once(engine_for, output, sampling, lines, receiver))
        print(
            f"{name} run {repeat + 1}: off {off[-1]:.2f}, on {on[-1]:.2f} records/s",
            file=sys.stderr,
        )
    return name, len(lines), statistics.median(off), statistics.median(on)


def run(
    records: int, model_records: int, repeats: int
) -> list[tuple[str, int, float, float]]:
    sample = load_sample_lines()
    schema = log_event_schema()
    gbnf = schema_to_gbnf(schema)
    rows = []
    with collector() as receiver:
        rows.append(
            compare(
                "fake model",
                lambda data_dir: FakeEngine([VALID] * records),
                OutputSpec(SCHEMA_ID, gbnf),
                SamplingParams(),
                [f"{sample[i % len(sample)]} #{i}" for i in range(records)],
                repeats,
                receiver,
            )
        )
        if model_records:
            selection = select_model(None)
            engine = load_engine(selection, threads=1)
            sampling = SamplingParams(
                temperature=float(selection.manifest.sampling.get("temperature", 0.0)),
                top_p=float(selection.manifest.sampling.get("top_p", 1.0)),
                max_tokens=int(selection.manifest.sampling.get("max_tokens", 320)),
            )
            output = OutputSpec(SCHEMA_ID, gbnf, plan_from_schema(schema))
            # One unmeasured record evaluates the shared prompt prefix.
            run_once(
                lambda data_dir: CachedEngine(engine, data_dir / "answer-cache"),
                output,
                sampling,
                sample[-1:],
                None,
            )
            rows.append(
                compare(
                    f"{selection.manifest.name}, 1 thread",
                    lambda data_dir: CachedEngine(engine, data_dir / "answer-cache"),
                    output,
                    sampling,
                    sample[:model_records],
                    repeats,
                    receiver,
                )
            )
            engine.close()
    return rows


@contextlib.contextmanager
def collector() -> Iterator[str]:
    """Run the loopback OTLP receiver in a child process; yield its URL."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.otlp_receiver"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        child.wait(timeout=10)


def report(rows: list[tuple[str, int, float, float]], repeats: int) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"## {today}: tracing overhead",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_description()}",
        f"- Method: {repeats} runs per arm, tracing off and on alternating, median "
        "records/s from the first step to the last final record; tracing on sends "
        "every span through the spool and the OTLP/HTTP exporter to a loopback "
        "receiver in another process, with capture `redacted`.",
        "",
        "| workload | records per run | tracing off, records/s | tracing on, records/s | change |",
        "| --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for name, count, off, on in rows:
        change = on / off - 1
        lines.append(
            f"| {name} | {count} | {off:.2f} | {on:.2f} | {change * 100:+.1f} % |"
        )
        met = "met" if change >= -TARGET_CHANGE else "not met"
        verdicts.append(f"{name}: {met}")
    lines += [
        "",
        f"Target of at most {TARGET_CHANGE * 100:.0f} % lower throughput with "
        f"tracing on: {'; '.join(verdicts)}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records",
        type=int,
        default=300,
        help="records per fake-model run [default: %(default)s]",
    )
    parser.add_argument(
        "--model-records",
        type=int,
        default=10,
        help="records per real-model run; 0 skips the model [default: %(default)s]",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per arm, of which the median counts [default: %(default)s]",
    )
    parser.add_argument(
        "--output", type=Path, help="Markdown file to append the results to"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    text = report(run(args.records, args.model_records, args.repeats), args.repeats)
    print(text)
    if args.output is not None:
        with args.output.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
