"""The appliance daemon: links, intake, workflow workers and background upload.

Threads, not asyncio: pyserial and llama.cpp are blocking APIs, and each part
gets its own thread (link reader, intake, inference worker, step worker,
uploader). llama.cpp is only ever called from the inference worker. Threads
share nothing but the SQLite database (one connection each) and wake-up events.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from appliance.decoding import plan_from_schema
from appliance.errors import ApplianceError
from appliance.grammar import schema_to_gbnf
from appliance.grammar_check import check_grammar
from appliance.inference import CachedEngine, LlamaEngine, OutputSpec, SamplingParams
from appliance.intake import LineIntake
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import load_manifest, resolve_model_path
from appliance.states import RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import LineEnding, LineSplitter
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.simulator import LineDeviceSimulator, PtyPair, load_sample_lines

logger = logging.getLogger(__name__)

DEMO_LINK = "demo"


@dataclasses.dataclass
class RunOptions:
    """Settings of one ``appliance run``; the CLI fills them from its options."""

    port: str | None = None
    """Serial port path or pyserial URL; None with ``demo``."""
    demo: bool = False
    """Read from the bundled device simulator over a pty."""
    demo_rate: float = 5.0
    """Lines per second the simulator sends."""
    baud: int = 115200
    """Line speed in bit/s."""
    line_ending: LineEnding = LineEnding.AUTO
    max_line_bytes: int = 4096
    """Bytes kept per line; the rest of a longer line is dropped and counted."""
    line_timeout: float = 10.0
    """Seconds a partial line waits for its line ending before it is delivered."""
    ring_capacity: int = 65536
    """Ring buffer size per link, in bytes."""
    overflow: OverflowPolicy = OverflowPolicy.BLOCK
    max_records: int | None = None
    """Stop reading after this many new records, then exit once all are final."""
    max_pending: int = 10_000
    """Unfinished records above which intake stops reading."""
    upload_url: str | None = None
    """Upload queued records here in the background."""
    model: str | None = None
    """GGUF file; None uses the default model's manifest."""
    threads: int | None = None
    """llama.cpp threads; None takes the model manifest's ``n_threads``."""
    link_name: str | None = None
    """Name stored on records; defaults to ``demo`` or the port's file name."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def build_workflow(data_dir: Path, model: str | None, threads: int | None) -> Workflow:
    """Load the model and grammar and return a workflow over ``data_dir``.

    Raises:
        ModelNotFoundError, ModelLoadError: the model cannot be used.
        GrammarError: llama.cpp rejects the generated grammar.
    """
    manifest = load_manifest()
    model_path = resolve_model_path(model, manifest)
    engine = LlamaEngine(
        model_path,
        n_ctx=manifest.context_size,
        n_threads=threads or manifest.n_threads,
        n_batch=manifest.n_batch,
        sha256=manifest.sha256 if model is None else None,
    )
    schema = log_event_schema()
    grammar = schema_to_gbnf(schema)
    check_grammar(grammar, model_path, data_dir / "grammar-checks")
    output = OutputSpec(SCHEMA_ID, grammar, plan_from_schema(schema))
    cached = CachedEngine(engine, data_dir / "answer-cache")
    sampling = SamplingParams(
        temperature=float(manifest.sampling.get("temperature", 0.0)),
        top_p=float(manifest.sampling.get("top_p", 1.0)),
        max_tokens=int(manifest.sampling.get("max_tokens", 320)),
    )
    return Workflow(db_path(data_dir), cached, output, sampling)


class Daemon:
    """Runs the pipeline until stopped or, with ``max_records``, until done."""

    def __init__(self, data_dir: Path, options: RunOptions) -> None:
        self.data_dir = data_dir
        self.options = options
        self.stop_event = threading.Event()
        self._cleanups: list[tuple[str, object]] = []

    def request_stop(
        self, signum: int | None = None, _frame: FrameType | None = None
    ) -> None:
        if signum is not None:
            logger.info("received signal %d, stopping", signum)
        self.stop_event.set()

    def run(self) -> int:
        """Run the pipeline; returns the process exit code.

        Raises:
            ApplianceError, BridgeError: setup failed (port, model, data directory).
        """
        opts = self.options
        Store(db_path(self.data_dir)).close()
        workflow = build_workflow(self.data_dir, opts.model, opts.threads)
        workflow.on_final = self._log_final
        workers = [
            Worker("inference", workflow, inference_jobs(workflow)),
            Worker("steps", workflow, step_jobs(workflow)),
        ]
        link_name = opts.link_name or (
            DEMO_LINK if opts.demo else Path(opts.port or "port").name
        )
        counters = LinkCounters()
        store = Store(db_path(self.data_dir))
        counters.add(store.load_link_counters(link_name))
        resumed = store.unfinished_count()
        start_line = store.count_link_records(link_name)
        store.close()
        if resumed:
            logger.info("resuming %d unfinished records from an earlier run", resumed)

        pty = simulator = None
        port = opts.port
        if opts.demo:
            pty = PtyPair()
            simulator = LineDeviceSimulator(
                pty.master_fd,
                load_sample_lines(),
                rate=opts.demo_rate,
                start=start_line,
            )
            port = pty.slave_path
            logger.info(
                "demo: device simulator replays the BGL sample from line %d at %.1f lines/s on %s",
                start_line + 1,
                opts.demo_rate,
                port,
            )
        assert port is not None
        ring = RingBuffer(opts.ring_capacity, opts.overflow)
        link = SerialLink(link_name, port, ring, counters, baudrate=opts.baud)
        try:
            link.open()
        except BaseException:
            if pty is not None:
                pty.close()
            raise
        splitter = LineSplitter(
            counters, opts.line_ending, opts.max_line_bytes, opts.line_timeout
        )
        intake = LineIntake(
            link_name,
            ring,
            splitter,
            db_path(self.data_dir),
            workflow.work_ready,
            max_records=opts.max_records,
            max_pending=opts.max_pending,
        )
        uploader_thread = None
        if opts.upload_url:
            uploader_thread = threading.Thread(
                target=self._upload_loop,
                args=(opts.upload_url,),
                name="uploader",
                daemon=True,
            )

        for worker in workers:
            worker.start()
        link.start()
        intake.start()
        if simulator is not None:
            simulator.start()
        if uploader_thread is not None:
            uploader_thread.start()

        try:
            code = self._supervise(intake, workers, link)
        finally:
            # Stop the sources first so intake can commit what is buffered.
            if simulator is not None:
                simulator.stop()
            link.close()
            intake.stop()
            intake.join(timeout=5)
            ring.close()
            for worker in workers:
                worker.stop()
            for worker in workers:
                worker.join(timeout=30)
            self.stop_event.set()
            if uploader_thread is not None:
                uploader_thread.join(timeout=10)
            if pty is not None:
                pty.close()
            close_engine(workflow, workers)
        return code

    def _supervise(
        self, intake: LineIntake, workers: list[Worker], link: SerialLink
    ) -> int:
        store = Store(db_path(self.data_dir), readonly=True)
        try:
            while not self.stop_event.wait(0.25):
                failed = [t for t in (intake, *workers) if getattr(t, "error", None)]
                if failed:
                    logger.error(
                        "stopping: thread %s failed: %s",
                        failed[0].name,
                        failed[0].error,
                    )
                    return 1
                if intake.done.is_set() and store.unfinished_count() == 0:
                    counts = store.state_counts()
                    logger.info(
                        "all records final: %d queued, %d uploaded, %d dead",
                        counts[RecordState.QUEUED],
                        counts[RecordState.UPLOADED],
                        counts[RecordState.DEAD],
                    )
                    return 0
            return 0
        finally:
            store.close()

    def _upload_loop(self, url: str) -> None:
        uploader = Uploader(db_path(self.data_dir), url)
        try:
            while not self.stop_event.is_set():
                result = uploader.sync(deadline=None, stop=self.stop_event)
                if result.last_error and result.batches == 0:
                    self.stop_event.wait(5.0)
                else:
                    self.stop_event.wait(1.0)
        except ApplianceError:
            logger.exception("background upload stopped")
        finally:
            uploader.close()

    def _log_final(self, record_id: str) -> None:
        store = Store(db_path(self.data_dir), readonly=True)
        try:
            row = store.get_record(record_id)
        finally:
            store.close()
        if row is None:
            return
        logger.info("%s", describe_record(row))


def describe_record(row) -> str:  # type: ignore[no-untyped-def]
    """Return one log line summarising a record that reached a final state."""
    import json

    head = f"record {row['id'][:8]} {row['link']}#{row['seq']} {row['state']}"
    if row["state"] == RecordState.DEAD:
        return f"{head}: {row['error']}"
    data = json.loads(row["data"]) if row["data"] else {}
    if "severity" in data:
        return (
            f"{head}: {data['severity']} {data['component']} {data['event_type']}: "
            f"{data['summary']}"
        )
    return head


def close_engine(workflow: Workflow, workers: list[Worker]) -> None:
    """Free the model unless a worker is still inside a llama.cpp call.

    Freeing the context under a running decode segfaults the process, so a
    worker that did not stop in time keeps the model until the process exits.
    """
    busy = [worker.name for worker in workers if worker.is_alive()]
    if busy:
        logger.warning("worker %s still running at exit; model left loaded", busy[0])
        return
    if isinstance(workflow.engine, CachedEngine):
        workflow.engine.close()


def install_signal_handlers(daemon: Daemon) -> None:
    """Stop the daemon cleanly on SIGINT and SIGTERM."""
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGTERM, daemon.request_stop)


def wait_until_final(data_dir: Path, stop: threading.Event, poll: float = 0.25) -> None:
    """Block until no record in ``data_dir`` is unfinished or ``stop`` is set."""
    store = Store(db_path(data_dir), readonly=True)
    try:
        while not stop.is_set() and store.unfinished_count() > 0:
            time.sleep(poll)
    finally:
        store.close()
