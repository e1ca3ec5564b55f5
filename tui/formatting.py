"""Text formats and theme colours shared by the TUI screens."""

from __future__ import annotations

import time
from collections.abc import Mapping

from rich.text import Text

SEVERITIES = ("critical", "error", "warning", "info", "debug")
"""Values of ``severity`` in log_event records, most urgent first."""


def format_age(seconds: float | None) -> str:
    """Return a duration as ``12 s``, ``4 min``, ``3 h 5 min`` or ``2 d 3 h``."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_clock(epoch: float | None) -> str:
    """Return a local time of day, ``HH:MM:SS``."""
    if epoch is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def format_when(epoch: float | None, now: float) -> str:
    """Return a local time with its age, ``14:02:11 (3 min ago)``, or ``never``."""
    if epoch is None:
        return "never"
    return f"{format_clock(epoch)} ({format_age(now - epoch)} ago)"


def format_rate(per_second: float, unit: str = "") -> str:
    """Return a rate such as ``0.8/s``, ``12 B/s`` or ``1.2 kB/s``."""
    prefix = " " if unit else ""
    if per_second >= 1000:
        return f"{per_second / 1000:.1f} k{unit}/s"
    if per_second >= 10:
        return f"{per_second:.0f}{prefix}{unit}/s"
    return f"{per_second:.1f}{prefix}{unit}/s"


def short_id(record_id: str) -> str:
    """Return the 8-character id prefix that the CLI prints and accepts."""
    return record_id[:8]


def severity_text(severity: str | None, colours: Mapping[str, str]) -> Text:
    """Return ``severity`` coloured with the theme's text colours.

    ``colours`` is ``App.get_css_variables()``. Its ``text-error`` and
    ``text-warning`` are the theme's colours for text on its background, so the
    feed reads well in the dark and the light theme alike.
    """
    if severity is None:
        return Text("-", style="dim")
    styles = {
        "critical": f"bold reverse {colours.get('text-error', 'red')}",
        "error": f"bold {colours.get('text-error', 'red')}",
        "warning": colours.get("text-warning", "yellow"),
        "debug": "dim",
    }
    return Text(severity, style=styles.get(severity, ""))


def state_text(state: str, colours: Mapping[str, str]) -> Text:
    """Return a record state coloured: dead as an error, uploaded as a success."""
    styles = {
        "dead": f"bold {colours.get('text-error', 'red')}",
        "uploaded": colours.get("text-success", "green"),
    }
    return Text(state, style=styles.get(state, ""))


def short_link(name: str, width: int = 12) -> str:
    """Return a link name cut to ``width`` from the left, since names such as
    ``replay:/path/to/file.log`` differ at their end."""
    if len(name) <= width:
        return name
    return "…" + name[-(width - 1) :]
