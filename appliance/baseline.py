"""Keyword baseline: triage a raw log line with a few fixed rules and no model.

``appliance eval`` scores it on the same lines as the model, so the model's
figures can be read against what plain string matching achieves. The rules read
only the raw line that a device prints; ground-truth columns never reach them.
"""

from __future__ import annotations

import dataclasses
import re

from appliance.log_event import EventType, Severity

LEVEL_SEVERITY: dict[str, Severity] = {
    "FATAL": Severity.CRITICAL,
    "SEVERE": Severity.CRITICAL,
    "ERROR": Severity.ERROR,
    "WARNING": Severity.WARNING,
    "WARN": Severity.WARNING,
    "INFO": Severity.INFO,
    "DEBUG": Severity.DEBUG,
}
"""Logged level, as an upper-case token of the line, and the severity it maps to."""

SEVERITY_WORDS: list[tuple[Severity, re.Pattern[str]]] = [
    (Severity.CRITICAL, re.compile(r"\b(fatal|panic|critical)\b", re.IGNORECASE)),
    (
        Severity.ERROR,
        re.compile(
            r"\b(errors?|fail(ed|ure|s)?|abort(ed)?|timed out|not[- ]responding"
            r"|unavailable|full)\b",
            re.IGNORECASE,
        ),
    ),
    (Severity.WARNING, re.compile(r"\b(warn(ing)?|exceeds)\b", re.IGNORECASE)),
]
"""Words that set the severity of a line without a logged level; first match wins."""

EVENT_TYPE_WORDS: list[tuple[EventType, re.Pattern[str]]] = [
    (
        EventType.MEMORY,
        re.compile(r"\b(tlb|cache|parity|ecc|ddr|memory|sram|dram)", re.IGNORECASE),
    ),
    (
        EventType.STORAGE,
        re.compile(
            r"\b(disk|storage|file ?system|mount|nfs|lustre|gpfs|fdmn|scsi)",
            re.IGNORECASE,
        ),
    ),
    (
        EventType.NETWORK,
        re.compile(
            r"\b(network|link|ethernet|niff|torus|tree|socket|connection|interconnect)",
            re.IGNORECASE,
        ),
    ),
    (
        EventType.HARDWARE,
        re.compile(
            r"\b(temp|fan|psu|power|voltage|node card|midplane|hardware|ambient)",
            re.IGNORECASE,
        ),
    ),
    (
        EventType.JOB,
        re.compile(r"\b(job|boot|command|halt|program)", re.IGNORECASE),
    ),
    (EventType.KERNEL, re.compile(r"\b(kernel|interrupt)", re.IGNORECASE)),
]
"""Word stems that set the event type; the first matching group wins, else ``other``."""

ACTION_SEVERITIES = frozenset({Severity.ERROR, Severity.CRITICAL})
"""Severities at which the baseline sets ``action_required``."""


@dataclasses.dataclass(frozen=True)
class BaselineTriage:
    """The baseline's triage of one line, with the fields ``log_event`` scores on."""

    severity: Severity
    event_type: EventType
    action_required: bool
    component: str | None
    """Token before the logged level, or None when the line has no level token."""


def classify_line(line: str) -> BaselineTriage:
    """Triage ``line`` with the keyword rules.

    A logged level token (``FATAL``, ``INFO`` and the others in
    ``LEVEL_SEVERITY``) decides the severity, and the token before it is taken
    as the component. Only a line without a level token falls back to
    ``SEVERITY_WORDS``. This order keeps ``INFO ... parity error corrected`` at
    info. A technician must act when the severity is error or critical.
    """
    tokens = line.split()
    severity: Severity | None = None
    component: str | None = None
    for index, token in enumerate(tokens):
        if token in LEVEL_SEVERITY:
            severity = LEVEL_SEVERITY[token]
            component = tokens[index - 1] if index > 0 else None
            break

    if severity is None:
        severity = _severity_from_words(line)

    return BaselineTriage(
        severity=severity,
        event_type=_event_type_from_words(line),
        action_required=severity in ACTION_SEVERITIES,
        component=component,
    )


def _severity_from_words(line: str) -> Severity:
    for severity, pattern in SEVERITY_WORDS:
        if pattern.search(line):
            return severity
    return Severity.INFO


def _event_type_from_words(line: str) -> EventType:
    for event_type, pattern in EVENT_TYPE_WORDS:
        if pattern.search(line):
            return event_type
    return EventType.OTHER
