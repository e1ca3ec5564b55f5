"""Intake for framed links: authenticated device messages become records.

A message is acknowledged to the device only after the transaction that stores
its record commits, so the device keeps every message the appliance has not
made durable and resends it after a crash, an unplug or a full disk. The
``messages`` table makes a resent message a no-op: it is stored once.

Backpressure: with ``max_pending`` unfinished records intake stops reading.
The ring buffer fills (block policy stops the port reader), acknowledgements
stop, and the device's send window closes, so nothing grows without bound.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from appliance.states import RecordKind
from appliance.store import Store
from firmware_bridge.counters import LinkCounters, add_counts
from firmware_bridge.frames import MAX_ENCODED
from firmware_bridge.protocol import ApplianceEndpoint, Message
from firmware_bridge.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

COUNTER_SAVE_INTERVAL = 1.0
"""Seconds between saves of the link counters when no message arrives."""


def link_counts(counters: LinkCounters, endpoint: ApplianceEndpoint) -> dict[str, int]:
    """All counts of a framed link, in one flat dict for status and the store."""
    return (
        counters.as_dict()
        | dataclasses.asdict(endpoint.decoder.stats)
        | dataclasses.asdict(endpoint.stats)
    )


class FrameIntake(threading.Thread):
    """Reads one framed link's ring buffer and commits a record per message.

    Args:
        link: the link name stored on every record.
        ring: the link's ring buffer.
        endpoint: the appliance side of the protocol for this link.
        write: sends bytes to the device; returns False when the link is down.
        counters: the link's byte-level counters.
        db_path: the appliance database.
        work_ready: set after each commit to wake the workflow.
        max_records: stop after this many records (None: run until stopped);
            messages past the limit are left unacknowledged with the device.
        max_pending: unfinished records above which intake waits.
        kind: what each message holds: free text for the model, or a JSON
            object that skips it.
        hold: while set, intake reads nothing (the outbox is full).
    """

    def __init__(
        self,
        link: str,
        ring: RingBuffer,
        endpoint: ApplianceEndpoint,
        write: Callable[[bytes], bool],
        counters: LinkCounters,
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
        self.endpoint = endpoint
        self.write = write
        self.counters = counters
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
        self._warned_no_frames = False

    def load_counts(self, saved: dict[str, int]) -> None:
        """Continue the counts an earlier run saved for this link."""
        add_counts(self.endpoint.decoder.stats, saved)
        add_counts(self.endpoint.stats, saved)

    def run(self) -> None:
        store = Store(self.db_path)
        self.endpoint.next_number = store.stream_next
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
            seq, took = self._process(store, data, now, seq)
            if took:
                last_save = now
            elif now - last_save >= COUNTER_SAVE_INTERVAL:
                self._save_counters(store)
                last_save = now
        if not self.done.is_set():
            # The link is closed before intake stops: commit what is buffered.
            while data := self.ring.get(4096, timeout=0):
                seq, _ = self._process(store, data, math.inf, seq)

    def _process(
        self, store: Store, data: bytes, now: float, seq: int
    ) -> tuple[int, bool]:
        """Feed bytes to the endpoint, commit its messages, send its replies."""
        endpoint = self.endpoint
        messages = endpoint.receive(data, now)
        if not self._warned_no_frames:
            self._check_for_text(endpoint)
        took = False
        while True:
            if messages:
                seq = self._take(store, messages, seq)
                took = True
            out = endpoint.take_output()
            if out:
                try:
                    self.write(out)
                except Exception:
                    # A transport bug must not end intake: the device resends
                    # whatever this reply would have acknowledged.
                    self.counters.write_errors += 1
                    logger.exception("link %s: write failed", self.link)
            if not endpoint.pending or self.done.is_set():
                return seq, took
            messages = endpoint.receive(b"", now)

    def _check_for_text(self, endpoint: ApplianceEndpoint) -> None:
        """Warn once when bytes arrive but none of them form a valid frame."""
        stats = endpoint.decoder.stats
        bad = stats.oversize_frames + stats.malformed_frames + stats.crc_errors
        if stats.frames == 0 and bad and self.counters.bytes >= 2 * MAX_ENCODED:
            self._warned_no_frames = True
            logger.warning(
                "link %s: %d bytes arrived but none forms a valid frame (%d bad); "
                'if the device prints text lines, set protocol = "lines" for this '
                "link (--protocol lines)",
                self.link,
                self.counters.bytes,
                bad,
            )

    def _take(self, store: Store, messages: list[Message], seq: int) -> int:
        endpoint = self.endpoint
        if self.max_records is not None:
            room = self.max_records - self.received
            if len(messages) > room:
                # Not acknowledged, so the device keeps them for a later run.
                messages = messages[:room]
        try:
            if messages:
                seq = self._commit(store, messages, seq)
        except BaseException:
            endpoint.rollback()
            raise
        if messages:
            endpoint.committed_up_to(messages[-1].number + 1)
        endpoint.rollback()
        if self.max_records is not None and self.received >= self.max_records:
            self.done.set()
        return seq

    def _commit(self, store: Store, messages: list[Message], seq: int) -> int:
        with store.transaction() as conn:
            for message in messages:
                if store.has_message(
                    conn, message.device_id, message.stream_id, message.number
                ):
                    # Stored by an earlier run whose acknowledgement was lost.
                    self.endpoint.stats.duplicate_messages += 1
                    continue
                if not message.body.strip():
                    # Nothing to triage; acknowledged and counted, as line mode
                    # skips empty lines.
                    self.counters.empty_lines += 1
                    continue
                raw = message.body.decode("utf-8", errors="replace")
                record_id = None
                while record_id is None:
                    record_id = store.insert_record(
                        conn,
                        self.link,
                        seq,
                        raw,
                        message.body,
                        self.kind,
                        "decode_error" if "\ufffd" in raw else "",
                    )
                    if record_id is None:
                        # Another writer took this number; never drop the message.
                        seq = store.next_seq_in(conn, self.link)
                store.record_message(
                    conn,
                    self.link,
                    message.device_id,
                    message.stream_id,
                    message.number,
                    record_id,
                )
                seq += 1
            store.save_link_counters(
                conn, self.link, link_counts(self.counters, self.endpoint)
            )
        self.received += len(messages)
        self.work_ready.set()
        return seq

    def _save_counters(self, store: Store) -> None:
        with store.transaction() as conn:
            store.save_link_counters(
                conn, self.link, link_counts(self.counters, self.endpoint)
            )

    def stop(self) -> None:
        self.stop_event.set()
