"""Answer-cache statistics as `appliance status` reads them."""

from __future__ import annotations

from pathlib import Path

import diskcache

from appliance.status import answer_cache_stats


def test_missing_cache_reports_zeros(tmp_path: Path) -> None:
    assert answer_cache_stats(tmp_path) == {"hits": 0, "misses": 0, "bytes": 0}


def test_cache_counts_hits_and_misses(tmp_path: Path) -> None:
    with diskcache.Cache(str(tmp_path / "answer-cache")) as cache:
        cache.stats(enable=True)
        cache.set("k", "v")
        cache.get("k")
        cache.get("absent")
    stats = answer_cache_stats(tmp_path)
    assert (stats["hits"], stats["misses"]) == (1, 1)
