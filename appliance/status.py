"""The numbers behind `appliance status`, read from the database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import diskcache

from appliance.control import daemon_running
from appliance.errors import StoreError
from appliance.review_status import (
    empty_review_summary,
    format_review,
    review_summary,
)
from appliance.states import RecordState
from appliance.store import DB_NAME, Store
from appliance.telemetry_spool import SPOOL_NAME, TelemetrySpool
from appliance.telemetry_stats import history_numbers, sync_throughput


def collect_status(data_dir: Path) -> dict[str, Any]:
    """Return record counts per state, per-link counters and outbox depth.

    A data directory without a database reports zero records.
    """
    path = data_dir / DB_NAME
    if not path.exists():
        return {
            "data_dir": str(data_dir),
            "records": {str(s): 0 for s in RecordState},
            "links": {},
            "outbox": {"queued": 0, "bytes": 0, "oldest_queued_age_s": None},
            "batches": {"delivered": 0, "open": 0},
            "review": empty_review_summary(),
            "telemetry": telemetry_stats(data_dir),
        }
    store = Store(path, readonly=True)
    try:
        counts = store.state_counts()
        sync = store.sync_state()
        outbox = store.query(
            "SELECT MIN(received_at) AS t, SUM(LENGTH(raw) + IFNULL(LENGTH(data), 0))"
            " AS bytes FROM records WHERE state = ?",
            (str(RecordState.QUEUED),),
        )[0]
        oldest = outbox["t"]
        batches = store.query(
            "SELECT SUM(delivered_at IS NOT NULL) AS delivered,"
            " SUM(delivered_at IS NULL) AS open FROM batches"
        )[0]
        result: dict[str, Any] = {
            "data_dir": str(data_dir),
            "records": counts,
            "links": _links(store),
            "outbox": {
                "queued": counts[RecordState.QUEUED],
                "bytes": int(outbox["bytes"] or 0),
                "full": bool(int(sync.get("outbox_full") or 0)),
                "used_bytes": _int(sync.get("outbox_used_bytes")),
                "quota_bytes": _int(sync.get("outbox_quota_bytes")),
                "oldest_queued_age_s": round(time.time() - oldest, 1)
                if oldest
                else None,
            },
            "batches": {
                "delivered": int(batches["delivered"] or 0),
                "open": int(batches["open"] or 0),
            },
            "answer_cache": answer_cache_stats(data_dir),
            "sync": {k: v for k, v in sync.items() if not k.startswith("outbox_")},
            "review": review_summary(store),
            "telemetry": telemetry_stats(data_dir),
        }
        result["sync"]["throughput_records_per_s"] = sync_throughput(store)
        result |= history_numbers(store)
        result["workflow"]["dead_letters"] = counts[RecordState.DEAD]
        _mark_stopped(result, data_dir)
        return result
    finally:
        store.close()


def _int(value: Any) -> int | None:
    return None if value is None else int(float(value))


def _links(store: Store) -> dict[str, dict[str, Any]]:
    """Each link's counters with its last saved state, transport and last error."""
    links: dict[str, dict[str, Any]] = {
        name: dict(counts) for name, counts in store.all_link_counters().items()
    }
    try:
        states = store.all_link_status()
    except StoreError:
        states = {}  # a database from before link states were saved
    for name, state in states.items():
        links.setdefault(name, {}).update(state)
    return links


def _mark_stopped(status: dict[str, Any], data_dir: Path) -> None:
    """Without a running daemon, a link's last saved state is history."""
    running = daemon_running(data_dir)
    status["daemon"] = {"running": running}
    if not running:
        for link in status["links"].values():
            if link.get("state") and link["state"] != "closed":
                link["state"] = f"stopped (last seen {link['state']})"


def answer_cache_stats(data_dir: Path) -> dict[str, int]:
    """Return the answer cache's hits, misses and size in bytes (zeros if absent)."""
    path = data_dir / "answer-cache"
    if not (path / "cache.db").exists():
        return {"hits": 0, "misses": 0, "bytes": 0}
    with diskcache.Cache(str(path)) as cache:
        hits, misses = cache.stats()
        return {"hits": hits, "misses": misses, "bytes": cache.volume()}


def telemetry_stats(data_dir: Path) -> dict[str, Any]:
    """Return the telemetry spool's contents and counters (zeros if absent).

    ``spooled``, ``exported`` and ``dropped`` count spans; ``metric_batches``
    counts metric collections the same way. ``last_error`` is the last failed
    export, kept after later successes; compare ``last_error_at`` with
    ``last_export_at``.
    """
    path = data_dir / SPOOL_NAME
    if not path.exists():
        return {
            "endpoint": None,
            "spooled": 0,
            "spooled_bytes": 0,
            "exported": 0,
            "dropped": 0,
            "rejected": 0,
            "metric_batches": {"spooled": 0, "exported": 0, "dropped": 0},
            "local_spans": 0,
            "last_error": None,
            "last_error_at": None,
            "last_export_at": None,
        }
    spool = TelemetrySpool(path, readonly=True)
    try:
        stats = spool.stats()
    finally:
        spool.close()
    return {
        "endpoint": stats["endpoint"],
        "spooled": stats["traces_in_spool"],
        "spooled_bytes": stats["traces_spool_bytes"] + stats["metrics_spool_bytes"],
        "exported": stats["traces_exported"],
        "dropped": stats["traces_dropped"],
        "rejected": stats["traces_rejected"],
        "metric_batches": {
            "spooled": stats["metrics_in_spool"],
            "exported": stats["metrics_exported"],
            "dropped": stats["metrics_dropped"],
        },
        "local_spans": stats["local_spans"],
        "last_error": stats["last_error"],
        "last_error_at": stats["last_error_at"],
        "last_export_at": stats["last_export_at"],
    }


def format_status(status: dict[str, Any]) -> str:
    """Render ``collect_status`` output as aligned text for a terminal."""
    lines = [f"data directory  {status['data_dir']}", "records"]
    for state, count in status["records"].items():
        lines.append(f"  {state:<10} {count:>8}")
    outbox = status["outbox"]
    age = outbox["oldest_queued_age_s"]
    lines.append(
        f"outbox          {outbox['queued']} queued"
        + (f", oldest {age:.0f} s" if age is not None else "")
        + (" — FULL: intake paused" if outbox.get("full") else "")
    )
    sync = status.get("sync")
    if sync:
        last = sync["last_success_at"]
        lines.append(
            f"sync            {sync['batches']} batches, last success "
            + (f"{time.time() - last:.0f} s ago" if last else "never")
            + f", {sync['retries']} retries, {sync['rate_limit_wait_s']} s rate-limited,"
            f" {sync['duplicates']} duplicates, {sync['rejected']} rejected"
        )
        if sync["last_error"]:
            lines.append(f"  last error: {sync['last_error']}")
    lines += _format_model(status)
    lines += format_review(status.get("review"))
    cache = status.get("answer_cache")
    if cache:
        lines.append(
            f"answer cache    {cache['hits']} hits, {cache['misses']} misses, "
            f"{cache['bytes'] / 2**20:.1f} MiB"
        )
    for name, counters in status["links"].items():
        state = counters.get("state")
        lines.append(
            f"link {name}"
            + (
                f"  {counters.get('transport')}/{counters.get('protocol')} {state}"
                if state
                else ""
            )
        )
        if counters.get("last_error"):
            lines.append(f"  last error: {counters['last_error']}")
        skip = {"state", "transport", "protocol", "last_error", "updated_at"}
        shown = {k: v for k, v in counters.items() if v and k not in skip}
        for key, value in shown.items():
            lines.append(f"  {key:<22} {value:>10}")
        if not shown:
            lines.append("  no traffic")
    lines += _format_telemetry(status.get("telemetry"))
    return "\n".join(lines)


def _format_model(status: dict[str, Any]) -> list[str]:
    lines = []
    model = status.get("model")
    if model and model["calls"]:
        lines.append(
            f"model           {model['tokens_per_s']} tok/s, {model['latency_s']} s "
            f"mean latency (p90 {model['latency_p90_s']} s) over the last "
            f"{model['calls']} calls"
        )
    workflow = status.get("workflow")
    if workflow:
        lines.append(
            f"workflow        {workflow['retries_last_hour']} retries in the last "
            f"hour, {workflow['dead_letters']} dead letters"
        )
    buckets = (status.get("drift") or {}).get("buckets") or []
    for bucket in buckets[-3:]:
        tokens = bucket["output_tokens"]
        start = time.strftime("%Y-%m-%d %H:%M", time.localtime(bucket["start"]))
        lines.append(
            f"drift {start}  validity {_rate(bucket['validity_rate'])}, retries "
            f"{_rate(bucket['retry_rate'])}, output tokens p50 {tokens['p50']} "
            f"p90 {tokens['p90']} max {tokens['max']} ({bucket['model_calls']} calls)"
        )
    return lines


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _format_telemetry(telemetry: dict[str, Any] | None) -> list[str]:
    if not telemetry:
        return []
    where = telemetry["endpoint"] or "local only (no OTLP endpoint)"
    lines = [
        f"telemetry       {where}: {telemetry['exported']} spans exported, "
        f"{telemetry['spooled']} spooled ({telemetry['spooled_bytes']} bytes), "
        f"{telemetry['dropped']} dropped, {telemetry['local_spans']} kept locally"
    ]
    if telemetry["last_error"]:
        lines.append(f"  last error: {telemetry['last_error']}")
    return lines
