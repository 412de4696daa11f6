"""``FixedShapeKVCache``: a static cache whose decode writes suit ``torch.compile`` and CUDA graphs.

Why another static cache?  :class:`~kv_cache.StaticKVCache` already preallocates, but its
``update`` is written for readability and safety: it checks shapes, reads the write position
back to the host (``int(cache_position)``), keeps Python-side lengths and returns a view
``[..., :length, ...]`` whose shape grows by one every step.  Each of those is harmless in an
eager loop and fatal to a compiled one:

* a host read of a device tensor stalls the GPU once per step (and breaks CUDA-graph capture);
* a shape that changes every step makes ``torch.compile`` recompile (or go dynamic), and a
  CUDA graph replays one fixed set of shapes only;
* Python state mutated inside a traced function becomes a guard that fails on the next step.

:meth:`FixedShapeKVCache.write` does the decode write the way gpt-fast does it: ``index_copy_``
at a *tensor* position (no host read, no Python state) and it returns the **whole** buffers,
``(B, H_kv, max_cache_len, D)``, every time.  A model's forward pass meets it through
:meth:`FixedShapeKVCache.slots_view`: a :class:`SlotView` whose ``update`` is that write and
whose ``key_positions`` say slot ``j`` holds position ``j``, so the model's one mask builder
hides the slots after each query (empty, or left from an earlier sequence) by causality alone.
Reading the unused slots costs memory bandwidth proportional to the slots read instead of the
current length -- size the cache (or the view's ``kv_len``) to what you will generate.

The class *is* a :class:`~kv_cache.StaticKVCache` (``update``, ``rollback``, ``crop``,
``reorder_cache``... all work), so the same object can be used by ordinary code; after a run of
``write`` calls, :meth:`set_seq_length` tells the host-side bookkeeping how far the cache is
filled, and ``rollback(n)`` moves that host-side length back (O(1), nothing on the device: the
speculative-decoding drafter's undo).  ``write`` and :class:`SlotView` speak in *slots*, which
equal positions as long as nothing was ``crop``'ped from the front; after ``crop`` (keep the most
recent tokens, which moves them to slot 0) slot = position - ``first_position()``, and
``set_seq_length`` refuses to run until ``reset()``.

The buffers are marked as *static addresses* for ``torch.compile``: a CUDA graph that writes
into them in place may then be captured and replayed (CUDA-graph trees refuse to capture
in-place writes to ordinary graph inputs).  This module knows no model.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .static import StaticKVCache

Tensor = torch.Tensor


def _mark_static(t: Tensor) -> None:
    """Tell ``torch.compile`` that ``t`` keeps its address (like a module buffer); no-op without dynamo."""
    try:
        import torch._dynamo as dynamo
    except Exception:  # noqa: BLE001 -- torch builds without dynamo: nothing to mark
        return
    mark = getattr(dynamo, "mark_static_address", None)
    if mark is not None:
        mark(t)


class FixedShapeKVCache(StaticKVCache):
    """A :class:`StaticKVCache` with a sync-free, fixed-shape decode write (:meth:`write`).

    Args: exactly those of :class:`StaticKVCache` (``max_cache_len``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``head_dim``, ``max_batch_size``, ``dtype``, ``device``,
    ``layout``).  Storage: ``2 * num_layers`` buffers of ``max_batch_size * num_kv_heads *
    max_cache_len * head_dim`` elements, allocated once.

    Example (one decode step of layer 0 at slot 7, no host read anywhere)::

        cache = FixedShapeKVCache(max_cache_len=64, num_layers=2, num_heads=4, head_dim=16)
        pos = torch.tensor([7])
        k, v = cache.write(0, torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), pos)
        k.shape                                # (1, 4, 64, 16): always the whole buffer
        view = cache.slots_view(kv_len=8)      # what a model's forward is handed in a step
        view.key_positions(0)                  # tensor([0, 1, ..., 7]): slot = position
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for t in self.keys + self.values:
            _mark_static(t)
        self.slots = torch.arange(self.max_cache_len, device=self.device)  # (max_cache_len,): slot j holds position j

    def slots_view(self, kv_len: Optional[int] = None) -> "SlotView":
        """This cache as a model's forward pass sees it during a fixed-shape step: a
        :class:`SlotView` over the first ``kv_len`` slots (default all ``max_cache_len``).

        ``kv_len`` may be a Python int that changes every step (``torch.compile`` makes it a
        symbolic size) or left ``None`` for the fixed shapes a CUDA graph replays.  The caller
        guarantees every slot a query reads lies below ``kv_len``.  Cost: nothing (a view)."""
        return SlotView(self, self.max_cache_len if kv_len is None else kv_len)

    def write(self, layer_idx: int, key: Tensor, value: Tensor, cache_position: Tensor) -> Tuple[Tensor, Tensor]:
        """Copy ``key``/``value`` into ``layer_idx`` at slots ``cache_position``; return the full buffers.

        Shapes: ``key``/``value`` ``(max_batch_size, num_kv_heads, S, head_dim)`` ("bhsd") or
        ``(max_batch_size, S, num_kv_heads, head_dim)`` ("bshd") in the cache's dtype;
        ``cache_position`` a 1-D long tensor of ``S`` slots on the cache's device, the same for
        every row.  Returns ``(keys, values)``, each the whole ``max_cache_len``-slot buffer.

        Cost: one ``index_copy_`` of the ``S`` new tokens per tensor.  No checks, no host read,
        no Python state changes: the point is that this can be traced and captured.  Slots
        past ``max_cache_len`` are an indexing error on the device (not a friendly exception),
        so check the capacity before a run (the caller knows how many steps it will take).
        """
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(self._sd, cache_position, key)
        v.index_copy_(self._sd, cache_position, value)
        return k, v

    def set_seq_length(self, length: int, batch_size: Optional[int] = None) -> None:
        """Host bookkeeping after a run of :meth:`write` calls: every layer now holds ``length``
        slots of ``batch_size`` rows (default ``max_batch_size``), so that ``get_seq_length``,
        ``get``, ``rollback`` and the batch methods see them.  O(num_layers).

        Slots are positions here, so a cache whose front was ``crop``'ped (slot 0 no longer
        holds position 0) is refused: ``reset()`` it first."""
        if any(self._offsets):
            raise ValueError(f"set_seq_length({length!r}) treats slots as positions, but crop() dropped the first "
                             f"{self._offsets} position(s) per layer; expected an uncropped cache (call reset() first)")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.max_cache_len:
            raise ValueError(f"length must be an int in [0, max_cache_len={self.max_cache_len}], got {length!r}")
        batch_size = self.max_batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size must be an int in [1, max_batch_size={self.max_batch_size}], "
                             f"got {batch_size!r}")
        self._lengths = [length] * self.num_layers
        self._batch = batch_size if length else None


class SlotView:
    """A :class:`FixedShapeKVCache` as a model's forward pass sees it during one fixed-shape step.

    It answers the questions a forward pass asks a ``Cache`` (see :class:`~kv_cache.Cache`):

    * ``update(key, value, layer_idx, cache_position)`` writes the new tokens at the *tensor*
      slots ``cache_position`` (:meth:`FixedShapeKVCache.write`: no host read) and returns the
      first ``kv_len`` slots, ``(B, H_kv, kv_len, D)`` ("bhsd");
    * ``key_positions(layer_idx)`` is ``arange(kv_len)``: slot ``j`` holds position ``j``.  The
      model's causal mask (key position <= query position) hides the slots after each query's
      own, which are empty or hold tokens of an earlier sequence;
    * ``retention_mask`` and ``rotary_offsets`` are ``None``: every token is kept, exactly.

    There is no host-side length: ``get_seq_length`` raises, so a model must be given
    ``cache_position`` (the slots) as a tensor.  Host bookkeeping after a run of steps is
    :meth:`FixedShapeKVCache.set_seq_length`.  Cost: one ``index_copy_`` per key/value tensor
    and layer; the positions tensor is shared by every layer (one mask per forward).
    """

    is_lossless = True
    positions_in_cache = False

    def __init__(self, cache: FixedShapeKVCache, kv_len):
        self.cache, self.kv_len, self.layout = cache, kv_len, cache.layout
        self.positions = cache.slots[:kv_len]  # (kv_len,), one tensor for every layer

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_position: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Write ``key``/``value`` at slots ``cache_position`` (a 1-D tensor); return the first
        ``kv_len`` slots of the layer's keys and values."""
        if cache_position is None:
            raise ValueError("a SlotView is written at tensor slots: pass cache_position (a 1-D long tensor), got None")
        k, v = self.cache.write(layer_idx, key, value, cache_position)
        sd = self.cache._sd
        return k.narrow(sd, 0, self.kv_len), v.narrow(sd, 0, self.kv_len)

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """``(kv_len,)`` positions of the returned keys: slot = position (the same tensor for
        every layer)."""
        return self.positions

    def retention_mask(self, query_positions: Tensor, key_positions: Tensor) -> None:
        """``None``: the cache keeps every token; causality alone decides."""
        return None

    def rotary_offsets(self, layer_idx: int) -> None:
        """``None``: keys are rotated at their absolute position before :meth:`update`."""
        return None

    def get_max_cache_shape(self) -> int:
        """Slots a step reads: ``kv_len``."""
        return self.kv_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise ValueError("a SlotView has no host-side length (a step must not read one back); pass "
                         "cache_position, the slots of the new tokens, as a tensor")
