"""Benchmark the local pipeline with review off and with a stalled reviewer.

Each run inserts the same records into a fresh data directory and times them
from the insert (state ``received``) until every one is ``queued``. The
daemon's two workflow threads do the work with a fake model that returns a
valid record at once, so the figure is the pipeline's own cost without
inference. With review
on, a ``ReviewWorker`` with ``sample_fraction = 1.0`` runs beside them against
``tests/openai_stub.py`` on 127.0.0.1, which holds every request open. The
reviewer is already waiting inside its first request when the timing starts,
so every timed record joins a review backlog that never drains.

Runs alternate between the two arms and the median counts. Run it with
``make bench``; ``--output`` appends the results to a Markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from machine import command_line, machine_description

# The fake model and the reviewer stub live with the tests, which are not an
# installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.config import ReviewConfig  # noqa: E402
from appliance.inference import SamplingParams  # noqa: E402
from appliance.review import ReviewState, request_review, select_new  # noqa: E402
from appliance.review_worker import ReviewWorker, make_activity  # noqa: E402
from appliance.states import RecordKind, RecordState  # noqa: E402
from appliance.store import DB_NAME, Store  # noqa: E402
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs  # noqa: E402
from tests.conftest import FakeEngine  # noqa: E402
from tests.openai_stub import DEFAULT_RECORD, OpenAIStub  # noqa: E402

LINE = (
    "1118536327 2005.06.11 R30-M0-N9-C:J16-U01 2005-06-11-17.18.47.314932 "
    "R30-M0-N9-C:J16-U01 RAS KERNEL FATAL data TLB error interrupt"
)
"""A BGL log line; each record appends its sequence number to it."""
RUN_DEADLINE_S = 300.0
"""Seconds one arm's wait for its records may take before the run fails."""
REVIEW_TIMEOUT_S = 600.0
"""The reviewer's HTTP timeout, the maximum [review] timeout allows, so the
held request outlasts a default run and never ends while the timing runs."""


class _Arm:
    """One data directory with workflow threads and, when review is on, a
    reviewer stalled on the stub."""

    def __init__(self, data_dir: Path, records: int, review: bool) -> None:
        data_dir.mkdir()
        self.db_path = data_dir / DB_NAME
        answers: list[str | Exception] = [json.dumps(DEFAULT_RECORD)] * (records + 1)
        self.workflow = Workflow(
            self.db_path, FakeEngine(answers), "", SamplingParams()
        )
        self.store = Store(self.db_path)
        self.workers = [
            Worker("inference", self.workflow, inference_jobs(self.workflow)),
            Worker("steps", self.workflow, step_jobs(self.workflow)),
        ]
        self.stub: OpenAIStub | None = None
        self.reviewer: ReviewWorker | None = None
        self.config: ReviewConfig | None = None
        if review:
            self.stub = OpenAIStub().start()
            self.stub.hold()
            self.config = ReviewConfig(
                enabled=True,
                base_url=self.stub.url,
                model="reviewer-large",
                sample_fraction=1.0,
                timeout=REVIEW_TIMEOUT_S,
            )
            activity = make_activity(self.config, stop=threading.Event())
            self.reviewer = ReviewWorker(self.db_path, activity, self.config)
        self.next_seq = 1

    def start(self) -> None:
        """Start the threads, pass one warm-up record and, with review on, wait
        until the reviewer's request for it is held by the stub."""
        for worker in self.workers:
            worker.start()
        (warm_up,) = self.insert(1)
        self.wait_queued(1)
        if self.reviewer is None or self.stub is None:
            return
        self.reviewer.start()
        _wait_for(lambda: self._has_schema(), "the review tables")
        request_review(self.store, warm_up)
        _wait_for(lambda: self.stub is not None and self.stub.waiting == 1,
                  "the reviewer's first request")  # fmt: skip

    def _has_schema(self) -> bool:
        rows = self.store.query(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reviews'"
        )
        return bool(rows)

    def insert(self, count: int) -> list[str]:
        ids = []
        with self.store.transaction() as conn:
            for _ in range(count):
                line = f"{LINE} {self.next_seq}"
                record_id = self.store.insert_record(
                    conn, "bench", self.next_seq, line, line.encode(),
                    RecordKind.LOG_EVENT,
                )  # fmt: skip
                assert record_id is not None
                ids.append(record_id)
                self.next_seq += 1
        self.workflow.work_ready.set()
        return ids

    def wait_queued(self, total: int) -> None:
        def all_queued() -> bool:
            counts = self.store.state_counts()
            if counts[RecordState.DEAD]:
                raise RuntimeError(
                    f"{counts[RecordState.DEAD]} records went dead; the fake "
                    "model's answer no longer validates"
                )
            return counts[RecordState.QUEUED] >= total

        _wait_for(all_queued, f"{total} queued records", poll=0.005)

    def review_backlog(self) -> int | None:
        """Return the reviews waiting once selection has seen every record."""
        if self.config is None:
            return None
        select_new(self.store, self.config)
        rows = self.store.query(
            "SELECT COUNT(*) AS n FROM reviews WHERE state = ?",
            (str(ReviewState.PENDING),),
        )
        return int(rows[0]["n"])

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.reviewer is not None:
            self.reviewer.stop_event.set()
        if self.stub is not None:
            self.stub.release()
        threads: list[threading.Thread] = [*self.workers]
        if self.reviewer is not None:
            threads.append(self.reviewer)
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=30)
        if self.stub is not None:
            self.stub.close()
        self.store.close()


def _wait_for(
    condition: Callable[[], bool], description: str, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + RUN_DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {RUN_DEADLINE_S:g} s waiting for {description}"
            )
        time.sleep(poll)


def measure(workdir: Path, records: int, review: bool) -> tuple[float, int | None]:
    """Return one arm's records/s from insert to queued, and its review backlog."""
    arm = _Arm(workdir / f"{'on' if review else 'off'}-{time.monotonic_ns()}",
               records, review)  # fmt: skip
    try:
        arm.start()
        started = time.perf_counter()
        arm.insert(records)
        arm.wait_queued(records + 1)
        elapsed = time.perf_counter() - started
        backlog = arm.review_backlog()
    finally:
        arm.stop()
    return records / elapsed, backlog


def report(
    records: int, repeats: int, off: list[float], on: list[float], backlog: int | None
) -> str:
    off_median = statistics.median(off)
    on_median = statistics.median(on)
    change = (on_median / off_median - 1) * 100
    lines = [
        f"## {datetime.date.today().isoformat()}: local pipeline with a stalled reviewer",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {machine_description()}",
        f"- Software: Python {sys.version.split()[0]}",
        f"- Method: {records:,} `log_event` records per run, inserted in one "
        "transaction and timed until all are `queued`, with the daemon's "
        "inference and steps threads and a fake model that answers at once. "
        "Review on adds a reviewer thread with `sample_fraction = 1.0` whose "
        "requests `tests/openai_stub.py` on 127.0.0.1 holds open. "
        f"{repeats} runs per arm, alternating, median counts.",
        "",
        "| review | records/s, median | runs, records/s | reviews pending at end |",
        "| --- | --- | --- | --- |",
        f"| off | {off_median:,.1f} | {', '.join(f'{r:,.1f}' for r in off)} | - |",
        f"| on, reviewer stalled | {on_median:,.1f} | "
        f"{', '.join(f'{r:,.1f}' for r in on)} | {backlog if backlog is not None else '-'} |",
        "",
        f"Change with review on: {change:+.1f} %.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records",
        type=int,
        default=1000,
        help="records timed per run [default: %(default)s]",
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
    if args.records < 1 or args.repeats < 1:
        parser.error("--records and --repeats must be at least 1")
    logging.basicConfig(level=logging.WARNING)

    off: list[float] = []
    on: list[float] = []
    backlog: int | None = None
    with tempfile.TemporaryDirectory(prefix="bench-review-") as name:
        workdir = Path(name)
        for _ in range(args.repeats):
            rate, _ = measure(workdir, args.records, review=False)
            off.append(rate)
            rate, backlog = measure(workdir, args.records, review=True)
            on.append(rate)
    text = report(args.records, args.repeats, off, on, backlog)
    print(text)
    if args.output is not None:
        with args.output.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
