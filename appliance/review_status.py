"""The review figures of ``appliance status``: queue, agreement, tokens, cost.

Everything is read from the review tables with a read-only store, so status
works while the daemon runs. The settings that the figures depend on (budget,
alert threshold, window) are those the reviewer stored when it last started.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.review import (
    ReviewState,
    day_start,
    has_review_tables,
    review_state,
    utc_day,
)
from appliance.store import Store

SUMMARY_DAYS = 7
"""Days of daily agreement rates that status lists, newest last."""


def review_summary(store: Store, now: float | None = None) -> dict[str, Any]:
    """Return the review figures of ``appliance status``: queue, agreement, cost.

    Works on a read-only store; a database without review tables reports
    review as disabled with zero counts.
    """
    now = store.clock() if now is None else now
    if not has_review_tables(store):
        return empty_review_summary()
    state = review_state(store)
    settings = json.loads(state.get("settings") or "{}")
    counts = {str(s): 0 for s in ReviewState}
    for row in store.query("SELECT state, COUNT(*) AS n FROM reviews GROUP BY state"):
        counts[row["state"]] = row["n"]
    agreement = _agreement(store, settings, now)
    today = store.query(
        "SELECT COUNT(*) AS requests, SUM(outcome = 'throttled') AS throttled,"
        " SUM(prompt_tokens) AS prompt, SUM(completion_tokens) AS completion,"
        " SUM(cost) AS cost FROM review_requests WHERE at >= ?",
        (day_start(now),),
    )[0]
    totals = store.query(
        "SELECT SUM(prompt_tokens) AS prompt, SUM(completion_tokens) AS completion,"
        " SUM(cost) AS cost FROM reviews"
    )[0]
    spent = float(today["cost"] or 0.0)
    return {
        "enabled": bool(settings.get("enabled")),
        "endpoint": settings.get("base_url"),
        "model": settings.get("model"),
        **counts,
        "agreement": agreement,
        "requests_today": int(today["requests"] or 0),
        "throttled_today": int(today["throttled"] or 0),
        "tokens": {
            "prompt_today": int(today["prompt"] or 0),
            "completion_today": int(today["completion"] or 0),
            "prompt_total": int(totals["prompt"] or 0),
            "completion_total": int(totals["completion"] or 0),
        },
        "cost": {
            "today": round(spent, 8),
            "total": round(float(totals["cost"] or 0.0), 8),
        },
        "budget": _budget(settings, state, spent, now),
        "paused_until": _future(state.get("paused_until"), now),
        "pause_reason": (
            state.get("pause_reason")
            if _future(state.get("paused_until"), now)
            else None
        ),
    }


def empty_review_summary() -> dict[str, Any]:
    """Return the review figures of a data directory where review never ran."""
    return {
        "enabled": False,
        "endpoint": None,
        "model": None,
        **{str(s): 0 for s in ReviewState},
        "agreement": {
            "rate": None,
            "recent": None,
            "window": 0,
            "reviews": 0,
            "fields": {},
            "daily": [],
            "alert_below": 0.0,
            "alert": False,
            "alert_reason": None,
        },
        "requests_today": 0,
        "throttled_today": 0,
        "tokens": {
            "prompt_today": 0,
            "completion_today": 0,
            "prompt_total": 0,
            "completion_total": 0,
        },
        "cost": {"today": 0.0, "total": 0.0},
        "budget": {
            "daily": 0.0,
            "spent_today": 0.0,
            "state": "unlimited",
            "reason": None,
        },
        "paused_until": None,
        "pause_reason": None,
    }


def _agreement(store: Store, settings: dict[str, Any], now: float) -> dict[str, Any]:
    """Agreement over all reviews, the recent window, per field and per day."""
    rows = store.query(
        "SELECT agreement, verdicts, reviewed_at FROM reviews"
        " WHERE state = ? AND agreement IS NOT NULL ORDER BY reviewed_at",
        (str(ReviewState.DONE),),
    )
    window = int(settings.get("agreement_window") or 50)
    threshold = float(settings.get("agreement_alert_below") or 0.0)
    rates = [float(row["agreement"]) for row in rows]
    recent = rates[-window:]

    fields: dict[str, list[int]] = {}
    for row in rows:
        for field, verdict in json.loads(row["verdicts"]).items():
            fields.setdefault(field, []).append(verdict == "agree")

    daily: dict[str, list[float]] = {}
    since = day_start(now) - (SUMMARY_DAYS - 1) * 86400
    for row in rows:
        if row["reviewed_at"] >= since:
            daily.setdefault(utc_day(row["reviewed_at"]), []).append(row["agreement"])

    recent_rate = _mean(recent)
    alert_reason = None
    if recent_rate is not None and threshold > 0 and recent_rate < threshold:
        alert_reason = (
            f"agreement with the reviewer over the last {len(recent)} reviews is "
            f"{recent_rate:.2f}, below [review] agreement_alert_below = {threshold:g}: "
            "the local model may be drifting"
        )
    return {
        "rate": _mean(rates),
        "recent": recent_rate,
        "window": window,
        "reviews": len(rates),
        "fields": {field: _mean(values) for field, values in fields.items()},
        "daily": [
            {"day": day, "reviews": len(values), "rate": _mean(values)}
            for day, values in sorted(daily.items())
        ],
        "alert_below": threshold,
        "alert": alert_reason is not None,
        "alert_reason": alert_reason,
    }


def _budget(
    settings: dict[str, Any], state: dict[str, str], spent: float, now: float
) -> dict[str, Any]:
    daily = float(settings.get("daily_budget") or 0.0)
    stopped = _future(state.get("budget_stopped_until"), now)
    if daily <= 0:
        budget_state = "unlimited"
    elif stopped:
        budget_state = "exhausted"
    else:
        budget_state = "ok"
    return {
        "daily": daily,
        "spent_today": round(spent, 8),
        "state": budget_state,
        "reason": state.get("pause_reason") if budget_state == "exhausted" else None,
    }


def _future(value: str | None, now: float) -> float | None:
    if value is None or float(value) <= now:
        return None
    return float(value)


def _mean(values: list[Any]) -> float | None:
    if not values:
        return None
    return round(sum(float(v) for v in values) / len(values), 4)


def format_review(review: dict[str, Any] | None) -> list[str]:
    """Render the review figures as ``appliance status`` lines; none when review
    never ran."""
    if not review or not (review["enabled"] or review["done"] or review["pending"]):
        return []
    agreement = review["agreement"]
    rate = agreement["recent"]
    budget = review["budget"]
    counted = min(agreement["window"], agreement["reviews"])
    shown_rate = "n/a" if rate is None else f"{rate:.2f} over the last {counted}"
    lines = [
        f"review          {review['pending']} pending, {review['done']} done, "
        f"{review['failed']} failed; agreement {shown_rate}; "
        f"{review['requests_today']} requests and cost "
        f"{review['cost']['today']:.4f} today"
        + (f" of a {budget['daily']:g} budget" if budget["daily"] else "")
    ]
    if agreement["alert"]:
        lines.append(f"  ALERT: {agreement['alert_reason']}")
    if review["pause_reason"]:
        lines.append(f"  paused: {review['pause_reason']}")
    return lines
