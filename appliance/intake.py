"""Intake: turns a link's buffered bytes into committed records.

A record exists, with its stable id, from the transaction that commits its raw
line; nothing later in the pipeline can lose it. Intake pushes back when the
workflow falls behind: once ``max_pending`` records are unfinished it stops
taking bytes from the ring buffer, which fills and applies its overflow policy.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from appliance.states import RecordKind
from appliance.store import Store
from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import Line, LineSplitter
from firmware_bridge.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

COUNTER_SAVE_INTERVAL = 1.0
"""Seconds between saves of the link counters when no line arrives."""


class LineIntake(threading.Thread):
    """Reads one link's ring buffer, splits lines and commits a record per line.

    Args:
        link: the link name stored on every record.
        ring: the link's ring buffer.
        splitter: line framing rules for the link.
        db_path: the appliance database.
        work_ready: set after each commit to wake the workflow.
        max_records: stop after this many records (None: run until stopped).
        max_pending: unfinished records above which intake waits.
        kind: what each message holds: free text for the model, or a JSON
            object that skips it.
        hold: while set, intake reads nothing (the outbox is full).
    """

    def __init__(
        self,
        link: str,
        ring: RingBuffer,
        splitter: LineSplitter,
        db_path: Path,
        work_ready: threading.Event,
        max_records: int | None = None,
        max_pending: int = 10_000,
        kind: RecordKind = RecordKind.LOG_EVENT,
        hold: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"intake-{link}", daemon=True)
        self.link = link
        self.ring = ring
        self.splitter = splitter
        self.counters: LinkCounters = splitter.counters
        self.db_path = db_path
        self.work_ready = work_ready
        self.max_records = max_records
        self.max_pending = max_pending
        self.kind = kind
        self.hold = hold or threading.Event()
        self.received = 0
        self.stop_event = threading.Event()
        self.done = threading.Event()
        """Set once ``max_records`` records are committed."""
        self.error: BaseException | None = None

    def run(self) -> None:
        store = Store(self.db_path)
        try:
            self._loop(store)
        except BaseException as exc:
            self.error = exc
            logger.exception(
                "intake for link %s stopped by an unexpected error", self.link
            )
        finally:
            self._save_counters(store)
            store.close()

    def _loop(self, store: Store) -> None:
        seq = store.next_seq(self.link)
        last_save = time.monotonic()
        while not self.stop_event.is_set() and not self.done.is_set():
            if self.hold.is_set() or store.unfinished_count() >= self.max_pending:
                self.stop_event.wait(0.5)
                continue
            data = self.ring.get(4096, timeout=0.2)
            now = time.monotonic()
            lines = self.splitter.feed(data, now) if data else []
            lines += self.splitter.poll(now)
            if lines:
                seq = self._take(store, lines, seq)
                last_save = now
            elif now - last_save >= COUNTER_SAVE_INTERVAL:
                self._save_counters(store)
                last_save = now
        if not self.done.is_set():
            self._drain(store, seq)

    def _drain(self, store: Store, seq: int) -> None:
        """Commit what the ring buffer and the partial line still hold at stop.

        The link is closed before intake stops, so no more bytes arrive.
        """
        lines: list[Line] = []
        while data := self.ring.get(4096, timeout=0):
            lines += self.splitter.feed(data, time.monotonic())
        lines += self.splitter.poll(math.inf)
        if lines:
            self._take(store, lines, seq)

    def _take(self, store: Store, lines: list[Line], seq: int) -> int:
        """Commit ``lines`` up to ``max_records`` and return the next sequence number."""
        if self.max_records is not None:
            room = self.max_records - self.received
            if len(lines) > room:
                # Lines past the limit were read in the same chunk; they are
                # not records, so they move to their own counter.
                self.counters.lines -= len(lines) - room
                self.counters.lines_after_limit += len(lines) - room
                logger.warning(
                    "link %s: discarded %d lines read after the %d-record limit",
                    self.link,
                    len(lines) - room,
                    self.max_records,
                )
                lines = lines[:room]
        if lines:
            seq = self._commit(store, lines, seq)
        if self.max_records is not None and self.received >= self.max_records:
            self.done.set()
        return seq

    def _commit(self, store: Store, lines: list[Line], seq: int) -> int:
        with store.transaction() as conn:
            for line in lines:
                flags = ",".join(
                    name
                    for name, on in (
                        ("truncated", line.truncated),
                        ("timed_out", line.timed_out),
                    )
                    if on
                )
                record_id = None
                while record_id is None:
                    record_id = store.insert_record(
                        conn,
                        self.link,
                        seq,
                        line.text,
                        line.data,
                        self.kind,
                        flags,
                    )
                    if record_id is None:
                        # Another writer took this number; never drop the line.
                        seq = store.next_seq_in(conn, self.link)
                        logger.warning(
                            "link %s: sequence taken, continuing at %d", self.link, seq
                        )
                logger.debug(
                    "link %s: record %s received (seq %d)", self.link, record_id, seq
                )
                seq += 1
            store.save_link_counters(conn, self.link, self.counters.as_dict())
        self.received += len(lines)
        self.work_ready.set()
        return seq

    def _save_counters(self, store: Store) -> None:
        with store.transaction() as conn:
            store.save_link_counters(conn, self.link, self.counters.as_dict())

    def stop(self) -> None:
        self.stop_event.set()
