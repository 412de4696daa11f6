"""``AdvancedKVCache``: one paged KV memory pool shared by many sequences, with eviction and
prefix sharing.

Picture a server answering many requests at once.  Each request (a *sequence*, named by any
hashable ``sequence_id``) needs, for every layer, the keys and values of all its tokens.  This
manager keeps them all in one :class:`~kv_cache.paged.block_pool.BlockPool` under a hard memory
budget:

* **per-sequence block tables** -- a sequence owns a list of block ids, shared by all layers;
  an append adds tokens to one layer, taking a new block from the free list only when the
  sequence crosses a block boundary (``append_cache`` / ``append_and_gather``).  ``set_cache``
  instead *replaces* a layer's keys/values with the whole tensor it is given (the reference
  guide's attention stores a sequence's entire K/V at every step); it rewrites the blocks the
  sequence already has and returns the ones it no longer needs;
* **eviction** -- when no block is free, :class:`~kv_cache.paged.config.EvictionPolicy` decides:
  raise (``NONE``), drop whole sequences (``LRU``, ``ADAPTIVE``) or drop blocks that fell out
  of a sequence's window (``SLIDING_WINDOW``).  Sequences pinned by an active
  :class:`~kv_cache.paged.view.PagedCacheView` are never touched;
* **prefix sharing** -- ``add_sequence(id, token_ids)`` finds the longest run of *full* blocks
  already computed for the same leading tokens (by chained hash, as in vLLM) and points the
  new sequence at them: the caller prefills only the rest.  ``fork_sequence`` shares every
  block of a sequence (beam search, parallel sampling).  Shared blocks are copied on the
  first write (copy on write), so no sequence can change another's tokens.

Gone sequences.  A read of a sequence that is not held is a miss (``None``).  An *append* to
one that the pool **evicted** raises :class:`EvictedSequenceError`: appending would restart it
empty and the model would silently decode without its context.  The caller re-prefills it --
``set_cache`` with its whole keys/values, or ``clear_sequence(id)`` / ``add_sequence(id)`` and
then appends -- all deliberate restarts.  Cleared ids may be reused freely.  The manager
remembers the last ``config.max_remembered_ids`` gone ids (bounded host memory).

Tensor shapes: one sequence, one layer, ``T`` new tokens: ``key``/``value`` are ``(T,
num_kv_heads, head_dim)``, or ``(T, num_kv_heads * head_dim)`` (= ``(T, embed_dim)`` without
GQA; reads then come back flat too).  Batched calls take ``(B, T, H_kv, D)`` and return ``(B,
L, H_kv, D)``.  Costs: a write copies the ``T`` new tokens (plus one block per copy on
write); a read gathers the ``L`` stored tokens (one ``index_select``); allocation and
eviction are O(1) per block plus O(sequences) to pick a victim.

Where each part lives (all in ``kv_cache/paged/``): blocks, free list, reference counts and
block tables in :mod:`~kv_cache.paged.block_pool`; hashing and matching prefixes in
:mod:`~kv_cache.paged.prefix_cache`; what each policy evicts in :mod:`~kv_cache.paged.eviction`;
counters and the statistics dictionary in :mod:`~kv_cache.paged.pool_stats`.  The error types
are in :mod:`kv_cache.errors`.  This file ties them together: the sequences' life cycle, writes
and reads.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..errors import CacheCapacityError, EvictedSequenceError, UnknownSequenceError
from ..validate import layer_index
from .block_pool import BlockPool, SequenceState
from .config import CacheConfig, check_kv_write
from .eviction import EvictionMixin
from .pool_stats import CacheCounters, global_stats, usage
from .prefix_cache import match_cached_blocks, register_full_blocks, token_list

Tensor = torch.Tensor


class AdvancedKVCache(EvictionMixin):
    """A paged, budgeted, shared KV store for many sequences and all layers.  See the module doc.

    Args:
        config: a :class:`~kv_cache.paged.config.CacheConfig`.  ``config.eviction_policy`` and
            ``config.sliding_window_size`` may be changed later (validated at the next use);
            the sizes are fixed at construction.

    Example::

        cache = AdvancedKVCache(CacheConfig(max_batch_size=8, max_sequence_length=256, embed_dim=64,
                                            num_heads=4, num_layers=2, memory_limit_mb=1))
        cache.set_cache(0, "req-1", torch.randn(5, 4, 16), torch.randn(5, 4, 16))
        k, v = cache.get_cache(0, "req-1")          # (5, 4, 16) each: exactly what was stored
        cache.append_cache(0, "req-1", torch.randn(1, 4, 16), torch.randn(1, 4, 16))  # now 6 tokens
        cache.set_cache(0, "req-1", torch.randn(3, 4, 16), torch.randn(3, 4, 16))     # replaced: 3
        cache.get_cache(0, "req-2") is None          # a miss
    """

    def __init__(self, config: CacheConfig):
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.pool = BlockPool(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                              head_dim=config.head_dim, block_size=config.block_size, max_blocks=config.max_blocks,
                              dtype=config.dtype, device=config.device, preallocate=config.preallocate_memory)
        self.device = self.pool.device
        self._offsets = torch.arange(config.block_size, device=self.device)
        self._seqs: Dict[Hashable, SequenceState] = {}
        # ids no longer held -> "cleared" or "evicted" (oldest first, at most max_remembered_ids):
        # reads miss, clear_sequence returns False, and appending to an evicted id raises.
        self._gone: "OrderedDict[Hashable, str]" = OrderedDict()
        self._clock = 0
        #: the most recent evictions: ``(kind, sequence_id, blocks)``, kind "sequence" or "window"
        self.eviction_log: deque = deque(maxlen=1000)
        self.counters = CacheCounters(config.num_layers)

    # ------------------------------------------------------------------ lookup helpers
    def _tick(self, seq: SequenceState) -> None:
        self._clock += 1
        seq.last_use = self._clock

    def _seq(self, sequence_id) -> SequenceState:
        seq = self._seqs.get(sequence_id)
        if seq is None:
            if self._gone.get(sequence_id) == "evicted":
                raise self._evicted_error(sequence_id)
            why = "it was cleared" if sequence_id in self._gone else "it was never added"
            raise UnknownSequenceError(f"sequence_id={sequence_id!r} is not held by this cache ({why}); "
                                       f"held: {self._preview_ids()}")
        return seq

    def _evicted_error(self, sequence_id) -> EvictedSequenceError:
        return EvictedSequenceError(
            f"sequence_id={sequence_id!r} was evicted (eviction_policy={self._policy().value}, "
            f"memory_limit_mb={self.config.memory_limit_mb:g}, max_batch_size={self.config.max_batch_size}): "
            f"its keys/values are gone, and continuing it would decode without its context.  Re-prefill it: "
            f"set_cache its whole keys/values, or clear_sequence({sequence_id!r}) (or add_sequence) and write "
            f"them again from token 0")

    def _check_continuable(self, sequence_id) -> None:
        """Raise :class:`EvictedSequenceError` if ``sequence_id`` is not held because it was evicted."""
        if sequence_id not in self._seqs and self._gone.get(sequence_id) == "evicted":
            raise self._evicted_error(sequence_id)

    def _remember_gone(self, sequence_id, how: str) -> None:
        self._gone[sequence_id] = how
        self._gone.move_to_end(sequence_id)
        while len(self._gone) > self.config.max_remembered_ids:
            self._gone.popitem(last=False)

    def was_evicted(self, sequence_id) -> bool:
        """True if the pool evicted ``sequence_id`` and nobody restarted or cleared it since.

        Such an id reads as a miss, and appending to it raises :class:`EvictedSequenceError`.
        Only the last ``config.max_remembered_ids`` gone ids are remembered.  O(1).
        """
        return sequence_id not in self._seqs and self._gone.get(sequence_id) == "evicted"

    def _preview_ids(self) -> str:
        ids = list(self._seqs)
        return repr(ids[:8])[:-1] + (", ...]" if len(ids) > 8 else "]")

    def _check_layer(self, layer_id) -> None:
        layer_index(layer_id, self.config.num_layers, name="layer_id")

    def __contains__(self, sequence_id) -> bool:
        return sequence_id in self._seqs

    def __len__(self) -> int:
        """Number of sequences held."""
        return len(self._seqs)

    def __bool__(self) -> bool:  # ``if self.kv_cache:`` means "is there a cache", even an empty one
        return True

    @property
    def sequence_ids(self) -> List[Hashable]:
        """Ids of the sequences held now, oldest first."""
        return list(self._seqs)

    def sequence_length(self, sequence_id, layer_id: Optional[int] = None) -> int:
        """Tokens written to ``sequence_id`` (in ``layer_id``, or the most of any layer)."""
        seq = self._seq(sequence_id)
        if layer_id is None:
            return seq.length
        self._check_layer(layer_id)
        return seq.lengths[layer_id]

    def block_table(self, sequence_id) -> List[Optional[int]]:
        """A copy of the sequence's block table (``None`` = block dropped by the window)."""
        return list(self._seq(sequence_id).blocks)

    def sequence_info(self, sequence_id) -> dict:
        """What the eviction policies look at: ``length``, ``start`` (first token still held),
        ``blocks`` (held), ``hits``, ``last_use`` (logical clock), ``pinned``."""
        s = self._seq(sequence_id)
        return dict(length=s.length, start=s.dropped * self.config.block_size, hits=s.hits, last_use=s.last_use,
                    blocks=s.blocks_held, pinned=s.pins > 0, token_ids=len(s.token_ids))

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, sequence_id, token_ids: Optional[Sequence[int]] = None) -> int:
        """Start a sequence; return how many of its first ``token_ids`` are already cached.

        With ``token_ids`` (the prompt) and prefix caching on, the new sequence points at the
        cached full blocks of the longest matching prefix (no copy) and its length is set to
        the number returned -- at most ``len(token_ids) - 1``, so at least one token is left
        to prefill (its logits are needed).  Write the keys/values of ``token_ids[n:]`` next.
        With ``use_memory_pool=False`` the sequence reserves ``max_sequence_length`` tokens now.
        Raises ``ValueError`` if the id is already held.  Adding an id the pool evicted is a
        deliberate restart (the caller then prefills it) and forgets that it was evicted.
        """
        if sequence_id in self._seqs:
            raise ValueError(f"sequence_id={sequence_id!r} already exists; clear_sequence it first or pick a new id")
        ids = token_list(token_ids) if token_ids is not None else []
        self._make_slot(protect=())
        cfg, bs = self.config, self.config.block_size
        blocks, hashes = [], []
        if not cfg.use_memory_pool:
            self._ensure_free(cfg.blocks_per_max_sequence, protect=())
            blocks = [self.pool.allocate() for _ in range(cfg.blocks_per_max_sequence)]
        elif ids and cfg.enable_prefix_caching:
            blocks, hashes = match_cached_blocks(self.pool, ids, bs)
            for b in blocks:
                self.pool.revive(b)
        cached = min(len(blocks) * bs, max(len(ids) - 1, 0)) if cfg.use_memory_pool else 0
        seq = SequenceState(blocks=blocks, lengths=[cached] * cfg.num_layers, token_ids=ids,
                            hashes=hashes[: cached // bs])
        self._seqs[sequence_id] = seq
        self._gone.pop(sequence_id, None)
        self._tick(seq)
        if ids:
            self.counters.prefix_queries += 1
            self.counters.prefix_query_tokens += len(ids)
            self.counters.prefix_hit_tokens += cached
        return cached

    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens at the start of ``token_ids`` whose keys/values are cached (whole blocks only).

        Read-only: nothing is shared or counted.  ``add_sequence`` does the reuse.
        Cost: one hash per full block until the first miss.
        """
        ids = token_list(token_ids)
        if not (self.config.use_memory_pool and self.config.enable_prefix_caching):
            return 0
        return len(match_cached_blocks(self.pool, ids, self.config.block_size)[0]) * self.config.block_size

    def append_token_ids(self, sequence_id, token_ids: Sequence[int]) -> None:
        """Record more tokens of ``sequence_id`` (e.g. generated ones) so its full blocks can be
        found by later prefix matches.  Blocks are indexed once their keys/values are written."""
        seq = self._seq(sequence_id)
        seq.token_ids.extend(token_list(token_ids))
        self._register(seq)
        self._tick(seq)

    def fork_sequence(self, parent_id, child_id) -> None:
        """Make ``child_id`` a copy of ``parent_id`` that shares all its blocks (no data copied).

        The first write by either side into a shared block copies that block (copy on write).
        Needs ``use_memory_pool=True``.  Cost: O(blocks) reference-count updates.
        """
        parent = self._seq(parent_id)
        if not self.config.use_memory_pool:
            raise ValueError("fork_sequence shares blocks and needs use_memory_pool=True; with per-sequence "
                             "reservations (use_memory_pool=False) there is nothing to share")
        if child_id in self._seqs:
            raise ValueError(f"child_id={child_id!r} already exists; pick a new id")
        self._make_slot(protect=(parent_id,))
        for b in parent.blocks:
            if b is not None:
                self.pool.incref(b)
        child = SequenceState(blocks=list(parent.blocks), lengths=list(parent.lengths),
                              token_ids=list(parent.token_ids), hashes=list(parent.hashes), flat=parent.flat,
                              dropped=parent.dropped, indexable=parent.indexable)
        self._seqs[child_id] = child
        self._gone.pop(child_id, None)
        self._tick(parent)
        self._tick(child)

    def crop_sequence(self, sequence_id, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (negative: drop that many from the end).

        Blocks past the new end go back to the pool (a reservation keeps its blocks).  This is
        the rollback speculative decoding needs.  Cost: O(freed blocks).
        """
        seq = self._seq(sequence_id)
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        keep = max(0, min(seq.length + length if length < 0 else length, seq.length))
        start = seq.dropped * self.config.block_size
        if keep < start:
            raise ValueError(f"cannot crop sequence_id={sequence_id!r} to {keep} tokens: its tokens before {start} "
                             f"were dropped by the sliding window")
        seq.lengths = [min(n, keep) for n in seq.lengths]
        if self.config.use_memory_pool:
            n_blocks = -(-keep // self.config.block_size)
            for b in seq.blocks[n_blocks:]:
                if b is not None:
                    self.pool.decref(b)
            del seq.blocks[n_blocks:]
        del seq.token_ids[keep:]
        del seq.hashes[keep // self.config.block_size:]
        self._tick(seq)

    def clear_sequence(self, sequence_id) -> bool:
        """Free ``sequence_id``'s blocks.  True if it was held; False if it was already cleared or
        evicted; ``UnknownSequenceError`` if the id was never seen.

        Clearing an evicted id acknowledges the loss: the id may then be reused (an append
        starts it anew) instead of raising :class:`EvictedSequenceError`.
        """
        if sequence_id not in self._seqs:
            if sequence_id in self._gone:
                self._remember_gone(sequence_id, "cleared")
                return False
            self._seq(sequence_id)  # raises with the message
        self._free_sequence(sequence_id)
        return True

    def _free_sequence(self, sequence_id, evicted: bool = False) -> int:
        seq = self._seqs.pop(sequence_id)
        freed = sum(self.pool.decref(b) for b in seq.blocks if b is not None)
        self._remember_gone(sequence_id, "evicted" if evicted else "cleared")
        return freed

    def clear_all(self) -> None:
        """Free every sequence and forget the prefix cache; the storage itself is kept.

        A deliberate reset: ids evicted earlier count as cleared afterwards (reusable)."""
        for sid in list(self._seqs):
            self._free_sequence(sid)
        for sid in self._gone:
            self._gone[sid] = "cleared"
        self.pool.forget_cached_free()

    def pin(self, sequence_id) -> None:
        """Protect ``sequence_id`` from eviction (counted: ``unpin`` as often as ``pin``)."""
        self._seq(sequence_id).pins += 1

    def unpin(self, sequence_id) -> None:
        """Undo one :meth:`pin` (ignored for a sequence no longer held)."""
        seq = self._seqs.get(sequence_id)
        if seq is not None and seq.pins > 0:
            seq.pins -= 1

    # ------------------------------------------------------------------ writes
    def set_cache(self, layer_id: int, sequence_id, key: Tensor, value: Tensor) -> int:
        """Store ``key``/``value`` as ``sequence_id``'s keys/values in ``layer_id``, *replacing* what
        that layer held; return the number of tokens now stored there (``T``).

        This is the reference guide's call: its attention computes a sequence's whole K/V
        (cached part + new tokens) and stores all of it at every step, and
        ``get_cache(layer_id, sequence_id, seq_len)`` then returns exactly this tensor (at most
        its first ``seq_len`` tokens).  To add tokens after the stored ones use
        :meth:`append_cache`.

        Shapes: ``(T, num_kv_heads, head_dim)`` or flat ``(T, num_kv_heads * head_dim)`` (``(T,
        embed_dim)`` without GQA; reads then come back flat); dtype and device of the config;
        ``T <= max_sequence_length``.  An id not held is added -- also one the pool evicted:
        storing its whole K/V is a deliberate restart, so nothing is lost.  Other layers keep
        their tokens.

        Memory: the sequence's blocks are rewritten in place (a block shared with another
        sequence is copied first, a block in the prefix index leaves it), new blocks are taken
        only past the ones it has, and blocks no layer needs any more go back to the pool.  The
        manager cannot tell which tokens these keys belong to, so from now on (until the
        sequence is cleared) its blocks are offered to no prefix match.  If the sliding window
        had dropped the sequence's first blocks, the whole sequence restarts from token 0: its
        other layers are emptied (their next read misses).
        Cost: one copy of ``T`` tokens.  May evict other sequences per the policy; raises
        :class:`PoolExhaustedError` if it cannot make room (this layer is then unchanged).
        """
        self._check_layer(layer_id)
        key, value, flat = check_kv_write(self.config, self.device, key, value, batched=False)
        self._check_max_length(sequence_id, layer_id, 0, key.shape[0])
        if sequence_id not in self._seqs:
            self.add_sequence(sequence_id)
        seq = self._seqs[sequence_id]
        self._check_format(sequence_id, seq, flat, skip_layer=layer_id)
        if seq.dropped:
            self._restart(sequence_id, seq)
        seq.indexable = False
        seq.pins += 1  # the window must not trim the blocks this write is about to rewrite
        try:
            self._write(sequence_id, seq, layer_id, 0, key, value)
        finally:
            seq.pins -= 1
        seq.flat = flat
        if self.config.use_memory_pool:  # a shorter K/V may leave blocks no layer needs
            keep = -(-seq.length // self.config.block_size)
            for b in seq.blocks[keep:]:
                if b is not None:
                    self.pool.decref(b)
            del seq.blocks[keep:]
        return seq.lengths[layer_id]

    def append_cache(self, layer_id: int, sequence_id, key: Tensor, value: Tensor) -> int:
        """Append ``T`` tokens' ``key``/``value`` after ``sequence_id``'s last token in ``layer_id``;
        return its new length there.

        Shapes as :meth:`set_cache`.  An id never seen (or cleared) is added, as by
        ``add_sequence`` without token ids.  An id the pool **evicted** raises
        :class:`EvictedSequenceError`: appending to it would restart it empty and the model
        would decode without its context (re-prefill it: see the error).  Takes a new block only
        when the sequence crosses a block boundary (plus one copy if the block it writes into is
        shared).  May evict other sequences (or this one's out-of-window blocks) per the policy;
        raises :class:`PoolExhaustedError` if the policy cannot make room (nothing is written
        then) and :class:`CacheCapacityError` past ``max_sequence_length``.
        Cost: one copy of the ``T`` new tokens.
        """
        self._check_layer(layer_id)
        key, value, flat = check_kv_write(self.config, self.device, key, value, batched=False)
        self._check_continuable(sequence_id)
        if sequence_id not in self._seqs:
            self._check_max_length(sequence_id, layer_id, 0, key.shape[0])  # refuse before adding the id
            self.add_sequence(sequence_id)
        seq = self._seqs[sequence_id]
        self._check_format(sequence_id, seq, flat)
        seq.flat = flat
        self._write(sequence_id, seq, layer_id, seq.lengths[layer_id], key, value)
        return seq.lengths[layer_id]

    def _check_format(self, sid, seq: SequenceState, flat: bool, skip_layer: Optional[int] = None) -> None:
        """One tensor format per sequence: refuse flat after 3-D (or back) while any other layer holds tokens."""
        others = any(n for i, n in enumerate(seq.lengths) if i != skip_layer)
        if seq.flat is not None and seq.flat != flat and others:
            raise ValueError(f"sequence_id={sid!r} was written with {'flat' if seq.flat else '3-D'} tensors; "
                             f"keep one format per sequence")

    def _restart(self, sid, seq: SequenceState) -> None:
        """Empty every layer of ``seq`` and give its blocks back (a reservation is taken anew)."""
        for b in seq.blocks:
            if b is not None:
                self.pool.decref(b)
        seq.blocks, seq.lengths, seq.dropped = [], [0] * self.config.num_layers, 0
        if not self.config.use_memory_pool:
            self._ensure_free(self.config.blocks_per_max_sequence, protect=(sid,))
            seq.blocks = [self.pool.allocate() for _ in range(self.config.blocks_per_max_sequence)]

    def _write(self, sid, seq: SequenceState, layer: int, start: int, key: Tensor, value: Tensor) -> None:
        """Write ``key``/``value`` ``(T, H, D)`` as tokens ``start..start+T-1`` of ``layer``; the layer
        then ends there.  Makes room first, so a full pool raises before anything changes."""
        T, bs = key.shape[0], self.config.block_size
        end = start + T
        self._check_max_length(sid, layer, start, T)
        if T:
            first, last = start // bs, (end - 1) // bs
            self._ensure_free(lambda: self._blocks_needed(seq, start, T), protect=(sid,))
            for i in range(first, min(last + 1, len(seq.blocks))):
                b = seq.blocks[i]  # shared blocks are copied before the write; indexed ones leave the index
                if self.pool.ref_counts[b] > 1:
                    seq.blocks[i] = self.pool.copy_block(b)
                    self.pool.decref(b)
                elif self.pool.block_hashes[b] is not None:
                    self.pool.unregister(b)
            while len(seq.blocks) <= last:
                seq.blocks.append(self.pool.allocate())
            self.pool.write(layer, self._slots(seq, start, end), key, value)
        seq.lengths[layer] = end
        self._register(seq)
        self._tick(seq)

    def _check_max_length(self, sid, layer: int, start: int, T: int) -> None:
        if start + T > self.config.max_sequence_length:
            raise CacheCapacityError(
                f"sequence_id={sid!r} layer {layer}: length {start} + {T} new tokens = {start + T} exceeds "
                f"max_sequence_length={self.config.max_sequence_length}")

    def _blocks_needed(self, seq: SequenceState, start: int, T: int) -> int:
        """Blocks writing ``T`` tokens from ``start`` takes from the pool: new blocks + copies on write."""
        if T == 0:
            return 0
        bs = self.config.block_size
        first, last = start // bs, (start + T - 1) // bs
        shared = sum(self.pool.ref_counts[seq.blocks[i]] > 1 for i in range(first, min(last + 1, len(seq.blocks))))
        return max(0, last + 1 - len(seq.blocks)) + shared

    def _slots(self, seq: SequenceState, start: int, end: int) -> Tensor:
        """Storage slots of tokens ``start..end-1``: ``table[p // bs] * bs + p % bs``."""
        bs = self.config.block_size
        b0 = start // bs
        table = torch.tensor(seq.blocks[b0:-(-end // bs)], dtype=torch.long, device=self.device)
        slots = (table[:, None] * bs + self._offsets).flatten()
        return slots[start - b0 * bs:end - b0 * bs]

    def _register(self, seq: SequenceState) -> None:
        if self.config.enable_prefix_caching and self.config.use_memory_pool and seq.indexable:
            register_full_blocks(self.pool, seq, self.config.block_size)

    # ------------------------------------------------------------------ reads
    def get_cache(self, layer_id: int, sequence_id, seq_len: Optional[int] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """The stored ``(keys, values)`` of ``sequence_id`` in ``layer_id``, or ``None`` (a miss).

        ``seq_len=None``: every token still held (after sliding-window trimming, the newest
        ones).  ``seq_len=n``: *at most* the first ``n`` tokens -- tokens ``0..min(n, L)-1`` of
        the ``L`` stored (after :meth:`set_cache` stored ``n`` tokens, exactly those; a caller
        that asks for more than is stored gets what there is and computes the rest).  A miss
        if the layer holds no token, or (with ``seq_len``) if the sliding window dropped its
        first tokens.  Shapes ``(L, num_kv_heads, head_dim)`` or flat ``(L, num_kv_heads *
        head_dim)`` as written; a new tensor (one gather).  Unknown, cleared and evicted ids all
        read as misses.
        """
        self._check_layer(layer_id)
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be None or a positive int, got {seq_len!r}")
        seq = self._seqs.get(sequence_id)
        start = seq.dropped * self.config.block_size if seq is not None else 0
        end = (seq.lengths[layer_id] if seq_len is None else min(seq_len, seq.lengths[layer_id])) \
            if seq is not None else 0
        if seq is None or end <= start or (seq_len is not None and start > 0):
            self.counters.lookup(layer_id, hit=False)
            return None
        self.counters.lookup(layer_id, hit=True)
        seq.hits += 1
        self._tick(seq)
        k, v = self.pool.read(layer_id, self._slots(seq, start, end))
        if seq.flat:
            k, v = k.flatten(1), v.flatten(1)
        return k, v

    def append_and_gather(self, layer_id: int, sequence_ids: Sequence, key: Tensor, value: Tensor
                          ) -> Tuple[Tensor, Tensor]:
        """Batched write + read for attention: row ``i`` of ``key``/``value`` ``(B, T, H, D)`` is
        appended to ``sequence_ids[i]``; returns every row's tokens ``(B, L, H, D)``.

        Rows must end up with the same length ``L`` in this layer and hold all their tokens
        (the batch is a rectangle; left padding is stored as ordinary, masked tokens).  Each
        row counts as a hit if it held tokens before the call, else as a miss (a cold prefill).
        Unknown ids are added; an id the pool evicted raises :class:`EvictedSequenceError`
        before any row is written (see :meth:`append_cache`).
        Cost: ``B`` writes of ``T`` tokens + one gather of ``B * L``.
        """
        self._check_layer(layer_id)
        key, value, _ = check_kv_write(self.config, self.device, key, value, batched=True)
        if len(sequence_ids) != key.shape[0]:
            raise ValueError(f"{len(sequence_ids)} sequence_ids for a batch of {key.shape[0]} rows")
        if len(set(sequence_ids)) != len(sequence_ids):
            raise ValueError(f"sequence_ids {list(sequence_ids)} repeat an id; fork_sequence to get distinct rows")
        for sid in sequence_ids:
            self._check_continuable(sid)
        pinned = []
        try:  # pin the rows so that making room for one row never evicts another
            for sid in sequence_ids:
                if sid not in self._seqs:
                    self.add_sequence(sid)
                self.pin(sid)
                pinned.append(sid)
                self._check_max_length(sid, layer_id, self._seqs[sid].lengths[layer_id], key.shape[1])
            # Make room for every row first, so that a full pool fails before any row is written.
            self._ensure_free(lambda: sum(self._blocks_needed(self._seqs[sid], self._seqs[sid].lengths[layer_id],
                                                              key.shape[1]) for sid in sequence_ids), protect=())
            for i, sid in enumerate(sequence_ids):
                seq = self._seqs[sid]
                warm = seq.lengths[layer_id] > 0
                self.counters.lookup(layer_id, hit=warm)
                seq.hits += warm
                self._write(sid, seq, layer_id, seq.lengths[layer_id], key[i], value[i])
        finally:
            for sid in pinned:
                self.unpin(sid)
        return self.gather(layer_id, sequence_ids)

    def gather(self, layer_id: int, sequence_ids: Sequence) -> Tuple[Tensor, Tensor]:
        """``(keys, values)`` ``(B, L, H, D)`` of equally long, untrimmed sequences (no stats)."""
        seqs = [self._seq(sid) for sid in sequence_ids]
        lengths = [s.lengths[layer_id] for s in seqs]
        if len(set(lengths)) > 1 or any(s.dropped for s in seqs):
            raise ValueError(f"layer {layer_id}: sequences {list(sequence_ids)} hold {lengths} tokens (starting at "
                             f"{[s.dropped * self.config.block_size for s in seqs]}); a batch needs equal, "
                             f"complete lengths")
        L = lengths[0] if lengths else 0
        slots = torch.cat([self._slots(s, 0, L) for s in seqs]) if L else self._offsets[:0]
        k, v = self.pool.read(layer_id, slots)
        shape = (len(seqs), L, self.config.num_kv_heads, self.config.head_dim)
        return k.view(shape), v.view(shape)

    # ------------------------------------------------------------------ memory & stats
    def optimize_memory(self) -> dict:
        """Defragment: move the blocks in use to the front of the storage, forget cached free
        blocks, and (unless preallocated) give the unused tail back to the allocator.

        Returns ``{"blocks_moved", "bytes_before", "bytes_after", "bytes_released"}``.
        Cost: one copy per moved block; block tables are rewritten in place.
        """
        before = self.pool.allocated_bytes
        mapping = self.pool.defragment(shrink=True)
        for seq in self._seqs.values():
            seq.blocks = [None if b is None else mapping[b] for b in seq.blocks]
        after = self.pool.allocated_bytes
        return dict(blocks_moved=sum(o != n for o, n in mapping.items()), bytes_before=before, bytes_after=after,
                    bytes_released=before - after)

    def memory_bytes(self) -> int:
        """Bytes of KV storage allocated now (never more than the budget)."""
        return self.pool.allocated_bytes

    def usage(self) -> dict:
        """Physical occupancy: ``used_blocks``, ``filled_slots`` (a shared slot counted once),
        ``reserved_slots`` and ``waste`` (reserved-but-unused fraction).  O(blocks held)."""
        return usage(self._seqs.values(), self.pool, self.config.block_size)

    def get_global_stats(self) -> dict:
        """Everything a dashboard wants, as plain numbers (see :mod:`kv_cache.paged.pool_stats`).

        ``global_hit_rate`` = hits / (hits + misses) over ``get_cache`` and batched reads (a
        batched row is a hit if it held tokens before the call); ``total_memory_mb`` = storage
        allocated (MiB); ``used_memory_mb`` = blocks held; ``waste``; ``total_evictions`` =
        ``sequences_evicted`` + ``blocks_trimmed`` (window); ``num_sequences``; ``tokens_stored``;
        ``per_layer`` hit rates; ``memory_pool`` (``pool_hit_rate`` = fraction of block
        allocations that recycled a freed block, ``grows``, ``cow_copies``, ``revived``...);
        ``prefix_cache`` (``hit_tokens`` of ``query_tokens``).
        """
        return global_stats(self.counters, self._seqs, self.pool, self.config, self._policy().value)

    def check_invariants(self) -> None:
        """Assert the pool's book-keeping matches the block tables (for tests)."""
        self.pool.check_invariants(seq.blocks for seq in self._seqs.values())

    def __repr__(self) -> str:
        return (f"AdvancedKVCache(sequences={len(self._seqs)}, "
                f"used_blocks={self.pool.num_used}/{self.pool.max_blocks}, "
                f"block_size={self.config.block_size}, policy={self._policy().value}, "
                f"allocated={self.pool.allocated_bytes / 2**20:.2f} MiB of {self.config.memory_limit_mb} MiB)")
