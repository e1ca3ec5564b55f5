"""Replay of a text file through the workflow, as if its lines came over a link.

The link is named ``replay:`` plus the file's absolute path, and each record's
sequence number is its 1-based line number in the file, counting LF, CR and
CRLF endings as ``bytes.splitlines`` does. The line framing rules of
``firmware_bridge.lines`` apply, so empty lines are skipped and leave gaps in
the numbers. Because ``(link, seq)`` is unique, replaying the same file again,
for example after a crash, adds no record twice and resumes the unfinished ones.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from appliance.daemon import build_workflow, close_engine, db_path
from appliance.errors import SetupError
from appliance.grammar import schema_to_gbnf
from appliance.inference import SamplingParams
from appliance.log_event import log_event_schema
from appliance.states import RecordKind, RecordState
from appliance.store import Store
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import Line, LineSplitter

logger = logging.getLogger(__name__)


def replay_file(
    data_dir: Path,
    path: Path,
    kind: RecordKind,
    model: str | None,
    threads: int | None,
    stop: threading.Event,
    max_line_bytes: int = 4096,
) -> dict[str, int]:
    """Commit every line of ``path`` as a record and run the workflow until all are final.

    Returns the state counts of the replayed link's records.

    Raises:
        SetupError: the file cannot be read, or the model cannot be loaded.
    """
    store = Store(db_path(data_dir))
    try:
        link = commit_lines(store, path, kind, max_line_bytes)
        needs_model = store.unfinished_count() > 0 and kind is RecordKind.LOG_EVENT
    finally:
        store.close()

    if needs_model:
        workflow = build_workflow(data_dir, model, threads)
    else:
        workflow = Workflow(
            db_path(data_dir),
            None,
            schema_to_gbnf(log_event_schema()),
            SamplingParams(),
        )
    workers = [Worker("steps", workflow, step_jobs(workflow))]
    if workflow.engine is not None:
        workers.append(Worker("inference", workflow, inference_jobs(workflow)))
    for worker in workers:
        worker.start()
    try:
        _wait_for_link(data_dir, link, workers, stop)
    finally:
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=30)
        close_engine(workflow, workers)
    return _link_counts(data_dir, link)


def commit_lines(
    store: Store, path: Path, kind: RecordKind, max_line_bytes: int = 4096
) -> str:
    """Commit each line of ``path`` not yet stored as a received record.

    All lines go in one transaction with the link's counters. Returns the
    replay link's name.

    Raises:
        SetupError: the file cannot be read.
    """
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise SetupError(
            f"cannot read replay file {str(path)!r}: {exc.strerror}"
        ) from exc
    link = f"replay:{path.resolve()}"
    counters = LinkCounters()
    lines = numbered_lines(content, counters, max_line_bytes)

    with store.transaction() as conn:
        added = 0
        for line_number, line in lines:
            flags = "truncated" if line.truncated else ""
            if store.insert_record(
                conn, link, line_number, line.text, line.data, kind, flags
            ):
                added += 1
        store.save_link_counters(conn, link, counters.as_dict())
    logger.info("replay %s: %d lines, %d new records", path, len(lines), added)
    return link


def numbered_lines(
    content: bytes, counters: LinkCounters, max_line_bytes: int
) -> list[tuple[int, Line]]:
    """Split a file's bytes into delivered lines, each with its 1-based line number.

    The splitter gets one physical line per call, so each call delivers at
    most that one line; the last line may lack its ending.
    """
    splitter = LineSplitter(counters, max_line_bytes=max_line_bytes)
    numbered: list[tuple[int, Line]] = []
    line_number = 0
    for line_number, chunk in enumerate(content.splitlines(keepends=True), start=1):
        numbered += [(line_number, line) for line in splitter.feed(chunk, 0.0)]
    numbered += [(line_number, line) for line in splitter.poll(float("inf"))]
    return numbered


def _wait_for_link(
    data_dir: Path, link: str, workers: list[Worker], stop: threading.Event
) -> None:
    store = Store(db_path(data_dir), readonly=True)
    try:
        while not stop.is_set() and store.unfinished_count([link]) > 0:
            failed = [w for w in workers if w.error is not None]
            if failed:
                raise SetupError(f"worker {failed[0].name} failed: {failed[0].error}")
            stop.wait(0.2)
    finally:
        store.close()


def _link_counts(data_dir: Path, link: str) -> dict[str, int]:
    store = Store(db_path(data_dir), readonly=True)
    try:
        rows = store.query(
            "SELECT state, COUNT(*) AS n FROM records WHERE link = ? GROUP BY state",
            (link,),
        )
    finally:
        store.close()
    counts = {str(s): 0 for s in RecordState}
    counts.update({row["state"]: row["n"] for row in rows})
    return counts
