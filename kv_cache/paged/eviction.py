"""What each :class:`~kv_cache.paged.config.EvictionPolicy` gives up when the pool is full.

Two decisions, as pure functions over the sequences' book-keeping
(:class:`~kv_cache.paged.block_pool.SequenceState`), so each rule can be read -- and tested -- on
its own:

* :func:`choose_victim` -- the whole sequence to evict (``LRU``, ``ADAPTIVE``, and the
  fallback of ``SLIDING_WINDOW``);
* :func:`choose_window_trim` -- the blocks a sequence no longer needs under ``SLIDING_WINDOW``.

Sequences *pinned* by an active view and the ones an operation is working on (``protect``) are
never chosen.  :class:`EvictionMixin` is the half of ``AdvancedKVCache`` that applies them:
``_ensure_free(n)`` evicts until ``n`` blocks are free (or raises), ``_make_slot`` keeps the
number of sequences within ``max_batch_size``.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Iterable, Optional, Tuple, Union

from ..errors import CacheCapacityError, PoolExhaustedError
from .block_pool import SequenceState
from .config import EvictionPolicy


def victim_score(policy: EvictionPolicy, seq: SequenceState) -> tuple:
    """Lower = evicted sooner.  ``ADAPTIVE``: ``(read hits / blocks held, last use)`` -- the value
    a sequence returned per block it occupies, ties to the least recently used.  Otherwise
    (``LRU``): ``(last use,)``."""
    if policy is EvictionPolicy.ADAPTIVE:
        return (seq.hits / max(1, seq.blocks_held), seq.last_use)
    return (seq.last_use,)


def choose_victim(policy: EvictionPolicy, seqs: Dict[Hashable, SequenceState],
                  protect: Iterable = ()) -> Optional[Hashable]:
    """The id of the sequence to evict whole (never pinned or protected), or ``None``.  O(sequences)."""
    protect = set(protect)
    cands = [(victim_score(policy, s), i, sid) for i, (sid, s) in enumerate(seqs.items())
             if s.pins == 0 and sid not in protect]
    return min(cands)[2] if cands else None


def choose_window_trim(seqs: Dict[Hashable, SequenceState], window: int,
                       block_size: int) -> Optional[Tuple[Hashable, int]]:
    """``(sequence_id, stop)``: blocks ``[seq.dropped, stop)`` of the least recently used unpinned
    sequence that has any block wholly more than ``window`` tokens behind its end (the shortest
    layer's end, so no layer loses a token it still needs).  ``None`` if no sequence has one."""
    for sid, seq in sorted(seqs.items(), key=lambda kv: kv[1].last_use):
        stop = max(0, min(seq.lengths) - window) // block_size
        if not seq.pins and stop > seq.dropped:
            return sid, stop
    return None


class EvictionMixin:
    """How an :class:`~kv_cache.paged.advanced.AdvancedKVCache` makes room (mixed into it).

    Uses the manager's ``config``, ``pool``, ``_seqs`` (id -> :class:`SequenceState`),
    ``counters``, ``eviction_log`` and ``_free_sequence``.  The policy is read from
    ``config.eviction_policy`` at every decision, so changing it later takes effect at once.
    """

    def _policy(self) -> EvictionPolicy:
        policy = EvictionPolicy(self.config.eviction_policy)
        if policy is EvictionPolicy.SLIDING_WINDOW:
            w = self.config.sliding_window_size
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"config.sliding_window_size={w!r}: SLIDING_WINDOW needs a positive int (or None "
                                 f"for max_sequence_length)")
        return policy

    def _evict(self, sid) -> None:
        blocks = self._seqs[sid].blocks_held
        self._free_sequence(sid, evicted=True)  # remembered: continuing it must fail, not restart it empty
        self.counters.sequences_evicted += 1
        self.eviction_log.append(("sequence", sid, blocks))

    def _trim_one(self) -> bool:
        """Sliding window: drop the out-of-window blocks of one sequence; False if none has any."""
        choice = choose_window_trim(self._seqs, self.config.window_tokens, self.config.block_size)
        if choice is None:
            return False
        sid, stop = choice
        seq = self._seqs[sid]
        for i in range(seq.dropped, stop):
            self.pool.decref(seq.blocks[i])
            seq.blocks[i] = None
        self.counters.blocks_trimmed += stop - seq.dropped
        self.eviction_log.append(("window", sid, stop - seq.dropped))
        seq.dropped = stop
        return True

    def _ensure_free(self, n: Union[int, Callable[[], int]], protect: Iterable) -> None:
        """Evict per the policy until ``n`` blocks are free, or raise :class:`PoolExhaustedError`.

        ``n`` may be a function, asked again after every eviction: evicting the other owners of
        a shared block makes its copy on write unnecessary, so the need can shrink.
        """
        need = n if callable(n) else (lambda: n)
        while self.pool.num_free < need():
            count = need()
            policy = self._policy()
            if policy is EvictionPolicy.NONE:
                self._raise_full(count, "eviction_policy=NONE never evicts")
            if policy is EvictionPolicy.SLIDING_WINDOW and self._trim_one():
                continue
            victim = choose_victim(policy, self._seqs, protect)
            if victim is None:
                self._raise_full(count, "every other sequence is pinned by an active view or is the one being written")
            self._evict(victim)

    def _raise_full(self, n: int, why: str):
        cfg = self.config
        raise PoolExhaustedError(
            f"the KV pool needs {n} free block(s) but has {self.pool.num_free} (max_blocks={cfg.max_blocks} of "
            f"{cfg.block_size} tokens = memory_limit_mb={cfg.memory_limit_mb:g}; {len(self._seqs)} sequences held) "
            f"and {why}; raise memory_limit_mb, clear finished sequences or choose another eviction_policy")

    def _make_slot(self, protect: Iterable) -> None:
        """Make room for one more sequence under ``max_batch_size`` (evicting per the policy)."""
        while len(self._seqs) >= self.config.max_batch_size:
            policy = self._policy()
            victim = None if policy is EvictionPolicy.NONE else choose_victim(policy, self._seqs, protect)
            if victim is None:
                raise CacheCapacityError(
                    f"{len(self._seqs)} sequences are held = max_batch_size={self.config.max_batch_size} and "
                    f"eviction_policy={self._policy().value} cannot free one; clear_sequence a finished one first")
            self._evict(victim)
