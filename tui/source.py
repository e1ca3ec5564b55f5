"""Data access for the TUI: the database read-only, the daemon through its socket.

Every method blocks on SQLite or on the control socket, so the app calls them
from Textual thread workers only. Each call opens its own read-only
connection, because a SQLite connection must stay on the thread that made it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.control import ControlClient, socket_path
from appliance.errors import ControlError
from appliance.prompts import build_messages
from appliance.review_status import empty_review_summary, review_summary
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from tui import queries
from tui.queries import FEED_COLUMNS
from tui.views import (
    Connection,
    Dashboard,
    DeadLetters,
    DevicesView,
    FeedBatch,
    LinkView,
    RecordDetail,
    ReviewView,
    SyncView,
)

CONTROL_TIMEOUT_S = 5.0
"""Seconds one control command may take before the TUI reports the daemon as
not responding. A BLE scan gets its scan time on top."""
FEED_FETCH_LIMIT = 500
"""Newest arrivals read per feed poll. A burst beyond it is counted as skipped,
so one poll's memory and drawing work stay bounded at any record rate."""
DEAD_LETTER_LIMIT = 500
"""Newest dead records listed; the screen shows the total as well."""
LINK_ERROR_COUNTERS = (
    "decode_errors",
    "truncated_lines",
    "line_timeouts",
    "overflows",
    "read_errors",
    "write_errors",
    "crc_errors",
    "malformed_frames",
    "oversize_frames",
    "unpaired_hellos",
    "auth_failures",
    "replayed_frames",
    "stale_frames",
    "plaintext_refused",
    "unexpected_frames",
    "message_gaps",
)
"""Link counters (firmware_bridge/counters.py, frames.py and the endpoint's
stats) that count a fault; the dashboard's error column is their sum."""


class RelaySource:
    """Reads one data directory and talks to the daemon that serves it.

    Args:
        data_dir: the daemon's data directory.
        clock: seconds since the epoch, for ages shown on screen; tests pass a
            fixed clock so snapshots do not change with the time of day.
        control_timeout: seconds a control command may take.
    """

    def __init__(
        self,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
        control_timeout: float = CONTROL_TIMEOUT_S,
    ) -> None:
        self.data_dir = data_dir
        self.db_path = data_dir / DB_NAME
        self.clock = clock
        self.control_timeout = control_timeout
        self._rates = _RateTracker()

    # Control socket -----------------------------------------------------------

    def call(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one control command and return its result.

        Raises:
            ControlError: no daemon is listening, access is denied, or the
                command failed. The message names the cause.
        """
        with ControlClient(self.data_dir, timeout or self.control_timeout) as client:
            return client.call(command, **args)

    def probe(self, command: str = "ping") -> tuple[Connection, Any]:
        """Return the connection state and the result of ``command`` when live.

        ``ping`` is cheap; ``status`` also returns the live link states.
        """
        has_database = self.db_path.exists()
        path = socket_path(self.data_dir)
        if not path.exists():
            return Connection(False, "no daemon running", None, has_database), None
        if not os.access(path, os.R_OK | os.W_OK):
            reason = f"permission denied on {path.name} (docs/tui.md: Access)"
            return Connection(False, reason, None, has_database), None
        try:
            result = self.call(command)
        except ControlError as exc:
            return Connection(
                False, f"daemon not responding: {exc}", None, has_database
            ), None
        pid = _daemon_pid(command, result)
        return Connection(True, "", pid, has_database), result

    # Database -----------------------------------------------------------------

    @contextlib.contextmanager
    def _store(self) -> Iterator[Store | None]:
        """Open the database read-only, or yield None when it does not exist."""
        if not self.db_path.exists():
            yield None
            return
        store = Store(self.db_path, readonly=True, clock=self.clock)
        try:
            yield store
        finally:
            store.close()

    def dashboard(self) -> Dashboard:
        """Read the dashboard: links, records per state, outbox, sync, model."""
        connection, status = self.probe("status")
        daemon = (status or {}).get("daemon") or {}
        with self._store() as store:
            if store is None:
                return _empty_dashboard(connection)
            counts = store.state_counts()
            sync = store.sync_state()
            oldest = store.query(
                "SELECT MIN(received_at) AS t FROM records WHERE state = ?",
                (str(RecordState.QUEUED),),
            )[0]["t"]
            links = status["links"] if status else queries.saved_links(store)
            last_error = queries.last_error(store)
            model, tokens_per_s = queries.inference_speed(store)
            review = (status or {}).get("review") or review_summary(
                store, now=self.clock()
            )
        outbox_full = daemon.get("outbox_full")
        if outbox_full is None:
            outbox_full = bool(int(float(sync.get("outbox_full") or 0)))
        return Dashboard(
            connection=connection,
            links=self._rates.link_views(links),
            states=counts,
            outbox_queued=counts[RecordState.QUEUED],
            outbox_oldest_age_s=self.clock() - oldest if oldest else None,
            outbox_full=bool(outbox_full),
            last_sync_at=sync.get("last_success_at"),
            sync_error=sync.get("last_error"),
            sync_error_at=sync.get("last_error_at"),
            sync_paused=daemon.get("sync_paused") if connection.live else None,
            upload_url=daemon.get("upload_url"),
            last_error=last_error,
            model=daemon.get("model") or model,
            tokens_per_s=tokens_per_s,
            review=_review_view(review),
        )

    def feed(self, cursor: int, watch: Sequence[str] = ()) -> FeedBatch:
        """Read records inserted after rowid ``cursor`` and the current rows of
        the records in ``watch``.

        The first poll (``cursor`` 0) returns the newest ``FEED_FETCH_LIMIT``
        records without counting older ones as skipped.
        """
        with self._store() as store:
            if store is None:
                return FeedBatch([], [], 0, cursor)
            rows = store.query(
                f"SELECT {FEED_COLUMNS} FROM records WHERE rowid > ?"
                " ORDER BY rowid DESC LIMIT ?",
                (cursor, FEED_FETCH_LIMIT),
            )
            skipped = 0
            if cursor and len(rows) == FEED_FETCH_LIMIT:
                total = store.query(
                    "SELECT COUNT(*) AS n FROM records WHERE rowid > ?", (cursor,)
                )[0]["n"]
                skipped = int(total) - len(rows)
            updates = queries.rows_by_id(store, watch)
        arrivals = [queries.feed_row(row) for row in reversed(rows)]
        newest = rows[0]["key"] if rows else cursor
        return FeedBatch(arrivals, updates, skipped, newest)

    def dead_letters(self) -> DeadLetters:
        """Read the newest dead records and how many there are."""
        connection, _ = self.probe()
        with self._store() as store:
            if store is None:
                return DeadLetters(connection, 0, [])
            rows = store.query(
                f"SELECT {FEED_COLUMNS} FROM records WHERE state = ?"
                " ORDER BY updated_at DESC LIMIT ?",
                (str(RecordState.DEAD), DEAD_LETTER_LIMIT),
            )
            total = store.state_counts()[RecordState.DEAD]
        return DeadLetters(connection, total, [queries.feed_row(row) for row in rows])

    def record(self, record_id: str) -> RecordDetail | None:
        """Read one record with its history; None when it does not exist."""
        with self._store() as store:
            if store is None:
                return None
            row = store.get_record(record_id)
            if row is None:
                return None
            events = store.events_for(record_id)
        history = [queries.history_entry(event) for event in events]
        prompt = None
        if row["kind"] == RecordKind.LOG_EVENT:
            prompt = build_messages(row["raw"])
        return RecordDetail(
            record_id=row["id"],
            link=row["link"],
            seq=row["seq"],
            kind=row["kind"],
            state=row["state"],
            attempts=row["attempts"],
            received_at=row["received_at"],
            updated_at=row["updated_at"],
            raw=row["raw"],
            data=json.loads(row["data"]) if row["data"] else None,
            output=row["output"],
            error=row["error"],
            history=history,
            prompt=prompt,
            trace_id=queries.trace_id(history),
        )

    def sync(self) -> SyncView:
        """Read the sync counters, pending batches and recent deliveries."""
        connection, status = self.probe("status")
        daemon = (status or {}).get("daemon") or {}
        with self._store() as store:
            if store is None:
                return _empty_sync(connection)
            sync = store.sync_state()
            queued = store.state_counts()[RecordState.QUEUED]
            pending, recent = queries.batches(store)
        return SyncView(
            connection=connection,
            paused=daemon.get("sync_paused") if connection.live else None,
            upload_url=daemon.get("upload_url"),
            queued=queued,
            last_success_at=sync.get("last_success_at"),
            last_error=sync.get("last_error"),
            last_error_at=sync.get("last_error_at"),
            retries=int(sync.get("retries") or 0),
            rate_limit_wait_s=float(sync.get("rate_limit_wait_s") or 0.0),
            duplicates=int(sync.get("duplicates") or 0),
            rejected=int(sync.get("rejected") or 0),
            batches_sent=int(sync.get("batches") or 0),
            pending=pending,
            recent=recent,
        )

    def devices(self) -> DevicesView:
        """Read links, paired devices and serial ports.

        With a daemon, the daemon lists them; without one, the TUI reads the
        pairing store and the serial ports itself.
        """
        connection, status = self.probe("status")
        if connection.live:
            return self._daemon_devices(connection, status)
        with self._store() as store:
            saved = queries.saved_links(store) if store is not None else {}
        paired, paired_error = _local_paired(self.data_dir)
        from appliance.cli_scan import serial_ports

        return DevicesView(
            connection=connection,
            links=self._rates.link_views(saved, update=False),
            paired=paired,
            paired_error=paired_error,
            serial=serial_ports(),
            ble=None,
            ble_error=None,
        )

    def _daemon_devices(self, connection: Connection, status: Any) -> DevicesView:
        paired: list[dict[str, str]] = []
        paired_error = None
        try:
            paired = self.call("devices")
        except ControlError as exc:
            paired_error = str(exc)
        try:
            serial = self.call("scan")["serial"]
        except ControlError:
            serial = []
        return DevicesView(
            connection=connection,
            links=self._rates.link_views(status["links"], update=False),
            paired=paired,
            paired_error=paired_error,
            serial=serial,
            ble=None,
            ble_error=None,
        )

    def ble_scan(self, seconds: float) -> tuple[list[dict[str, Any]], str | None]:
        """Scan for BLE devices for ``seconds``; returns the devices and an error.

        The daemon scans when it runs, so the TUI never competes with it for
        the adapter; otherwise the TUI scans itself.
        """
        connection, _ = self.probe()
        if connection.live:
            try:
                result = self.call(
                    "scan", timeout=seconds + self.control_timeout, ble_seconds=seconds
                )
            except ControlError as exc:
                return [], str(exc)
            return result["ble"], result["ble_error"]
        from appliance.cli_scan import ble_devices

        try:
            return ble_devices(seconds), None
        except RuntimeError as exc:
            return [], str(exc)


class _RateTracker:
    """Turns cumulative link counters into per-second rates between polls."""

    def __init__(self) -> None:
        self._previous: dict[str, tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def link_views(
        self, links: dict[str, dict[str, Any]], update: bool = True
    ) -> list[LinkView]:
        """Build the link rows; ``update`` False leaves the rate baseline alone,
        so a screen polled at another interval does not skew the dashboard's rates."""
        now = time.monotonic()
        views = []
        with self._lock:
            for name in sorted(links):
                counters = links[name]
                delivered = int(counters.get("messages", 0)) + int(
                    counters.get("lines", 0)
                )
                read = int(counters.get("bytes", 0))
                messages_rate = bytes_rate = 0.0
                previous = self._previous.get(name)
                if previous is not None and now > previous[0]:
                    elapsed = now - previous[0]
                    messages_rate = max(delivered - previous[1], 0) / elapsed
                    bytes_rate = max(read - previous[2], 0) / elapsed
                if update:
                    self._previous[name] = (now, delivered, read)
                views.append(_link_view(name, counters, messages_rate, bytes_rate))
        return views


def _link_view(
    name: str, counters: dict[str, Any], messages_rate: float, bytes_rate: float
) -> LinkView:
    return LinkView(
        name=name,
        state=str(counters.get("state") or "-"),
        transport=str(counters.get("transport") or "-"),
        protocol=str(counters.get("protocol") or "-"),
        paused=bool(counters.get("paused")),
        messages_per_s=messages_rate,
        bytes_per_s=bytes_rate,
        errors=sum(int(counters.get(key) or 0) for key in LINK_ERROR_COUNTERS),
        reconnects=int(counters.get("reconnects") or 0),
        last_error=counters.get("last_error"),
    )


def _review_view(review: dict[str, Any]) -> ReviewView:
    """Pick the dashboard's review figures from ``review_summary``'s dict."""
    return ReviewView(
        enabled=bool(review["enabled"]),
        pending=int(review["pending"]),
        agreement=review["agreement"]["recent"],
        alert=bool(review["agreement"]["alert"]),
        budget_state=str(review["budget"]["state"]),
        pause_reason=review["pause_reason"],
    )


def _daemon_pid(command: str, result: Any) -> int | None:
    if command == "status":
        return (result.get("daemon") or {}).get("pid")
    if isinstance(result, dict):
        return result.get("pid")
    return None


def _local_paired(data_dir: Path) -> tuple[list[dict[str, str]], str | None]:
    """List paired devices from the key files, as the ``devices`` command does."""
    from firmware_bridge.errors import PairingError
    from firmware_bridge.pairing import STORE_DIR_NAME, PairingStore

    directory = data_dir / STORE_DIR_NAME
    if not directory.exists():
        return [], None
    try:
        keys = PairingStore(directory).list()
    except (PairingError, OSError) as exc:
        return [], str(exc)
    paired = [
        {
            "device_id": key.device_id_hex,
            "name": key.name,
            "created_at": key.created_at.isoformat(),
        }
        for key in keys
    ]
    return paired, None


def _empty_dashboard(connection: Connection) -> Dashboard:
    return Dashboard(
        connection=connection,
        links=[],
        states={str(state): 0 for state in RecordState},
        outbox_queued=0,
        outbox_oldest_age_s=None,
        outbox_full=False,
        last_sync_at=None,
        sync_error=None,
        sync_error_at=None,
        sync_paused=None,
        upload_url=None,
        last_error=None,
        model=None,
        tokens_per_s=None,
        review=_review_view(empty_review_summary()),
    )


def _empty_sync(connection: Connection) -> SyncView:
    return SyncView(
        connection=connection,
        paused=None,
        upload_url=None,
        queued=0,
        last_success_at=None,
        last_error=None,
        last_error_at=None,
        retries=0,
        rate_limit_wait_s=0.0,
        duplicates=0,
        rejected=0,
        batches_sent=0,
        pending=[],
        recent=[],
    )
