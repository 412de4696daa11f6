"""``PagedCacheView``: a batch of sequences of an ``AdvancedKVCache``, seen through the ``Cache`` API.

Models in this project talk to a cache through one interface (:class:`~kv_cache.basic.base.Cache`:
``update(key, value, layer_idx) -> (keys, values)``...).  A view maps batch row ``i`` to
sequence ``sequence_ids[i]`` of a shared paged pool, so ``generate()`` -- or any model that
accepts a ``Cache`` -- decodes into the pool without knowing it is paged::

    manager = AdvancedKVCache(config)
    view = PagedCacheView(manager, ["alice", "bob", "carol"])
    generate(model, input_ids, 32, cache_implementation=view, attention_mask=mask)

``update`` appends row ``i``'s new tokens to its sequence (allocating blocks on demand) and
returns the rows' whole history gathered into ``(B, H_kv, L, D)`` ("bhsd") or ``(B, L, H_kv,
D)`` ("bshd").  Ragged prompts arrive left padded; the pad tokens are stored like any token and
the model's attention mask hides them, so every row gets exactly the tokens it gets alone.

The view *owns* its sequences: it pins them (the eviction policy never touches a pinned
sequence, so a running batch cannot lose tokens), ``batch_select_indices`` frees rows it drops,
and a duplicated row becomes a fork (``batch_repeat_interleave`` for beam search costs no copy:
the rows share blocks until they diverge).  ``close()`` (or leaving a ``with`` block) unpins
them; ``close(free=True)`` also frees them.
"""

from __future__ import annotations

import itertools
from typing import Hashable, List, Optional, Sequence

import torch

from ..basic.base import Cache, as_index, check_kv_pair, check_layout
from ..validate import layer_index, positive_int
from .advanced import AdvancedKVCache

Tensor = torch.Tensor


class PagedCacheView(Cache):
    """Batch rows over sequences of a shared :class:`~kv_cache.paged.advanced.AdvancedKVCache`.

    Args:
        manager: the pool.
        sequence_ids: one id per batch row; ids not held yet are added (empty), held ones are
            used as they are (e.g. after ``add_sequence(id, token_ids)`` found a cached prefix).
            An id the pool *evicted* raises :class:`~kv_cache.errors.EvictedSequenceError`:
            the view would continue it from an empty cache and the model would decode without
            its context.  Re-prefill it deliberately (``manager.clear_sequence(id)`` or
            ``manager.add_sequence(id, ...)``, then feed the whole sequence).
        layout: ``"bhsd"`` (default) or ``"bshd"``, as for every cache.

    Cost per ``update``: ``B`` block-table writes of the new tokens plus one gather of ``B * L``
    tokens (a paged cache copies the history on every read -- the price of not being
    contiguous; fused paged-attention kernels read the blocks in place instead).
    """

    is_lossless = True

    def __init__(self, manager: AdvancedKVCache, sequence_ids: Sequence[Hashable], layout: str = "bhsd"):
        if not isinstance(manager, AdvancedKVCache):
            raise TypeError(f"manager must be an AdvancedKVCache, got {type(manager).__name__}")
        self.layout = check_layout(layout)
        self.manager = manager
        ids = list(sequence_ids)
        if not ids:
            raise ValueError("sequence_ids must name at least one sequence (one per batch row)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"sequence_ids {ids} repeat an id; each batch row needs its own sequence")
        for sid in ids:  # refuse every evicted row before touching any
            if manager.was_evicted(sid):
                raise manager._evicted_error(sid)
        for sid in ids:
            if sid not in manager:
                manager.add_sequence(sid)
            if manager.sequence_info(sid)["start"] > 0:
                raise ValueError(f"sequence_id={sid!r} lost its first tokens to the sliding window; a view needs "
                                 f"complete sequences")
            manager.pin(sid)
        self._ids: List[Hashable] = ids
        self._fork_counter = itertools.count(1)
        self._closed = False

    @property
    def sequence_ids(self) -> List[Hashable]:
        """The sequence of each batch row, in row order."""
        return list(self._ids)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this PagedCacheView was closed; make a new view")

    def _check_layer(self, layer_idx) -> None:
        layer_index(layer_idx, self.manager.config.num_layers)

    # ------------------------------------------------------------------ Cache API
    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_position: Optional[Tensor] = None):
        """Append each row's new tokens to its sequence; return all rows' keys/values.

        ``key``/``value``: ``(B, H_kv, S, D)`` ("bhsd") or ``(B, S, H_kv, D)`` ("bshd") with ``B
        == len(sequence_ids)``.  ``cache_position`` must be ``None`` or name the append
        positions ``L..L+S-1`` (a paged view only appends).  Returns new tensors ``(B, H_kv,
        L+S, D)`` / ``(B, L+S, H_kv, D)``.
        """
        self._check_open()
        self._check_layer(layer_idx)
        check_kv_pair(key, value, layer_idx)
        if key.shape[0] != len(self._ids):
            raise ValueError(f"key for layer {layer_idx} has batch size {key.shape[0]}, but this view has "
                             f"{len(self._ids)} rows (sequence_ids={self._ids})")
        if self.layout == "bhsd":
            key, value = key.transpose(1, 2), value.transpose(1, 2)
        self._check_append_position(cache_position, layer_idx, key.shape[1])
        k, v = self.manager.append_and_gather(layer_idx, self._ids, key, value)  # (B, L, H, D)
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.layout == "bhsd" else (k, v)

    def _check_append_position(self, cache_position, layer_idx: int, seq: int) -> None:
        if cache_position is None:
            return
        past = self.get_seq_length(layer_idx)
        pos = torch.as_tensor(cache_position).long().cpu()
        want = torch.arange(past, past + seq)
        ok = (pos.dim() == 0 and seq == 1 and int(pos) == past) or (pos.dim() == 1 and torch.equal(pos, want)) or \
            (pos.dim() == 2 and pos.shape[1] == seq and bool((pos == want).all()))
        if not ok:
            raise ValueError(f"cache_position={pos.tolist()} does not append at {past}..{past + seq - 1}; "
                             f"a PagedCacheView only appends (use rollback() first)")

    def get(self, layer_idx: int):
        """All rows' ``(keys, values)`` of ``layer_idx`` in the view's layout, or ``None`` if empty."""
        self._check_open()
        self._check_layer(layer_idx)
        if self.get_seq_length(layer_idx) == 0:
            return None
        k, v = self.manager.gather(layer_idx, self._ids)
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.layout == "bhsd" else (k, v)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored per row in ``layer_idx`` (rows always have equal lengths)."""
        self._check_layer(layer_idx)
        lengths = {self.manager.sequence_length(sid, layer_idx) for sid in self._ids}
        if len(lengths) > 1:
            raise ValueError(f"the rows of this view hold different lengths {sorted(lengths)} in layer {layer_idx}; "
                             f"a batch needs equal lengths (crop the sequences first)")
        return lengths.pop()

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """Positions ``(L,)`` of the keys ``update`` returns: ``arange(L)`` (complete sequences,
        slot = position, ``in_cache`` changes nothing).  Cost: ``O(L)`` integers, no gather."""
        return self._arange_positions(0, self.get_seq_length(layer_idx), self.manager.device)

    def get_max_cache_shape(self) -> int:
        """``max_sequence_length`` of the manager's config."""
        return self.manager.config.max_sequence_length

    def batch_select_indices(self, indices) -> None:
        """Keep rows ``indices`` in order: dropped sequences are freed, a repeated row is forked."""
        self._check_open()
        idx = as_index(indices, "indices", len(self._ids), "cpu").tolist()
        new_ids, seen = [], set()
        for i in idx:
            sid = self._ids[i]
            if sid in seen:  # a second row of the same sequence: an independent copy (shares blocks)
                child = self._new_fork_id(sid)
                self.manager.fork_sequence(sid, child)
                self.manager.pin(child)
                sid = child
            seen.add(self._ids[i])
            new_ids.append(sid)
        for sid in self._ids:
            if sid not in seen:
                self.manager.unpin(sid)
                self.manager.clear_sequence(sid)
        self._ids = new_ids

    def _new_fork_id(self, sid):
        while True:
            child = f"{sid}/fork{next(self._fork_counter)}" if isinstance(sid, str) else (sid, "fork",
                                                                                            next(self._fork_counter))
            if child not in self.manager:
                return child

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (``B -> B * repeats``) by forking: no data is copied."""
        positive_int("repeats", repeats)
        self.batch_select_indices([i for i in range(len(self._ids)) for _ in range(repeats)])

    def crop(self, max_length: int) -> None:
        """Refused unless it is a no-op: a view serves complete sequences (slot = position from 0),
        so it cannot keep only "the ``max_length`` most recent tokens".

        ``crop(n)`` with ``n`` >= the tokens held changes nothing; a smaller ``n`` raises
        ``ValueError`` naming what to use instead: ``rollback`` to undo the newest tokens, or the
        manager's sliding window (``CacheConfig``) to bound a sequence's memory.
        """
        self._check_open()
        keep = self._crop_count(max_length)
        for layer_idx in range(self.manager.config.num_layers):
            n = self.get_seq_length(layer_idx)
            if n > keep:
                raise ValueError(
                    f"crop({max_length}): layer {layer_idx} of this PagedCacheView holds {n} tokens per row, and a view "
                    f"serves complete sequences only, so it cannot keep just the {max_length} most recent; expected "
                    f"max_length >= {n}. Use rollback({max_length}) to keep the first {max_length} tokens, or the "
                    f"AdvancedKVCache's sliding window to bound memory")

    def rollback(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens of every row (negative: drop from the end)."""
        self._check_open()
        for sid in self._ids:
            self.manager.crop_sequence(sid, max_length)

    def reset(self) -> None:
        """Forget every token of every row (the sequences stay, empty and pinned)."""
        self.rollback(0)

    def memory_bytes(self) -> int:
        """Bytes of the blocks this view's rows hold (a block shared by two rows counted once)."""
        blocks = {b for sid in self._ids for b in self.manager.block_table(sid) if b is not None}
        return len(blocks) * self.manager.pool.block_bytes

    def close(self, free: bool = False) -> None:
        """Unpin the rows (they may be evicted again); with ``free=True`` also free them."""
        if self._closed:
            return
        for sid in self._ids:
            self.manager.unpin(sid)
            if free:
                self.manager.clear_sequence(sid)
        self._closed = True

    def __enter__(self) -> "PagedCacheView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PagedCacheView(rows={self._ids}, layout={self.layout!r}, manager={self.manager!r})"
