"""Newline-delimited text framing for legacy devices that print lines.

Rules, applied in this order to the byte stream of one link:

- Line endings: ``auto`` ends a line at LF, CR or CRLF. A CRLF counts as one
  ending even when the CR and the LF arrive in different reads. ``lf``, ``cr``
  and ``crlf`` accept only that ending (``lf`` also strips one CR before LF).
- Maximum length: once a line reaches ``max_line_bytes``, those bytes are
  delivered at once as a truncated line; the rest up to the next line ending is
  discarded and counted in ``dropped_bytes``.
- Deadline: a partial line older than ``line_timeout`` seconds (measured from
  its first byte, not between bytes) is delivered as it is and counted in
  ``line_timeouts``, so a device that trickles bytes without a line ending
  cannot hold data back forever.
- NUL bytes are removed and counted; empty lines are skipped and counted.
- Text is decoded as UTF-8; invalid sequences become U+FFFD and the line is
  counted in ``decode_errors``.
"""

from __future__ import annotations

import dataclasses
import enum

from firmware_bridge.counters import LinkCounters


class LineEnding(enum.StrEnum):
    """Byte sequences that end a line."""

    AUTO = "auto"
    LF = "lf"
    CR = "cr"
    CRLF = "crlf"


@dataclasses.dataclass(frozen=True)
class Line:
    """One delivered line without its line ending."""

    text: str
    """The line decoded as UTF-8 with replacement characters."""
    data: bytes
    """The line's bytes after NUL removal."""
    truncated: bool = False
    """True when the line hit the maximum length and its tail was discarded."""
    timed_out: bool = False
    """True when the line was delivered by the deadline, not a line ending."""


class LineSplitter:
    """Turn a stream of byte chunks into lines; see the module docstring for rules.

    Args:
        counters: the link's counters, updated in place.
        line_ending: which endings to accept.
        max_line_bytes: maximum bytes kept per line; must be positive.
        line_timeout: seconds a partial line may wait for its ending.
    """

    def __init__(
        self,
        counters: LinkCounters,
        line_ending: LineEnding = LineEnding.AUTO,
        max_line_bytes: int = 4096,
        line_timeout: float = 10.0,
    ) -> None:
        if max_line_bytes <= 0:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes!r}")
        self.counters = counters
        self.line_ending = LineEnding(line_ending)
        self.max_line_bytes = max_line_bytes
        self.line_timeout = line_timeout
        self._pending = bytearray()
        self._pending_since: float | None = None
        self._discarding = False
        self._skip_lf = False
        self._held_cr = False

    def feed(self, data: bytes, now: float) -> list[Line]:
        """Consume ``data`` read at monotonic time ``now`` and return finished lines."""
        lines: list[Line] = []
        i = 0
        if self._skip_lf and data:
            # The previous read ended in a CR that ended a line; an LF now
            # completes that CRLF.
            if data[0] == 0x0A:
                i = 1
            self._skip_lf = False
        if self._held_cr and data:
            self._held_cr = False
            if data[0] == 0x0A:
                self._finish_at_ending(lines)
                i = 1
            else:
                self._append(b"\r", now, lines)
        while i < len(data):
            end, width = self._find_ending(data, i)
            if end < 0:
                self._append_tail(data[i:], now, lines)
                break
            self._append(data[i:end], now, lines)
            self._finish_at_ending(lines)
            if width == 0:
                # A CR at the end of this read: an LF may follow in the next one.
                self._skip_lf = True
                i = end + 1
            else:
                i = end + width
        return lines

    def poll(self, now: float) -> list[Line]:
        """Deliver the partial line if its deadline has passed."""
        if self._pending_since is None or now - self._pending_since < self.line_timeout:
            return []
        if self._held_cr:
            # The deadline fell between a CR and its LF: end the line at the CR
            # and let a following LF complete that ending.
            self._held_cr = False
            self._skip_lf = True
        self.counters.line_timeouts += 1
        line = self._emit(timed_out=True)
        return [line] if line is not None else []

    def _append_tail(self, chunk: bytes, now: float, lines: list[Line]) -> None:
        """Append the end of a read, holding back a final CR in ``lf``/``crlf`` mode.

        That CR may be the first half of a CRLF split across reads. Holding it
        outside the line keeps it from counting against ``max_line_bytes`` or
        being discarded with a long line's tail.
        """
        holds = self.line_ending in (LineEnding.LF, LineEnding.CRLF)
        if holds and chunk.endswith(b"\r"):
            self._append(chunk[:-1], now, lines)
            self._held_cr = True
            if self._pending_since is None and not self._discarding:
                self._pending_since = now
            return
        self._append(chunk, now, lines)

    def _find_ending(self, data: bytes, start: int) -> tuple[int, int]:
        """Return (index, width) of the next line ending, or (-1, 0).

        A width of 0 marks a CR in ``auto`` mode that is the last byte of ``data``.
        """
        mode = self.line_ending
        if mode is LineEnding.LF:
            j = data.find(b"\n", start)
            if j > start and data[j - 1] == 0x0D:
                return j - 1, 2
            return (j, 1) if j >= 0 else (-1, 0)
        if mode is LineEnding.CR:
            j = data.find(b"\r", start)
            return (j, 1) if j >= 0 else (-1, 0)
        if mode is LineEnding.CRLF:
            j = data.find(b"\r\n", start)
            return (j, 2) if j >= 0 else (-1, 0)

        lf = data.find(b"\n", start)
        cr = data.find(b"\r", start, lf if lf >= 0 else len(data))
        if cr < 0:
            return (lf, 1) if lf >= 0 else (-1, 0)
        if cr + 1 == len(data):
            return cr, 0
        return (cr, 2) if data[cr + 1] == 0x0A else (cr, 1)

    def _append(self, chunk: bytes, now: float, lines: list[Line]) -> None:
        if not chunk:
            return
        if self._discarding:
            self.counters.dropped_bytes += len(chunk)
            return
        if self._pending_since is None:
            self._pending_since = now
        room = self.max_line_bytes - len(self._pending)
        self._pending += chunk[:room]
        if len(chunk) > room:
            self.counters.dropped_bytes += len(chunk) - room
            self.counters.truncated_lines += 1
            line = self._emit(truncated=True)
            if line is not None:
                lines.append(line)
            self._discarding = True

    def _finish_at_ending(self, lines: list[Line]) -> None:
        if self._discarding:
            self._discarding = False
            return
        line = self._emit()
        if line is not None:
            lines.append(line)

    def _emit(self, truncated: bool = False, timed_out: bool = False) -> Line | None:
        data = bytes(self._pending)
        self._pending.clear()
        self._pending_since = None
        nuls = data.count(0)
        if nuls:
            self.counters.nul_bytes += nuls
            data = data.replace(b"\x00", b"")
        if not data:
            self.counters.empty_lines += 1
            return None
        text = data.decode("utf-8", errors="replace")
        if "\ufffd" in text and text.encode("utf-8") != data:
            self.counters.decode_errors += 1
        self.counters.lines += 1
        return Line(text=text, data=data, truncated=truncated, timed_out=timed_out)
