"""Tests for LineSplitter, which frames a link's byte stream into text lines.

Every test passes explicit ``now`` values, so deadlines never depend on the clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import Line, LineEnding, LineSplitter


def make_splitter(
    line_ending: LineEnding = LineEnding.AUTO,
    max_line_bytes: int = 4096,
    line_timeout: float = 10.0,
) -> LineSplitter:
    return LineSplitter(
        LinkCounters(),
        line_ending=line_ending,
        max_line_bytes=max_line_bytes,
        line_timeout=line_timeout,
    )


def feed_chunks(
    splitter: LineSplitter, chunks: Iterable[bytes], now: float = 0.0
) -> list[Line]:
    """Feed every chunk at the same time ``now`` and return all finished lines."""
    lines: list[Line] = []
    for chunk in chunks:
        lines += splitter.feed(chunk, now)
    return lines


def texts(lines: list[Line]) -> list[str]:
    return [line.text for line in lines]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the sorted offsets ``cuts``."""
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]


def test_line_splitter_rejects_zero_max_line_bytes():
    with pytest.raises(ValueError, match="max_line_bytes"):
        make_splitter(max_line_bytes=0)


@pytest.mark.parametrize(
    ("line_ending", "data"),
    [
        (LineEnding.AUTO, b"one\ntwo\n"),
        (LineEnding.AUTO, b"one\rtwo\r"),
        (LineEnding.AUTO, b"one\r\ntwo\r\n"),
        (LineEnding.LF, b"one\ntwo\n"),
        (LineEnding.CR, b"one\rtwo\r"),
        (LineEnding.CRLF, b"one\r\ntwo\r\n"),
    ],
    ids=["auto-lf", "auto-cr", "auto-crlf", "lf", "cr", "crlf"],
)
def test_line_splitter_each_line_ending(line_ending, data):
    splitter = make_splitter(line_ending)

    lines = splitter.feed(data, 0.0)

    assert texts(lines) == ["one", "two"]
    assert splitter.counters.lines == 2
    assert splitter.counters.empty_lines == 0


def test_line_splitter_keeps_unfinished_line():
    splitter = make_splitter()

    assert splitter.feed(b"one\ntw", 0.0) == [Line(text="one", data=b"one")]
    assert texts(splitter.feed(b"o\n", 0.0)) == ["two"]


MULTI_LINE_CRLF = b"alpha\r\nbeta\r\n\r\ngamma line\r\n\xce\xbb\r\n"
"""CRLF-terminated input with one empty line and one two-byte UTF-8 character."""

MULTI_LINE_TEXTS = ["alpha", "beta", "gamma line", "\u03bb"]


@pytest.mark.parametrize("line_ending", [LineEnding.AUTO, LineEnding.CRLF])
def test_split_crlf_every_boundary(line_ending):
    for cut in range(1, len(MULTI_LINE_CRLF)):
        splitter = make_splitter(line_ending)

        lines = feed_chunks(splitter, split_at(MULTI_LINE_CRLF, [cut]))

        assert texts(lines) == MULTI_LINE_TEXTS, f"split at byte {cut}"
        assert splitter.counters.empty_lines == 1, f"split at byte {cut}"
        assert splitter.counters.decode_errors == 0, f"split at byte {cut}"


@pytest.mark.parametrize("line_ending", [LineEnding.AUTO, LineEnding.CRLF])
def test_split_crlf_random_chunks(line_ending):
    rng = random.Random(7)
    data = MULTI_LINE_CRLF * 3
    expected = MULTI_LINE_TEXTS * 3

    for trial in range(500):
        cut_count = rng.randint(1, len(data) - 1)
        cuts = sorted(rng.sample(range(1, len(data)), cut_count))
        splitter = make_splitter(line_ending)

        lines = feed_chunks(splitter, split_at(data, cuts))

        assert texts(lines) == expected, f"trial {trial}, cuts {cuts}"
        assert splitter.counters.empty_lines == 3, f"trial {trial}, cuts {cuts}"


def test_split_crlf_one_byte_per_feed():
    splitter = make_splitter()
    data = MULTI_LINE_CRLF

    lines = feed_chunks(splitter, [data[i : i + 1] for i in range(len(data))])

    assert texts(lines) == MULTI_LINE_TEXTS
    assert splitter.counters.empty_lines == 1


def test_auto_mode_cr_then_crlf_is_empty_line():
    splitter = make_splitter()

    lines = feed_chunks(splitter, [b"one\r", b"\r\ntwo\n"])

    assert texts(lines) == ["one", "two"]
    assert splitter.counters.empty_lines == 1


def test_lf_mode_strips_cr_before_lf():
    splitter = make_splitter(LineEnding.LF)

    lines = splitter.feed(b"one\r\ntwo\n", 0.0)

    assert texts(lines) == ["one", "two"]


def test_lf_mode_keeps_inner_cr():
    splitter = make_splitter(LineEnding.LF)

    lines = splitter.feed(b"one\rtwo\n", 0.0)

    assert texts(lines) == ["one\rtwo"]


def test_crlf_mode_keeps_lone_lf():
    splitter = make_splitter(LineEnding.CRLF)

    lines = splitter.feed(b"one\ntwo\r\nthree\r\n", 0.0)

    assert texts(lines) == ["one\ntwo", "three"]
    assert splitter.counters.lines == 2


def test_invalid_utf8_becomes_replacement_character():
    splitter = make_splitter()

    lines = splitter.feed(b"bad \xff\xfe byte\ngood\n", 0.0)

    assert texts(lines) == ["bad \ufffd\ufffd byte", "good"]
    assert lines[0].data == b"bad \xff\xfe byte"
    # Two invalid bytes on one line count as one decode error.
    assert splitter.counters.decode_errors == 1


def test_invalid_utf8_counted_per_line():
    splitter = make_splitter()

    splitter.feed(b"\xc3\n\xff\xff\xff\n\xe2\x82\n", 0.0)

    assert splitter.counters.decode_errors == 3
    assert splitter.counters.lines == 3


def test_literal_replacement_character_not_decode_error():
    splitter = make_splitter()

    lines = splitter.feed("keep \ufffd as sent\n".encode(), 0.0)

    assert texts(lines) == ["keep \ufffd as sent"]
    assert splitter.counters.decode_errors == 0


def test_nul_bytes_removed_and_counted():
    splitter = make_splitter()

    lines = splitter.feed(b"\x00a\x00b\x00\n", 0.0)

    assert texts(lines) == ["ab"]
    assert lines[0].data == b"ab"
    assert splitter.counters.nul_bytes == 3


def test_nul_only_line_counts_as_empty():
    splitter = make_splitter()

    lines = splitter.feed(b"\x00\x00\nnext\n", 0.0)

    assert texts(lines) == ["next"]
    assert splitter.counters.nul_bytes == 2
    assert splitter.counters.empty_lines == 1


def test_empty_lines_skipped_and_counted():
    splitter = make_splitter()

    lines = splitter.feed(b"\n\r\n\rone\n\n", 0.0)

    assert texts(lines) == ["one"]
    assert splitter.counters.empty_lines == 4
    assert splitter.counters.lines == 1


def test_long_line_truncated_once():
    max_line_bytes = 4096
    line_size = 1_000_000
    splitter = make_splitter(max_line_bytes=max_line_bytes)
    long_line = b"x" * line_size
    read_size = 4096

    lines = feed_chunks(
        splitter,
        [long_line[i : i + read_size] for i in range(0, line_size, read_size)],
    )
    lines += splitter.feed(b"\nnext line\n", 0.0)

    assert len(lines) == 2
    assert lines[0].data == b"x" * max_line_bytes
    assert lines[0].truncated
    assert lines[1] == Line(text="next line", data=b"next line")
    assert splitter.counters.truncated_lines == 1
    assert splitter.counters.dropped_bytes == line_size - max_line_bytes
    assert splitter.counters.lines == 2


def test_long_line_discard_ignores_deadline():
    splitter = make_splitter(max_line_bytes=4, line_timeout=5.0)

    splitter.feed(b"abcdefgh", 0.0)

    # The truncated head is already delivered. The bytes after it up to the next
    # line ending are discarded, so the deadline has no line to deliver.
    assert splitter.poll(100.0) == []
    assert splitter.counters.line_timeouts == 0


@pytest.mark.parametrize(
    ("line_ending", "chunks"),
    [
        (LineEnding.AUTO, [b"12345678\nnext\n"]),
        (LineEnding.AUTO, [b"12345678\rnext\r"]),
        (LineEnding.AUTO, [b"12345678\r\nnext\r\n"]),
        (LineEnding.AUTO, [b"12345678", b"\nnext\n"]),
        (LineEnding.AUTO, [b"12345678\r", b"\nnext\n"]),
        (LineEnding.LF, [b"12345678\nnext\n"]),
        (LineEnding.CR, [b"12345678\rnext\r"]),
        (LineEnding.CRLF, [b"12345678\r\nnext\r\n"]),
    ],
    ids=[
        "auto-lf",
        "auto-cr",
        "auto-crlf",
        "auto-split-lf",
        "auto-split-crlf",
        "lf",
        "cr",
        "crlf",
    ],
)
def test_line_of_max_bytes_not_truncated(line_ending, chunks):
    splitter = make_splitter(line_ending, max_line_bytes=8)

    lines = feed_chunks(splitter, chunks)

    assert lines == [
        Line(text="12345678", data=b"12345678"),
        Line(text="next", data=b"next"),
    ]
    assert splitter.counters.truncated_lines == 0
    assert splitter.counters.dropped_bytes == 0


def test_lf_mode_max_line_with_crlf():
    splitter = make_splitter(LineEnding.LF, max_line_bytes=8)

    lines = splitter.feed(b"12345678\r\n", 0.0)

    assert lines == [Line(text="12345678", data=b"12345678")]


def test_crlf_mode_split_after_truncation():
    splitter = make_splitter(LineEnding.CRLF, max_line_bytes=4)

    lines = feed_chunks(splitter, [b"abcdefgh\r", b"\nnext\r\n"])

    assert texts(lines) == ["abcd", "next"]


def test_crlf_mode_split_after_max_line():
    splitter = make_splitter(LineEnding.CRLF, max_line_bytes=8)

    lines = feed_chunks(splitter, [b"12345678\r", b"\nnext\r\n"])

    assert texts(lines) == ["12345678", "next"]
    assert splitter.counters.truncated_lines == 0


def test_poll_before_deadline_returns_nothing():
    splitter = make_splitter(line_timeout=5.0)

    for second in range(5):
        assert splitter.feed(b"x", float(second)) == []

    assert splitter.poll(4.999) == []
    assert splitter.counters.line_timeouts == 0


def test_poll_without_partial_line_returns_nothing():
    splitter = make_splitter(line_timeout=5.0)

    splitter.feed(b"done\n", 0.0)

    assert splitter.poll(100.0) == []
    assert splitter.counters.line_timeouts == 0


def test_trickle_delivered_after_deadline():
    splitter = make_splitter(line_timeout=5.0)
    lines: list[Line] = []

    # One byte per second never ends a line. The deadline runs from a line's
    # first byte, so the gap between bytes (1 s) does not hold it back.
    for second, byte in enumerate(b"abcdefghij"):
        now = float(second)
        lines += splitter.feed(bytes([byte]), now)
        lines += splitter.poll(now)
    lines += splitter.poll(11.0)

    assert lines == [
        Line(text="abcdef", data=b"abcdef", timed_out=True),
        Line(text="ghij", data=b"ghij", timed_out=True),
    ]
    assert splitter.counters.line_timeouts == 2
    assert splitter.counters.lines == 2


def test_crlf_mode_deadline_between_cr_lf():
    splitter = make_splitter(LineEnding.CRLF, line_timeout=5.0)

    splitter.feed(b"ab\r", 0.0)
    splitter.poll(5.0)
    lines = splitter.feed(b"\ncd\r\n", 6.0)

    assert texts(lines) == ["cd"]
