"""``DynamicKVCache``: a cache that grows as tokens arrive, with amortised O(1) appends.

The naive dynamic cache does ``keys = torch.cat([keys, new], dim=seq)`` at every step.  That
copies the whole history each time, so appending token ``t`` costs ``O(t)`` and a generation of
``n`` tokens costs ``O(n^2)`` bytes moved -- the very cost the cache exists to remove.

Here each layer owns a buffer with spare room.  An append copies only the new token into the
spare room; when the room runs out the buffer is reallocated at ``growth_factor`` times the
needed size (doubling by default) and the old contents are copied once.  Over ``n`` appends
the total copy work is ``O(n)`` (a geometric series), i.e. ``O(1)`` per token on average --
the same trick as Python lists and C++ ``std::vector``.  The price is up to ``growth_factor``
times more memory than strictly needed; ``memory_bytes()`` reports what is really allocated.
"""

from __future__ import annotations

import math

import torch

from ..validate import positive_int
from .base import BufferedCache


class DynamicKVCache(BufferedCache):
    """A KV cache with no fixed capacity, grown geometrically per layer.

    Args:
        layout: ``"bhsd"`` (default) or ``"bshd"``; the layout of tensors given to and
            returned by :meth:`update`.
        initial_capacity: tokens allocated on a layer's first write (at least the prompt).
        growth_factor: capacity multiplier when a layer's buffer is full (> 1).

    dtype and device are taken from the first tensors written, per layer; keys and values may
    have different dtypes and head dims.

    Example::

        cache = DynamicKVCache()
        k, v = cache.update(torch.randn(2, 8, 5, 64), torch.randn(2, 8, 5, 64), layer_idx=0)
        k.shape                    # (2, 8, 5, 64)
        cache.get_seq_length(0)    # 5
    """

    def __init__(self, layout: str = "bhsd", initial_capacity: int = 64, growth_factor: float = 2.0):
        super().__init__(layout)
        positive_int("initial_capacity", initial_capacity)
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        self.initial_capacity = initial_capacity
        self.growth_factor = float(growth_factor)

    def _ensure_capacity(self, layer_idx, key, value, needed):
        cap = self._capacity(layer_idx)
        if needed <= cap and key.shape[0] <= self.keys[layer_idx].shape[0]:
            return
        new_cap = max(needed, self.initial_capacity)
        if cap:
            new_cap = max(new_cap, math.ceil(cap * self.growth_factor))
        batch = key.shape[0]
        for store, new in ((self.keys, key), (self.values, value)):
            shape = list(new.shape)
            shape[0] = batch
            shape[self._sd] = new_cap
            # empty, not zeros: slots past the length are never visible (holes are zeroed on write)
            buf = torch.empty(shape, dtype=new.dtype, device=new.device)
            old = store[layer_idx]
            n = self._lengths[layer_idx]
            if old is not None and n:
                buf.narrow(self._sd, 0, n).copy_(old.narrow(0, 0, batch).narrow(self._sd, 0, n))
            store[layer_idx] = buf

    def _check_compatible(self, layer_idx, key, value):
        super()._check_compatible(layer_idx, key, value)
        buf = self.keys[layer_idx]
        if buf is not None and (key.dtype != buf.dtype or value.dtype != self.values[layer_idx].dtype):
            raise ValueError(
                f"key/value for layer {layer_idx} have dtypes {key.dtype}/{value.dtype}, but the layer "
                f"stores {buf.dtype}/{self.values[layer_idx].dtype}"
            )

    def _rebatch(self, fn, new_batch):
        for l in range(len(self.keys)):
            if self.keys[l] is None or self._lengths[l] == 0:
                # An empty layer may still hold rows of an older batch (the batch can change once
                # every layer is empty); nothing is visible, and its next write re-sizes it.
                continue
            for store in (self.keys, self.values):
                used = store[l].narrow(0, 0, self._batch)
                # keep the spare capacity so that the next appends stay O(1)
                store[l] = fn(used).contiguous()
        self._batch = new_batch

    def reset(self):
        """Free every buffer and forget any crop offset; the next update starts from scratch."""
        self.keys, self.values, self._lengths, self._batch = [], [], [], None
        self._forget_crop()
