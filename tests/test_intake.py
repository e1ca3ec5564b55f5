"""End-to-end intake tests without a model.

Bytes go into a real pty, SerialLink moves them into a RingBuffer, and LineIntake
commits one record per line into a real SQLite file under ``tmp_path``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.intake import LineIntake
from appliance.store import Store
from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import LineEnding, LineSplitter
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from firmware_bridge.serial_link import SerialLink
from firmware_bridge.simulator import LineDeviceSimulator, PtyPair, load_sample_lines

LINK = "uart0"
WAIT_SECONDS = 10.0
"""Maximum seconds to wait for the pipeline threads. A passing run needs far less."""


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class IntakeRig:
    """A pty, a started SerialLink and a started LineIntake writing to ``db_path``."""

    def __init__(
        self,
        db_path: Path,
        max_records: int | None,
        max_line_bytes: int,
        line_timeout: float,
    ) -> None:
        self.db_path = db_path
        # Creating the tables first lets the test open a reader before intake commits.
        Store(db_path).close()
        self.reader = Store(db_path, readonly=True)
        self.pty = PtyPair()
        self.counters = LinkCounters()
        self.ring = RingBuffer(65536, OverflowPolicy.BLOCK)
        self.link = SerialLink(LINK, self.pty.slave_path, self.ring, self.counters)
        splitter = LineSplitter(
            self.counters,
            LineEnding.AUTO,
            max_line_bytes=max_line_bytes,
            line_timeout=line_timeout,
        )
        self.work_ready = threading.Event()
        self.intake = LineIntake(
            LINK,
            self.ring,
            splitter,
            db_path,
            self.work_ready,
            max_records=max_records,
        )
        self.link.open()
        self.link.start()
        self.intake.start()

    def write(self, data: bytes) -> None:
        """Write ``data`` to the device side of the pty."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.pty.master_fd, view) :]

    def record_count(self) -> int:
        return self.reader.count_link_records(LINK)

    def records(self) -> list[sqlite3.Row]:
        return self.reader.query(
            "SELECT * FROM records WHERE link = ? ORDER BY seq", (LINK,)
        )

    def stop(self) -> None:
        """Stop the link reader, then intake, which saves the counters as it exits."""
        self.link.close()
        self.intake.stop()
        self.intake.join(timeout=WAIT_SECONDS)

    def close(self) -> None:
        self.stop()
        self.pty.close()
        self.reader.close()


@pytest.fixture
def start_intake(tmp_path: Path) -> Iterator[Callable[..., IntakeRig]]:
    """Return a factory that starts an IntakeRig. The fixture closes every rig."""
    rigs: list[IntakeRig] = []

    def start(
        max_records: int | None = None,
        max_line_bytes: int = 4096,
        line_timeout: float = 10.0,
    ) -> IntakeRig:
        rig = IntakeRig(
            tmp_path / "appliance.db", max_records, max_line_bytes, line_timeout
        )
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        rig.close()


def test_intake_pty_lines_become_records(start_intake):
    rig = start_intake(max_records=3)
    data = b"boot ok\r\ntemp=21.5 C\r\nfan rpm 1200\r\n"

    rig.write(data)

    assert rig.intake.done.wait(WAIT_SECONDS)
    rig.stop()
    assert not rig.intake.is_alive()
    assert rig.intake.error is None
    records = rig.records()
    assert [row["seq"] for row in records] == [1, 2, 3]
    assert [row["raw"] for row in records] == ["boot ok", "temp=21.5 C", "fan rpm 1200"]
    assert [row["raw_bytes"] for row in records] == [
        b"boot ok",
        b"temp=21.5 C",
        b"fan rpm 1200",
    ]
    assert {row["state"] for row in records} == {"received"}
    assert {row["kind"] for row in records} == {"log_event"}
    assert {row["flags"] for row in records} == {""}
    assert rig.work_ready.is_set()


def test_intake_saves_link_counters(start_intake):
    rig = start_intake(max_records=2)
    data = b"first\nsecond\n"

    rig.write(data)

    assert rig.intake.done.wait(WAIT_SECONDS)
    rig.stop()
    saved = rig.reader.load_link_counters(LINK)
    assert saved["bytes"] == len(data)
    assert saved["lines"] == 2
    assert saved["read_errors"] == 0
    assert saved == rig.counters.as_dict()


def test_intake_burst_500_lines(start_intake):
    lines = load_sample_lines()[:500]
    rig = start_intake(max_records=500)
    simulator = LineDeviceSimulator(rig.pty.master_fd, lines, rate=0)

    simulator.start()
    try:
        done = rig.intake.done.wait(WAIT_SECONDS)
    finally:
        simulator.stop()

    assert done
    rig.stop()
    assert rig.intake.error is None
    records = rig.records()
    assert len(records) == 500
    assert [row["seq"] for row in records] == list(range(1, 501))
    assert [row["raw"] for row in records] == lines
    assert {row["state"] for row in records} == {"received"}
    assert rig.counters.read_errors == 0


def test_intake_mixed_bad_input(start_intake):
    rig = start_intake(max_records=7, max_line_bytes=64)
    first_write = (
        b"plain ok\r\n"
        + b"bad \xff\xfe utf8\n"
        + b"nul\x00byte\n"
        + b"cr only\r"
        + b"x" * 100
        + b"\n"
        + b"split crlf\r"
    )
    # The LF that completes "split crlf\r" and two empty lines ("\n", "\r\n").
    second_write = b"\n" + b"\n\r\n" + b"last\r\n"

    rig.write(first_write)
    # "split crlf" is committed only after its CR was read, so the LF below
    # reaches the splitter in a later read than the CR.
    assert wait_until(lambda: rig.record_count() == 6)
    rig.write(second_write)

    assert rig.intake.done.wait(WAIT_SECONDS)
    rig.stop()
    assert rig.intake.error is None
    records = rig.records()
    assert [row["raw"] for row in records] == [
        "plain ok",
        "bad \ufffd\ufffd utf8",
        "nulbyte",
        "cr only",
        "x" * 64,
        "split crlf",
        "last",
    ]
    assert [row["seq"] for row in records] == list(range(1, 8))
    assert [row["flags"] for row in records] == ["", "", "", "", "truncated", "", ""]
    assert records[1]["raw_bytes"] == b"bad \xff\xfe utf8"
    saved = rig.reader.load_link_counters(LINK)
    assert saved["bytes"] == len(first_write) + len(second_write)
    assert saved["lines"] == 7
    assert saved["decode_errors"] == 1
    assert saved["nul_bytes"] == 1
    assert saved["empty_lines"] == 2
    assert saved["truncated_lines"] == 1
    assert saved["dropped_bytes"] == 36
    assert saved["read_errors"] == 0


def test_intake_partial_line_after_deadline(start_intake):
    rig = start_intake(max_records=2, line_timeout=0.2)

    rig.write(b"complete\nno line ending")

    assert rig.intake.done.wait(WAIT_SECONDS)
    rig.stop()
    records = rig.records()
    assert [row["raw"] for row in records] == ["complete", "no line ending"]
    assert [row["flags"] for row in records] == ["", "timed_out"]
    saved = rig.reader.load_link_counters(LINK)
    assert saved["line_timeouts"] == 1


def test_intake_continues_seq_after_restart(start_intake):
    first = start_intake(max_records=2)
    first.write(b"one\ntwo\n")
    assert first.intake.done.wait(WAIT_SECONDS)
    first.close()

    second = start_intake(max_records=1)
    second.write(b"three\n")

    assert second.intake.done.wait(WAIT_SECONDS)
    second.stop()
    records = second.records()
    assert [row["seq"] for row in records] == [1, 2, 3]
    assert [row["raw"] for row in records] == ["one", "two", "three"]


def test_intake_max_records_lines_counter(tmp_path: Path):
    db_path = tmp_path / "appliance.db"
    ring = RingBuffer(4096)
    counters = LinkCounters()
    # All three lines are buffered before intake starts, so its first read
    # returns them together and the third one is past max_records.
    ring.put(b"one\ntwo\nthree\n")
    intake = LineIntake(
        LINK, ring, LineSplitter(counters), db_path, threading.Event(), max_records=2
    )

    intake.start()
    intake.join(timeout=WAIT_SECONDS)

    assert not intake.is_alive()
    reader = Store(db_path, readonly=True)
    try:
        committed = reader.count_link_records(LINK)
        saved = reader.load_link_counters(LINK)
    finally:
        reader.close()
    assert committed == 2
    assert saved["lines"] == committed


def test_commit_skips_taken_sequence(tmp_path: Path) -> None:

    from appliance.intake import LineIntake
    from appliance.store import Store
    from firmware_bridge.counters import LinkCounters
    from firmware_bridge.lines import Line, LineSplitter
    from firmware_bridge.ring_buffer import RingBuffer

    store = Store(tmp_path / "appliance.db")
    with store.transaction() as conn:
        store.insert_record(conn, "uart0", 1, "first", b"first")
    intake = LineIntake(
        "uart0",
        RingBuffer(64),
        LineSplitter(LinkCounters()),
        store.path,
        threading.Event(),
    )
    next_seq = intake._commit(store, [Line(text="second", data=b"second")], 1)
    rows = store.list_records()
    store.close()
    assert [row["raw"] for row in rows] == ["first", "second"]
    assert next_seq == 3
