"""``CachePerformanceMonitor``: snapshots of an ``AdvancedKVCache``'s statistics, and advice.

Counters such as "hits so far" only ever grow, so a dashboard wants *rates over recent
intervals*.  The monitor keeps a history of snapshots (:meth:`collect_metrics`, call it every
N steps) and turns the last ``window`` of them into averages, trends and plain-language
recommendations (:meth:`analyze_performance`).  It reads ``get_global_stats()`` only, so it
costs O(blocks held) per snapshot and nothing in between.
"""

from __future__ import annotations

import time
from typing import Dict, List

from .advanced import AdvancedKVCache


class CachePerformanceMonitor:
    """Collect metrics of ``cache`` over time and analyse the recent ones.

    Args:
        cache: the :class:`~kv_cache.paged.advanced.AdvancedKVCache` to watch.
        window: how many recent snapshots :meth:`analyze_performance` looks at.

    Thresholds (class attributes, change them on an instance if needed): ``LOW_HIT_RATE``
    0.5, ``HIGH_HIT_RATE`` 0.9, ``TREND_DELTA`` 0.1, ``LOW_UTILIZATION`` 0.25, ``HIGH_WASTE`` 0.2,
    ``HIGH_MEMORY_MB`` 500.
    """

    LOW_HIT_RATE = 0.5
    HIGH_HIT_RATE = 0.9
    TREND_DELTA = 0.1
    LOW_UTILIZATION = 0.25
    HIGH_WASTE = 0.2
    HIGH_MEMORY_MB = 500.0

    def __init__(self, cache: AdvancedKVCache, window: int = 10):
        if not isinstance(cache, AdvancedKVCache):
            raise TypeError(f"cache must be an AdvancedKVCache, got {type(cache).__name__}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2 (a trend needs two snapshots), got {window!r}")
        self.cache, self.window = cache, window
        self.metrics_history: List[Dict] = []

    def collect_metrics(self) -> Dict:
        """Take one snapshot, append it to ``metrics_history`` and return it.

        Keys: ``timestamp``; cumulative ``hit_rate``, ``hits``, ``misses``, ``evictions``;
        ``interval_hit_rate`` / ``interval_lookups`` / ``interval_evictions`` since the previous
        snapshot; ``memory_usage_mb`` (allocated), ``used_memory_mb`` (in blocks held),
        ``utilization`` (used / limit), ``waste`` (reserved-but-unused fraction of the blocks
        held), ``memory_pool_efficiency`` (pool hit rate), ``num_sequences``.
        """
        s = self.cache.get_global_stats()
        prev = self.metrics_history[-1] if self.metrics_history else dict(hits=0, misses=0, evictions=0)
        dh, dm = s["hits"] - prev["hits"], s["misses"] - prev["misses"]
        m = dict(
            timestamp=time.time(), hit_rate=s["global_hit_rate"], hits=s["hits"], misses=s["misses"],
            interval_lookups=dh + dm, interval_hit_rate=dh / (dh + dm) if dh + dm else None,
            evictions=s["total_evictions"], interval_evictions=s["total_evictions"] - prev["evictions"],
            memory_usage_mb=s["total_memory_mb"], used_memory_mb=s["used_memory_mb"],
            utilization=s["used_memory_mb"] / s["memory_limit_mb"], waste=s["waste"],
            memory_pool_efficiency=s["memory_pool"]["pool_hit_rate"], grows=s["memory_pool"]["grows"],
            num_sequences=s["num_sequences"],
        )
        self.metrics_history.append(m)
        return m

    def analyze_performance(self) -> Dict:
        """Summarise the last ``window`` snapshots.

        Returns ``{"status": "insufficient_data", "samples": n}`` before two snapshots; then
        ``status`` "ok", ``avg_hit_rate`` (hits / lookups over the window's intervals),
        ``avg_memory_usage`` (MiB allocated, mean), ``avg_utilization``, ``evictions`` (in the
        window), ``hit_rate_trend`` ("improving" / "degrading" / "stable": newer half of the
        window's interval hit rates vs the older half, +-``TREND_DELTA``), ``memory_trend``
        ("growing" / "shrinking" / "stable") and ``recommendations`` (a list of strings).
        """
        n = len(self.metrics_history)
        if n < 2:
            return {"status": "insufficient_data", "samples": n}
        recent = self.metrics_history[-self.window:]
        lookups = sum(m["interval_lookups"] for m in recent[1:])
        hits = recent[-1]["hits"] - recent[0]["hits"]
        avg_hit = hits / lookups if lookups else recent[-1]["hit_rate"]
        rates = [m["interval_hit_rate"] for m in recent[1:] if m["interval_hit_rate"] is not None]
        trend = "stable"
        if len(rates) >= 2:
            half = len(rates) // 2
            old, new = sum(rates[:half]) / half, sum(rates[half:]) / (len(rates) - half)
            trend = "improving" if new > old + self.TREND_DELTA else "degrading" if new < old - self.TREND_DELTA \
                else "stable"
        mem = [m["used_memory_mb"] for m in recent]
        mem_trend = "growing" if mem[-1] > mem[0] * 1.1 else "shrinking" if mem[-1] < mem[0] * 0.9 else "stable"
        out = dict(
            status="ok", samples=len(recent), avg_hit_rate=avg_hit,
            avg_memory_usage=sum(m["memory_usage_mb"] for m in recent) / len(recent),
            avg_utilization=sum(m["utilization"] for m in recent) / len(recent),
            evictions=recent[-1]["evictions"] - recent[0]["evictions"], hit_rate_trend=trend, memory_trend=mem_trend,
        )
        out["recommendations"] = self._generate_recommendations(out, recent)
        return out

    def _generate_recommendations(self, a: Dict, recent: List[Dict]) -> List[str]:
        cfg, rec = self.cache.config, []
        if a["avg_hit_rate"] < self.LOW_HIT_RATE:
            rec.append(f"Low hit rate ({a['avg_hit_rate']:.0%}): raise memory_limit_mb, or use "
                       f"EvictionPolicy.ADAPTIVE so sequences that are read often stay cached")
        if a["evictions"]:
            rec.append(f"The pool is full and evicting ({a['evictions']} evictions in the window, "
                       f"{a['avg_utilization']:.0%} of the budget in use on average): raise memory_limit_mb or "
                       f"lower max_batch_size")
        if a["hit_rate_trend"] == "degrading":
            rec.append("Hit rate is degrading: the working set is outgrowing the pool")
        if recent[-1]["waste"] > self.HIGH_WASTE:
            rec.append(f"{recent[-1]['waste']:.0%} of the memory held is reserved but unused: "
                       + ("set use_memory_pool=True (paged blocks instead of per-sequence reservations)"
                          if not cfg.use_memory_pool else f"lower block_size (now {cfg.block_size})"))
        if recent[-1]["grows"] > recent[0]["grows"] and not cfg.preallocate_memory:
            rec.append("The storage grew during the window (a copy each time): set preallocate_memory=True")
        if a["avg_memory_usage"] > self.HIGH_MEMORY_MB:
            rec.append(f"High memory usage ({a['avg_memory_usage']:.0f} MiB): consider a more aggressive eviction "
                       f"policy (SLIDING_WINDOW) or a smaller memory_limit_mb")
        if a["avg_hit_rate"] > self.HIGH_HIT_RATE and a["avg_utilization"] < self.LOW_UTILIZATION:
            rec.append("Excellent hit rate with the pool mostly empty: memory_limit_mb could be reduced")
        return rec
