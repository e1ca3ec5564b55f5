"""Per-link counters that `appliance status` reports and the store persists."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class LinkCounters:
    """Cumulative counts for one link.

    Each field is written by one thread only (the reader or the line consumer),
    so plain integer updates are safe under the GIL.
    """

    bytes: int = 0
    """Bytes read from the port."""
    lines: int = 0
    """Non-empty lines delivered as records."""
    empty_lines: int = 0
    """Lines, or framed messages, with no content but whitespace; skipped."""
    nul_bytes: int = 0
    """NUL (0x00) bytes removed from lines."""
    decode_errors: int = 0
    """Lines that held invalid UTF-8; decoded with U+FFFD replacement characters."""
    truncated_lines: int = 0
    """Lines longer than the maximum line length; their head became a record."""
    dropped_bytes: int = 0
    """Bytes discarded past the maximum line length."""
    line_timeouts: int = 0
    """Partial lines delivered because no line ending arrived before the deadline."""
    overflows: int = 0
    """Writes that found the ring buffer full."""
    overflow_dropped_bytes: int = 0
    """Bytes the ring buffer discarded under the drop_oldest policy."""
    lines_after_limit: int = 0
    """Lines read after ``--max-records`` was reached; not stored."""
    read_errors: int = 0
    """Failed reads from the port."""
    reconnects: int = 0
    """Times the port was reopened after a failure."""

    write_errors: int = 0
    """Failed writes to the port (acknowledgements are resent on demand)."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def add(self, other: dict[str, int]) -> None:
        """Add counts loaded from an earlier run, ignoring unknown names."""
        add_counts(self, other)


def add_counts(counts: object, other: dict[str, int]) -> None:
    """Add ``other``'s values to the same-named integer fields of a dataclass."""
    for field in dataclasses.fields(counts):  # type: ignore[arg-type]
        setattr(
            counts,
            field.name,
            getattr(counts, field.name) + int(other.get(field.name, 0)),
        )
