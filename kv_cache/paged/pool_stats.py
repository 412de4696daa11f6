"""The statistics of an ``AdvancedKVCache``: what it counts, and the dictionary it reports.

Two kinds of numbers:

* **counters** (:class:`CacheCounters`), bumped as things happen: reads that hit or missed
  (per layer), sequences evicted, blocks trimmed by the sliding window, prefix-cache queries;
* **occupancy** (:func:`usage`), computed on demand from the block tables: blocks held, token
  slots holding data (a slot shared by several sequences counts once), and the *waste* --
  the reserved-but-unused fraction of the blocks held, the number PagedAttention shrinks.

:func:`global_stats` merges both with the pool's own counters into the flat dictionary
``AdvancedKVCache.get_global_stats()`` returns.  Cost: O(blocks held).
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable

from .block_pool import BlockPool, SequenceState


class CacheCounters:
    """Event counters of one manager (plain ints; ``lookup`` is the only method with logic)."""

    def __init__(self, num_layers: int):
        self.layer_hits = [0] * num_layers
        self.layer_misses = [0] * num_layers
        self.sequences_evicted = self.blocks_trimmed = 0
        self.prefix_queries = self.prefix_query_tokens = self.prefix_hit_tokens = 0

    def lookup(self, layer: int, hit: bool) -> None:
        """Count one read of ``layer`` that found (``hit``) or did not find its tokens."""
        (self.layer_hits if hit else self.layer_misses)[layer] += 1

    @property
    def hits(self) -> int:
        return sum(self.layer_hits)

    @property
    def misses(self) -> int:
        return sum(self.layer_misses)


def usage(seqs: Iterable[SequenceState], pool: BlockPool, block_size: int) -> Dict[str, float]:
    """``used_blocks``, ``filled_slots`` (slots holding a token, shared ones once),
    ``reserved_slots`` (``used_blocks * block_size``) and ``waste`` (unused share of those)."""
    filled: Dict[int, int] = {}
    for seq in seqs:
        n = seq.length
        for i, b in enumerate(seq.blocks):
            if b is not None:
                filled[b] = max(filled.get(b, 0), min(block_size, max(0, n - i * block_size)))
    used, slots = pool.num_used, sum(filled.values())
    return dict(used_blocks=used, filled_slots=slots, reserved_slots=used * block_size,
                waste=1.0 - slots / (used * block_size) if used else 0.0)


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def global_stats(counters: CacheCounters, seqs: Dict[Hashable, SequenceState], pool: BlockPool, config,
                 policy: str) -> dict:
    """The dictionary of ``AdvancedKVCache.get_global_stats()`` (keys documented there)."""
    c, p, mib, bs = counters, pool, 2 ** 20, config.block_size
    use = usage(seqs.values(), pool, bs)
    return dict(
        global_hit_rate=_rate(c.hits, c.hits + c.misses), hits=c.hits, misses=c.misses,
        total_memory_mb=p.allocated_bytes / mib, used_memory_mb=use["used_blocks"] * p.block_bytes / mib,
        memory_limit_mb=config.memory_limit_mb, waste=use["waste"],
        total_evictions=c.sequences_evicted + c.blocks_trimmed, sequences_evicted=c.sequences_evicted,
        blocks_trimmed=c.blocks_trimmed, num_sequences=len(seqs), eviction_policy=policy,
        tokens_stored=sum(s.length - s.dropped * bs for s in seqs.values()),
        per_layer=[dict(hits=h, misses=m, hit_rate=_rate(h, h + m)) for h, m in zip(c.layer_hits, c.layer_misses)],
        memory_pool=dict(pool_hit_rate=_rate(p.stats["recycled"], p.stats["allocations"]),
                         used_blocks=use["used_blocks"], free_blocks=p.num_free, cached_free_blocks=p.num_cached_free,
                         capacity_blocks=p.capacity, max_blocks=p.max_blocks, block_size=bs,
                         preallocated=p.preallocate, **p.stats),
        prefix_cache=dict(queries=c.prefix_queries, query_tokens=c.prefix_query_tokens,
                          hit_tokens=c.prefix_hit_tokens, hit_rate=_rate(c.prefix_hit_tokens, c.prefix_query_tokens)),
    )
