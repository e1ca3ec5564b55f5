"""A record's trace from the local span store, as a tree for a terminal."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.store import DB_NAME, Store
from appliance.telemetry import trace_id_for
from appliance.telemetry_spool import SPOOL_NAME, SpanRow, TelemetrySpool

SUMMARY_KEYS = (
    ("field_relay.record.state", "state"),
    ("field_relay.step.attempt", "attempt"),
    ("gen_ai.usage.input_tokens", "input tokens"),
    ("gen_ai.usage.output_tokens", "output tokens"),
    ("gen_ai.response.finish_reasons", "finish"),
    ("field_relay.answer_cache.hit", "cache hit"),
    ("field_relay.cost.cpu_s", "cpu s"),
    ("field_relay.cost.amount", "cost"),
    ("field_relay.drift.sample", "drift sample"),
)
"""Attributes shown on a span's line, with their labels."""


class TraceNotFoundError(ApplianceError):
    """No record or trace matches the id given to ``appliance trace``."""


def resolve_trace_id(data_dir: Path, text: str) -> str:
    """Return the trace id (32 hex digits) for a record id, id prefix or trace id.

    Raises:
        TraceNotFoundError: the text matches no record, or several.
    """
    cleaned = text.strip().lower()
    if len(cleaned) == 32 and all(c in "0123456789abcdef" for c in cleaned):
        return cleaned
    try:
        return f"{uuid.UUID(cleaned).int:032x}"
    except ValueError:
        pass
    path = data_dir / DB_NAME
    if not path.exists():
        raise TraceNotFoundError(
            f"no database in {str(data_dir)!r} to look up record {text!r}; pass "
            "the whole record id or check --data-dir"
        )
    store = Store(path, readonly=True)
    try:
        matches = store.query(
            "SELECT id FROM records WHERE substr(id, 1, ?) = ? LIMIT 2",
            (len(cleaned), cleaned),
        )
    finally:
        store.close()
    if len(matches) != 1:
        found = "several records" if matches else "no record"
        raise TraceNotFoundError(
            f"{found} with an id starting {text!r} in {str(data_dir)!r}; give more "
            "of the id (`appliance records` lists them)"
        )
    return f"{trace_id_for(matches[0]['id']):032x}"


def load_trace(data_dir: Path, trace_id: str) -> list[SpanRow]:
    """Return the locally kept spans of ``trace_id``.

    Raises:
        TraceNotFoundError: no span of that trace is kept in the data directory.
    """
    path = data_dir / SPOOL_NAME
    spans: list[SpanRow] = []
    if path.exists():
        spool = TelemetrySpool(path, readonly=True)
        try:
            spans = spool.trace(trace_id)
        finally:
            spool.close()
    if not spans:
        raise TraceNotFoundError(
            f"no spans of trace {trace_id} in {str(data_dir)!r}: the record was "
            "not processed by `appliance run` here, or its spans passed "
            "[telemetry] trace_retention_s or local_spans"
        )
    return spans


def format_trace(spans: list[SpanRow], attributes: bool = False) -> str:
    """Render spans as an indented tree with start offsets and durations.

    A span whose parent is not kept (a record not final yet has no root span)
    is shown at the top level. With ``attributes``, every attribute of every
    span follows its line.
    """
    ids = {span.span_id for span in spans}
    children: dict[str | None, list[SpanRow]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids else None
        children.setdefault(parent, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, s.span_id))
    origin = min(span.start_ns for span in spans)
    end = max(span.end_ns for span in spans)
    started = datetime.datetime.fromtimestamp(origin / 1e9).isoformat(
        sep=" ", timespec="milliseconds"
    )
    lines = [
        f"trace {spans[0].trace_id}: {len(spans)} spans over "
        f"{(end - origin) / 1e9:.3f} s, from {started}",
        f"{'start s':>9} {'duration s':>10}  span",
    ]

    def walk(span: SpanRow, prefix: str, last: bool, top: bool) -> None:
        if top:
            branch, indent = "", ""
        elif last:
            branch, indent = "└─ ", "   "
        else:
            branch, indent = "├─ ", "│  "
        lines.append(
            f"{(span.start_ns - origin) / 1e9:>+9.3f} "
            f"{(span.end_ns - span.start_ns) / 1e9:>10.3f}  "
            f"{prefix}{branch}{span.name}{_summary(span)}"
        )
        inner = prefix + indent
        if attributes:
            for key, value in sorted(span.attributes.items()):
                lines.append(f"{'':>21}  {inner}   {key} = {_show(value)}")
        kids = children.get(span.span_id, [])
        for index, child in enumerate(kids):
            walk(child, inner, index == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)


def _summary(span: SpanRow) -> str:
    parts = []
    for key, label in SUMMARY_KEYS:
        if span.attributes.get(key) not in (None, False):
            parts.append(f"{label} {_show(span.attributes[key])}")
    if not span.status.startswith("UNSET") and not span.status.startswith("OK"):
        parts.append(span.status)
    return f"  [{', '.join(parts)}]" if parts else ""


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 2000 else text[:2000] + "…"
