"""The appliance daemon: links, intake, workflow workers and background upload.

Threads, not asyncio: pyserial and llama.cpp are blocking APIs, and each part
gets its own thread (a reader and an intake per link, the inference worker,
the step worker, the uploader). llama.cpp is only ever called from the
inference worker. Threads share nothing but the SQLite database (one
connection each) and wake-up events.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.cli_scan import scan_all
from appliance.config import (
    LinkConfig,
    MqttConfig,
    OutboxConfig,
    Protocol,
    ReviewConfig,
    SyncConfig,
    TelemetryConfig,
)
from appliance.control import ControlServer
from appliance.decoding import plan_from_schema
from appliance.errors import ApplianceError
from appliance.grammar import schema_to_gbnf
from appliance.grammar_check import check_grammar
from appliance.inference import CachedEngine, OutputSpec, SamplingParams, load_engine
from appliance.links import RunningLink, open_link, remove_tree
from appliance.log_event import SCHEMA_ID, log_event_schema
from appliance.models import select_model
from appliance.mqtt_sink import make_sink
from appliance.outbox import OutboxPolicy, maintain
from appliance.retry import requeue_all_dead, requeue_dead
from appliance.review_worker import ReviewWorker, make_activity
from appliance.sd_notify import Notifier
from appliance.states import RecordState
from appliance.status import collect_status
from appliance.store import DB_NAME, Store
from appliance.telemetry import NO_TELEMETRY, NoTelemetry, Telemetry
from appliance.workflow import Worker, Workflow, inference_jobs, step_jobs
from firmware_bridge.device_simulator import FramedDeviceSimulator
from firmware_bridge.errors import PairingError
from firmware_bridge.link import backoff_delay
from firmware_bridge.pairing import STORE_DIR_NAME, PairingStore
from firmware_bridge.simulator import LineDeviceSimulator, PtyPair, load_sample_lines

logger = logging.getLogger(__name__)

DEMO_LINK = "demo"
DEMO_DEVICE = "demo-device"
"""Pairing name of the demo's simulated device."""
STATUS_INTERVAL = 1.0
"""Seconds between saves of each link's state for ``appliance status``."""


@dataclasses.dataclass
class RunOptions:
    """Settings of one ``appliance run``; the CLI fills them from its options."""

    links: list[LinkConfig] = dataclasses.field(default_factory=list)
    """The links to read; empty with ``demo``."""
    demo: bool = False
    """Read from the bundled device simulator over a pty."""
    demo_rate: float = 5.0
    """Lines per second the simulator sends."""
    demo_protocol: Protocol = Protocol.FRAMED
    """Wire protocol of the demo device."""
    max_records: int | None = None
    """Stop reading after this many new records per link, then exit once all are final."""
    max_pending: int = 10_000
    """Unfinished records above which intake stops reading."""
    upload_url: str | None = None
    """Upload queued records here in the background."""
    sync: SyncConfig = dataclasses.field(default_factory=SyncConfig)
    """Token, TLS, batch and rate-limit settings of the upload."""
    mqtt: MqttConfig = dataclasses.field(default_factory=MqttConfig)
    """Broker, TLS, credentials and topic when ``sync.sink`` is ``"mqtt"``."""
    outbox: OutboxConfig = dataclasses.field(default_factory=OutboxConfig)
    """Quota, retention and time-to-live of the outbox."""
    model: str | None = None
    """Model manifest name or GGUF file; None uses the default model."""
    threads: int | None = None
    """llama.cpp threads; None takes the model manifest's ``n_threads``."""
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    """Collector, capture mode, spool bound and drift sample of the traces."""
    review: ReviewConfig = dataclasses.field(default_factory=ReviewConfig)
    """The reviewer endpoint; a reviewer thread runs only when it is enabled."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def build_workflow(
    data_dir: Path,
    model: str | None,
    threads: int | None,
    models_home: Path | None = None,
) -> Workflow:
    """Load the model and grammar and return a workflow over ``data_dir``.

    Without ``model``, the model installed and active in ``models_home`` (by
    default ``data_dir``; see docs/models.md) is used, else the default model.

    Raises:
        ModelNotFoundError, ModelLoadError: the model cannot be used.
        GrammarError: llama.cpp rejects the generated grammar.
    """
    selection = select_model(model, data_dir=models_home or data_dir)
    manifest = selection.manifest
    engine = load_engine(selection, threads)
    schema = log_event_schema()
    grammar = schema_to_gbnf(schema)
    check_grammar(grammar, selection.path, data_dir / "grammar-checks")
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
        self.links: list[RunningLink] = []
        self.outbox_full = threading.Event()
        """Set while the outbox is over its quota; intake pauses."""
        self.sync_wake = threading.Event()
        """Set to start a sync at once instead of at the next interval."""
        self.sync_paused = threading.Event()
        self._sync_interrupt = threading.Event()
        """Set to end a running sync early: on stop and on pause."""
        self.started_at = time.time()
        self.model_name = ""
        self.notifier = Notifier()
        self._work_ready: threading.Event | None = None
        """The workflow's wake-up event, once the workflow is built."""
        self.policy = OutboxPolicy(
            options.outbox.quota_bytes,
            options.outbox.retain_uploaded_s,
            options.outbox.ttl_s,
        )

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
        telemetry = self._start_telemetry()
        workflow.telemetry = telemetry
        self._work_ready = workflow.work_ready
        workers = [
            Worker("inference", workflow, inference_jobs(workflow)),
            Worker("steps", workflow, step_jobs(workflow)),
        ]
        store = Store(db_path(self.data_dir))
        resumed = store.unfinished_count()
        self._check_outbox(store)
        store.close()
        if resumed:
            logger.info("resuming %d unfinished records from an earlier run", resumed)

        line_simulator = None
        try:
            if opts.demo:
                line_simulator = self._open_demo(workflow)
            for config in opts.links:
                self.links.append(self._open(config, workflow))
        except BaseException:
            self._stop_links()
            raise
        self.model_name = workflow.engine.model_name
        control = ControlServer(self.data_dir, self._control_handlers())
        try:
            control.start()
        except ApplianceError:
            self._stop_links()
            raise
        uploader_thread = None
        if opts.upload_url or opts.sync.sink == "mqtt":
            uploader_thread = threading.Thread(
                target=self._upload_loop,
                args=(opts.upload_url,),
                name="uploader",
                daemon=True,
            )

        reviewer = self._start_reviewer(telemetry)
        for worker in workers:
            worker.start()
        for running in self.links:
            running.start()
        if line_simulator is not None:
            line_simulator.start()
        if uploader_thread is not None:
            uploader_thread.start()

        self.notifier.ready(f"reading {len(self.links)} link(s)")
        try:
            code = self._supervise(workers)
        finally:
            self.notifier.stopping()
            control.stop()
            self._sync_interrupt.set()
            self._stop_links()
            for worker in workers:
                worker.stop()
            for worker in workers:
                worker.join(timeout=30)
            self.stop_event.set()
            if uploader_thread is not None:
                uploader_thread.join(timeout=10)
            if reviewer is not None:
                reviewer.stop()
                reviewer.join(timeout=10)
            close_engine(workflow, workers)
            telemetry.close()
        return code

    def _start_reviewer(self, telemetry: NoTelemetry) -> ReviewWorker | None:
        """Start the reviewer thread when ``[review]`` is enabled.

        A reviewer that cannot start is logged and left out, because review
        is optional and must not stop the local pipeline.
        """
        config = self.options.review
        if not config.enabled:
            return None
        try:
            activity = make_activity(config, stop=threading.Event(), tracer=telemetry)
        except ApplianceError as exc:
            logger.error("reviewer not started: %s", exc)
            return None
        reviewer = ReviewWorker(db_path(self.data_dir), activity, config)
        reviewer.start()
        return reviewer

    def _start_telemetry(self) -> NoTelemetry:
        """Start tracing and metrics; without them the pipeline runs on."""
        try:
            telemetry = Telemetry(
                self.data_dir, self.options.telemetry, link_fill=self._ring_fill
            )
        except ApplianceError as exc:
            logger.warning("telemetry off for this run: %s", exc)
            return NO_TELEMETRY
        telemetry.start()
        return telemetry

    def _ring_fill(self) -> dict[str, float]:
        return {
            running.name: len(running.ring) / running.ring.capacity
            for running in self.links
        }

    def _open(self, config: LinkConfig, workflow: Workflow) -> RunningLink:
        return open_link(
            config,
            self.data_dir,
            db_path(self.data_dir),
            workflow.work_ready,
            self.options.max_records,
            self.options.max_pending,
            hold=self.outbox_full,
        )

    def _stop_links(self) -> None:
        # Each link closes before its intake drains, and a demo device stops
        # after its link, so its end never looks unplugged.
        for running in self.links:
            running.stop()
        self._save_link_status()

    def _supervise(self, workers: list[Worker]) -> int:
        store = Store(db_path(self.data_dir), readonly=True)
        last_status = last_outbox = last_ping = time.monotonic()
        ping_every = self.notifier.watchdog_interval
        try:
            while not self.stop_event.wait(0.25):
                if (
                    ping_every is not None
                    and time.monotonic() - last_ping >= ping_every
                ):
                    # The supervisor pings only while it runs its loop, so a
                    # hung supervisor gets the daemon restarted.
                    self.notifier.watchdog()
                    last_ping = time.monotonic()
                intakes = [running.intake for running in self.links]
                failed = [t for t in (*intakes, *workers) if getattr(t, "error", None)]
                if failed:
                    logger.error(
                        "stopping: thread %s failed: %s",
                        failed[0].name,
                        failed[0].error,
                    )
                    return 1
                now = time.monotonic()
                if now - last_status >= STATUS_INTERVAL:
                    self._save_link_status()
                    last_status = now
                if now - last_outbox >= self.options.outbox.check_interval_s:
                    writer = Store(db_path(self.data_dir))
                    try:
                        self._check_outbox(writer)
                    finally:
                        writer.close()
                    last_outbox = now
                if (
                    intakes
                    and all(intake.done.is_set() for intake in intakes)
                    and store.unfinished_count() == 0
                ):
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

    def _idle(self, seconds: float) -> None:
        """Wait between syncs; a stop or a sync-now request ends the wait."""
        if self.sync_wake.wait(seconds):
            self.sync_wake.clear()

    def request_stop_sync(self) -> None:
        """End a running sync early and wake the upload loop, as a stop does."""
        self._sync_interrupt.set()
        self.sync_wake.set()

    def _control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The commands of the control socket (docs/control.md)."""

        def status(args: dict[str, Any]) -> dict[str, Any]:
            result = collect_status(self.data_dir)
            for running in self.links:
                live = result["links"].setdefault(running.name, {})
                live.update(running.counts())
                live["state"] = str(running.link.state)
                live["last_error"] = running.link.last_error
                live["transport"] = running.config.transport.value
                live["protocol"] = running.config.protocol.value
                live["paused"] = bool(getattr(running.link, "paused", False))
                live["ring_fill"] = round(len(running.ring) / running.ring.capacity, 3)
            result["daemon"] = {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "model": self.model_name,
                "upload_url": self.options.upload_url,
                "sync_paused": self.sync_paused.is_set(),
                "outbox_full": self.outbox_full.is_set(),
            }
            return result

        def sync_now(args: dict[str, Any]) -> str:
            if not self.options.upload_url:
                raise ValueError(
                    "no upload URL is configured; start the daemon with "
                    "--upload-url or a [sync] url"
                )
            self.sync_paused.clear()
            self._sync_interrupt.clear()
            self.sync_wake.set()
            return "sync started"

        def sync_pause(args: dict[str, Any]) -> str:
            self.sync_paused.set()
            self._sync_interrupt.set()
            return "sync paused"

        def sync_resume(args: dict[str, Any]) -> str:
            self.sync_paused.clear()
            self._sync_interrupt.clear()
            self.sync_wake.set()
            return "sync resumed"

        def link(args: dict[str, Any], pause: bool) -> str:
            name = str(args["name"])
            for running in self.links:
                if running.name == name:
                    action = getattr(running.link, "pause" if pause else "resume", None)
                    if action is None:
                        raise ValueError(f"link {name!r} cannot be paused")
                    action()
                    return f"link {name} {'disconnected' if pause else 'connected'}"
            raise ValueError(
                f"no link named {name!r}; links: {[r.name for r in self.links]}"
            )

        def retry(args: dict[str, Any]) -> str:
            store = Store(db_path(self.data_dir))
            try:
                if args.get("all_dead"):
                    moved = requeue_all_dead(store)
                    message = f"{moved} dead records put back into the workflow"
                else:
                    full_id, state = requeue_dead(store, str(args["id"]))
                    message = f"record {full_id} put back in state {state}"
            finally:
                store.close()
            self.request_work()
            return message

        def devices(args: dict[str, Any]) -> list[dict[str, Any]]:
            # scan() rather than list(): one damaged key file must not hide
            # the other devices.
            keys, unusable = PairingStore(self.data_dir / STORE_DIR_NAME).scan()
            listed: list[dict[str, Any]] = [
                {
                    "device_id": key.device_id_hex,
                    "name": key.name,
                    "created_at": key.created_at.isoformat(),
                }
                for key in keys
            ]
            listed += [
                {"file": str(bad.path), "error": str(bad.error)} for bad in unusable
            ]
            return listed

        def pair(args: dict[str, Any]) -> dict[str, str]:
            pairing = PairingStore(self.data_dir / STORE_DIR_NAME)
            key = pairing.pair(str(args["name"]))
            if args.get("export"):
                pairing.export(key.device_id, Path(str(args["export"])))
            return {"device_id": key.device_id_hex, "name": key.name}

        def forget(args: dict[str, Any]) -> str:
            pairing = PairingStore(self.data_dir / STORE_DIR_NAME)
            device = str(args["device"])
            if re.fullmatch(r"[0-9a-fA-F]{16}", device):
                removed = pairing.remove_key_file(device)
                name = removed.name if removed else "damaged key file"
                return f"device {device.lower()} ({name}) unpaired"
            key = pairing.forget(device)
            return f"device {key.device_id_hex} ({key.name}) unpaired"

        def scan(args: dict[str, Any]) -> dict[str, Any]:
            return scan_all(float(args.get("ble_seconds", 0)))

        return {
            "ping": lambda args: {"pid": os.getpid(), "started_at": self.started_at},
            "status": status,
            "sync_now": sync_now,
            "sync_pause": sync_pause,
            "sync_resume": sync_resume,
            "link_disconnect": lambda args: link(args, pause=True),
            "link_connect": lambda args: link(args, pause=False),
            "retry": retry,
            "devices": devices,
            "pair": pair,
            "unpair": forget,
            "scan": scan,
        }

    def request_work(self) -> None:
        """Wake the workflow workers (after records were put back)."""
        if self._work_ready is not None:
            self._work_ready.set()

    def _check_outbox(self, store: Store) -> None:
        """Apply the outbox rules and pause or resume intake accordingly."""
        try:
            report = maintain(store, self.policy)
        except ApplianceError as exc:
            logger.warning("outbox check failed: %s", exc)
            return
        if report.full:
            self.outbox_full.set()
        elif self.outbox_full.is_set():
            logger.info("outbox below its quota again; intake resumes")
            self.outbox_full.clear()

    def _save_link_status(self) -> None:
        if not self.links:
            return
        store = Store(db_path(self.data_dir))
        try:
            for running in self.links:
                store.save_link_status(
                    running.name,
                    running.config.transport.value,
                    running.config.protocol.value,
                    str(running.link.state),
                    running.link.last_error,
                )
        except ApplianceError as exc:
            logger.warning("link status not saved: %s", exc)
        finally:
            store.close()

    def _open_demo(self, workflow: Workflow) -> LineDeviceSimulator | None:
        """Start the demo device and open its link.

        Returns the line simulator, which starts after the link; the framed
        simulator is already running because it creates the pty.
        """
        opts = self.options
        if opts.demo_protocol == Protocol.LINES:
            store = Store(db_path(self.data_dir))
            start_line = store.count_link_records(DEMO_LINK)
            store.close()
            pty = PtyPair()
            simulator = LineDeviceSimulator(
                pty.master_fd,
                load_sample_lines(),
                rate=opts.demo_rate,
                start=start_line,
            )
            logger.info(
                "demo: a line device replays the BGL sample from line %d at "
                "%.1f lines/s on %s",
                start_line + 1,
                opts.demo_rate,
                pty.slave_path,
            )
            config = LinkConfig(
                name=DEMO_LINK, port=pty.slave_path, protocol=Protocol.LINES
            )
            try:
                running = self._open(config, workflow)
            except BaseException:
                pty.close()
                raise
            running.on_close += [simulator.stop, pty.close]
            self.links.append(running)
            return simulator
        framed, tempdir = self._start_framed_demo()
        assert framed.port_path is not None
        config = LinkConfig(name=DEMO_LINK, port=framed.port_path)
        try:
            running = self._open(config, workflow)
        except BaseException:
            framed.stop()
            remove_tree(tempdir)()
            raise
        running.on_close += [framed.stop, remove_tree(tempdir)]
        self.links.append(running)
        return None

    def _start_framed_demo(self) -> tuple[FramedDeviceSimulator, Path]:
        """Pair the demo device if needed and start it on a fresh pty.

        The simulated device keeps its stream across runs, as a device with
        persistent storage would, so a rerun continues after the last line
        the appliance stored.
        """
        opts = self.options
        pairing = PairingStore(self.data_dir / STORE_DIR_NAME)
        try:
            key = pairing.get(DEMO_DEVICE)
        except PairingError:
            key = pairing.pair(DEMO_DEVICE)
            logger.info("demo: paired %s as device %s", DEMO_DEVICE, key.device_id_hex)
        store = Store(db_path(self.data_dir))
        stream = store.latest_stream(key.device_id_hex)
        store.close()
        stream_id, first = (
            (bytes.fromhex(stream[0]), stream[1]) if stream else (None, 0)
        )
        lines = load_sample_lines()
        messages = (line.encode("utf-8") for line in lines[first:])
        tempdir = Path(tempfile.mkdtemp(prefix="field-relay-demo-"))
        simulator = FramedDeviceSimulator(
            key,
            str(tempdir / "ttyDEMO"),
            messages=messages,
            rate=opts.demo_rate,
            stream_id=stream_id,
            first_number=first,
        )
        try:
            simulator.start()
        except BaseException:
            remove_tree(tempdir)()
            raise
        logger.info(
            "demo: device %s sends the BGL sample from line %d at %.1f lines/s "
            "over the sealed framed protocol on %s",
            key.device_id_hex,
            first + 1,
            opts.demo_rate,
            simulator.port_path,
        )
        return simulator, tempdir

    def _upload_loop(self, url: str | None) -> None:
        """Probe the sink; whenever it answers, drain the outbox in bulk."""
        opts = self.options
        try:
            uploader = make_sink(db_path(self.data_dir), opts.sync, opts.mqtt, url=url)
        except ApplianceError as exc:
            logger.error("background upload not started: %s", exc)
            return
        unreachable = 0
        try:
            while not self.stop_event.is_set():
                if not uploader.probe():
                    unreachable += 1
                    if unreachable == 1:
                        logger.info(
                            "sink %s unreachable; records stay queued", uploader.url
                        )
                    self.stop_event.wait(backoff_delay(unreachable, base=1.0, cap=60.0))
                    continue
                if unreachable:
                    logger.info("sink %s reachable again; syncing", uploader.url)
                    unreachable = 0
                if self.sync_paused.is_set():
                    self._idle(1.0)
                    continue
                result = uploader.sync(deadline=None, stop=self._sync_interrupt)
                self._idle(5.0 if result.last_error and result.batches == 0 else 1.0)
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
