"""Windowed numbers from the workflow history, shared by status and metrics.

Model latency and tokens/s, recent retries and the drift buckets (validity
rate, retry rate, output length over time) are computed from the newest
``HISTORY_EVENTS`` rows of the ``events`` table. Reading a bounded tail keeps
``appliance status`` fast on a database with months of history, so the
numbers describe recent work, not all time.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from appliance.states import RecordState
from appliance.store import Store

HISTORY_EVENTS = 10_000
"""Newest workflow events read for the windowed numbers."""
MODEL_CALLS = 200
"""Newest model calls (cache hits excluded) behind latency and tokens/s."""
DRIFT_BUCKET_S = 3600
"""Width of one drift bucket, in seconds."""
DRIFT_BUCKETS = 24
"""Newest drift buckets reported."""
RETRY_WINDOW_S = 3600
"""Seconds behind ``workflow.retries_last_hour``."""
SYNC_WINDOW_S = 300
"""Seconds behind ``sync.throughput_records_per_s``."""


def history_numbers(store: Store, now: float | None = None) -> dict[str, Any]:
    """Return the ``model``, ``workflow`` and ``drift`` sections of status."""
    now = time.time() if now is None else now
    rows = store.query(
        "SELECT at, step, from_state, to_state, attempt, duration, detail"
        " FROM events WHERE step IN ('infer', 'validate')"
        " ORDER BY id DESC LIMIT ?",
        (HISTORY_EVENTS,),
    )
    events = [_event(row) for row in rows]
    return {
        "model": model_numbers(events),
        "workflow": {
            "retries_last_hour": sum(
                1
                for event in events
                if event["at"] >= now - RETRY_WINDOW_S and _is_retry(event)
            ),
        },
        "drift": drift_buckets(events),
    }


def sync_throughput(store: Store, now: float | None = None) -> float:
    """Return records uploaded per second over the last ``SYNC_WINDOW_S``."""
    now = time.time() if now is None else now
    uploaded = store.query(
        "SELECT COUNT(*) AS n FROM records WHERE state = ? AND uploaded_at >= ?",
        (str(RecordState.UPLOADED), now - SYNC_WINDOW_S),
    )[0]["n"]
    return round(uploaded / SYNC_WINDOW_S, 3)


def model_numbers(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return latency and throughput of the newest model calls.

    Cache hits are left out: they take no model time. ``latency_s`` is the
    mean seconds in llama.cpp per call, ``tokens_per_s`` the output tokens
    over that time.
    """
    calls = [
        event
        for event in events
        if event["step"] == "infer"
        and event["detail"]
        and not event["detail"].get("cached")
        and event["duration"]
    ][:MODEL_CALLS]
    seconds = sum(event["duration"] for event in calls)
    tokens = sum(int(event["detail"].get("completion_tokens") or 0) for event in calls)
    latencies = sorted(event["duration"] for event in calls)
    return {
        "calls": len(calls),
        "latency_s": round(seconds / len(calls), 3) if calls else None,
        "latency_p90_s": round(_percentile(latencies, 0.9), 3) if calls else None,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
    }


def drift_buckets(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group model calls and validations into ``DRIFT_BUCKET_S`` buckets.

    Per bucket: ``validity_rate`` is valid outputs over validations,
    ``retry_rate`` the share of model calls that were a second or later
    attempt, and ``output_tokens`` the distribution of output lengths.
    """
    buckets: dict[int, dict[str, Any]] = {}
    for event in events:
        start = int(event["at"] // DRIFT_BUCKET_S * DRIFT_BUCKET_S)
        bucket = buckets.setdefault(
            start, {"calls": 0, "retries": 0, "valid": 0, "checked": 0, "lengths": []}
        )
        if event["step"] == "infer" and event["to_state"] == RecordState.INFERRED:
            bucket["calls"] += 1
            bucket["retries"] += event["attempt"] > 1
            tokens = (event["detail"] or {}).get("completion_tokens")
            if tokens is not None:
                bucket["lengths"].append(int(tokens))
        elif event["step"] == "validate":
            bucket["checked"] += 1
            bucket["valid"] += event["to_state"] == RecordState.VALIDATED
    rows = []
    for start in sorted(buckets)[-DRIFT_BUCKETS:]:
        bucket = buckets[start]
        lengths = sorted(bucket["lengths"])
        rows.append(
            {
                "start": start,
                "model_calls": bucket["calls"],
                "validity_rate": _ratio(bucket["valid"], bucket["checked"]),
                "retry_rate": _ratio(bucket["retries"], bucket["calls"]),
                "output_tokens": {
                    "p10": _percentile(lengths, 0.1) if lengths else None,
                    "p50": _percentile(lengths, 0.5) if lengths else None,
                    "p90": _percentile(lengths, 0.9) if lengths else None,
                    "max": lengths[-1] if lengths else None,
                },
            }
        )
    return {"bucket_s": DRIFT_BUCKET_S, "buckets": rows}


def _event(row: sqlite3.Row) -> dict[str, Any]:
    try:
        detail = json.loads(row["detail"]) if row["detail"] else None
    except ValueError:
        detail = None
    return {
        "at": row["at"],
        "step": row["step"],
        "from_state": row["from_state"],
        "to_state": row["to_state"],
        "attempt": row["attempt"] or 0,
        "duration": row["duration"] or 0.0,
        "detail": detail if isinstance(detail, dict) else None,
    }


def _is_retry(event: dict[str, Any]) -> bool:
    """True for a failed attempt that sent the record back for another one."""
    return event["from_state"] is not None and event["to_state"] == RecordState.RECEIVED


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


def _percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    rank = max(math.ceil(share * len(values)), 1)
    return values[rank - 1]
