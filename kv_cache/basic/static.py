"""``StaticKVCache``: all memory allocated up front; ``SubStaticCache``: a slice of it.

A static cache reserves, at construction, one buffer per layer for keys and one for values, each
big enough for ``max_batch_size`` rows of ``max_cache_len`` tokens.  After that it never
allocates: an ``update`` copies the new tokens into their slots, ``reorder_cache`` gathers rows
back into the same memory, ``reset`` only forgets lengths.  What you get for the wasted room:

* memory use is known before the first token (no out-of-memory surprise at token 3000);
* buffer addresses never change, which is what CUDA graphs / ``torch.compile`` need;
* one big pool can be carved into per-request slices (:class:`SubStaticCache`).

Grouped-query attention (GQA).  A model with ``num_heads`` query heads and ``num_kv_heads``
key/value heads (``num_heads % num_kv_heads == 0``) lets each key/value head serve
``num_heads // num_kv_heads`` query heads.  The cache stores only the ``num_kv_heads`` heads
-- that is the whole memory saving of GQA -- and records ``num_heads`` so it can report the
repeat factor :attr:`StaticKVCache.num_key_value_groups` (attention broadcasts the groups,
e.g. ``scaled_dot_product_attention(..., enable_gqa=True)``, without copying the cache).

Memory: ``2 * num_layers * max_batch_size * num_kv_heads * max_cache_len * head_dim`` elements
(keys in ``k_dtype``, values in ``v_dtype``), reported exactly by ``memory_bytes()``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import CacheCapacityError
from ..validate import layer_index, non_negative_int, positive_int
from .base import BufferedCache, head_dim_of


def _dtype(name: str, value) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float16), got {value!r}")
    return value


class StaticKVCache(BufferedCache):
    """A KV cache with fixed, preallocated storage: ``max_batch_size`` rows x ``max_cache_len`` tokens.

    Args (keyword-only):
        max_cache_len: tokens each layer can hold (the sequence capacity).
        num_layers: number of attention layers; ``layer_idx`` must be in ``[0, num_layers)``.
        num_heads: query heads of the model (recorded for :attr:`num_key_value_groups`).
        num_kv_heads: key/value heads actually stored (default ``num_heads``, i.e. no GQA).
        head_dim: size of each key/value head vector.
        max_batch_size: rows reserved; an update may use any ``B <= max_batch_size`` (rows
            ``[0, B)`` of the storage).
        k_dtype, v_dtype: storage dtypes of keys and values (default ``dtype``).  Inputs must
            match exactly: the cache never casts silently.
        dtype: default for ``k_dtype``/``v_dtype``.
        device: where the buffers live (default CPU); inputs must be on the same device.
        layout: ``"bhsd"`` -> buffers ``(max_batch_size, num_kv_heads, max_cache_len, head_dim)``;
            ``"bshd"`` (FlashAttention) -> ``(max_batch_size, max_cache_len, num_kv_heads, head_dim)``.

    Costs: construction allocates (and zeroes) all memory once; ``update`` copies only the new
    tokens and returns views (no allocation); ``reorder_cache``/``batch_select_indices``/
    ``batch_repeat_interleave`` gather the used part into the same storage; ``rollback`` and
    ``reset`` are O(1); ``crop(n)`` (keep the most recent ``n`` tokens) copies the ``n`` kept
    tokens to the front, freeing slots for positions beyond ``max_cache_len``.  Holding more than
    ``max_cache_len`` tokens raises :class:`CacheCapacityError`.

    Example::

        cache = StaticKVCache(max_cache_len=128, num_layers=2, num_heads=8, num_kv_heads=2,
                              head_dim=16, max_batch_size=4)
        k, v = cache.update(torch.randn(4, 2, 5, 16), torch.randn(4, 2, 5, 16), layer_idx=0)
        k.shape                      # (4, 2, 5, 16): a view of the first 5 slots
        cache.num_key_value_groups   # 4 query heads share each stored key/value head
    """

    def __init__(self, *, max_cache_len: int, num_layers: int, num_heads: int,
                 num_kv_heads: Optional[int] = None, head_dim: int, max_batch_size: int = 1,
                 k_dtype: Optional[torch.dtype] = None, v_dtype: Optional[torch.dtype] = None,
                 dtype: torch.dtype = torch.float32, device=None, layout: str = "bhsd"):
        super().__init__(layout)
        positive_int("max_cache_len", max_cache_len)
        positive_int("num_layers", num_layers)
        positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}: in grouped-query "
                f"attention each key/value head serves num_heads // num_kv_heads query heads"
            )
        positive_int("head_dim", head_dim)
        positive_int("max_batch_size", max_batch_size)
        _dtype("dtype", dtype)
        self._config = dict(
            max_cache_len=max_cache_len, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, max_batch_size=max_batch_size,
            k_dtype=_dtype("k_dtype", dtype if k_dtype is None else k_dtype),
            v_dtype=_dtype("v_dtype", dtype if v_dtype is None else v_dtype),
        )
        device = torch.device("cpu") if device is None else torch.device(device)
        if self.layout == "bhsd":
            shape = (max_batch_size, num_kv_heads, max_cache_len, head_dim)
        else:
            shape = (max_batch_size, max_cache_len, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=self.k_dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=self.v_dtype, device=device) for _ in range(num_layers)]
        self._lengths = [0] * num_layers
        self._offsets = [0] * num_layers

    # ------------------------------------------------------------------ configuration
    max_cache_len = property(lambda self: self._config["max_cache_len"], doc="Tokens per layer (capacity).")
    num_layers = property(lambda self: self._config["num_layers"], doc="Number of layers stored.")
    num_heads = property(lambda self: self._config["num_heads"], doc="Query heads of the model.")
    num_kv_heads = property(lambda self: self._config["num_kv_heads"], doc="Key/value heads stored.")
    head_dim = property(lambda self: self._config["head_dim"], doc="Size of one head vector.")
    max_batch_size = property(lambda self: self._config["max_batch_size"], doc="Rows reserved.")
    k_dtype = property(lambda self: self._config["k_dtype"], doc="Storage dtype of keys.")
    v_dtype = property(lambda self: self._config["v_dtype"], doc="Storage dtype of values.")

    @property
    def num_key_value_groups(self) -> int:
        """GQA repeat factor ``num_heads // num_kv_heads``: query heads per stored key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def device(self) -> torch.device:
        """Device of the storage; ``update`` inputs must live here."""
        return self.keys[0].device

    def get_max_cache_shape(self) -> int:
        """The capacity in tokens per layer: ``max_cache_len``."""
        return self.max_cache_len

    # ------------------------------------------------------------------ Cache API
    def _check_layer(self, layer_idx) -> None:
        layer_index(layer_idx, self.num_layers)

    def update(self, key, value, layer_idx, cache_position=None):
        """Write ``key``/``value`` at ``cache_position`` into ``layer_idx``; return the layer's views.

        Shapes: ``(B, num_kv_heads, S, head_dim)`` ("bhsd") or ``(B, S, num_kv_heads, head_dim)``
        ("bshd") with ``B <= max_batch_size``; keys in ``k_dtype``, values in ``v_dtype``.
        Returns views ``[:B, ..., :length, ...]`` of the storage, valid until the next change.
        Cost: one copy of the ``S`` new tokens; no allocation.
        """
        self._check_layer(layer_idx)
        return super().update(key, value, layer_idx, cache_position)

    def _check_compatible(self, layer_idx, key, value):
        hd = head_dim_of(self.layout)
        for name, t, want_dtype, dname in (("key", key, self.k_dtype, "k_dtype"),
                                           ("value", value, self.v_dtype, "v_dtype")):
            where = f"{name} for layer {layer_idx} (shape {tuple(t.shape)}, {self.layout} layout)"
            if t.shape[0] > self.max_batch_size:
                raise CacheCapacityError(
                    f"{where} has batch size {t.shape[0]}, expected at most max_batch_size={self.max_batch_size}")
            if t.shape[hd] != self.num_kv_heads:
                hint = (f"; it looks like the num_heads={self.num_heads} query heads -- a GQA cache stores "
                        f"only the key/value heads" if t.shape[hd] == self.num_heads else "")
                raise ValueError(f"{where} has {t.shape[hd]} heads, expected num_kv_heads={self.num_kv_heads}{hint}")
            if t.shape[3] != self.head_dim:
                raise ValueError(f"{where} has head dim {t.shape[3]}, expected head_dim={self.head_dim}")
            if t.dtype != want_dtype:
                raise ValueError(f"{where} has dtype {t.dtype}, expected {dname}={want_dtype} (cast it first; "
                                f"the cache does not convert silently)")
            if t.device != self.device:
                raise ValueError(f"{where} is on device {t.device}, expected the cache's device {self.device}")

    def _ensure_capacity(self, layer_idx, key, value, needed):
        if needed > self.max_cache_len:
            n, s, off = self._lengths[layer_idx], key.shape[self._sd], self._offsets[layer_idx]
            held = f" (positions {off}..)" if off else ""
            raise CacheCapacityError(
                f"layer {layer_idx}: current length {n}{held}, {s} new token(s) reaching position {off + needed - 1} "
                f"need {needed} slots, but the capacity is max_cache_len={self.max_cache_len}; build a larger "
                f"cache, crop() it (keep the most recent tokens), or use DynamicKVCache"
            )

    def get(self, layer_idx):
        """The ``(keys, values)`` views of ``layer_idx`` (``None`` if it holds no token)."""
        self._check_layer(layer_idx)
        return super().get(layer_idx)

    def get_seq_length(self, layer_idx=0):
        """Position of the next token of ``layer_idx``: tokens stored plus any dropped by ``crop``."""
        self._check_layer(layer_idx)
        return self._offsets[layer_idx] + self._lengths[layer_idx]

    def _check_rows(self, new_batch: int, what: str) -> None:
        if new_batch > self.max_batch_size:
            raise CacheCapacityError(
                f"{what} would give {new_batch} rows (from {self._batch}), but max_batch_size={self.max_batch_size}")

    def batch_select_indices(self, indices):
        """Keep rows ``indices`` (in order) by gathering them into the same storage. O(used part)."""
        n = torch.as_tensor(indices).numel()
        if self._batch is not None:
            self._check_rows(n, f"batch_select_indices with {n} indices")
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats):
        """Repeat each row ``repeats`` times in place; ``B * repeats`` must fit ``max_batch_size``."""
        positive_int("repeats", repeats)
        if self._batch is not None:
            self._check_rows(self._batch * repeats, f"batch_repeat_interleave({repeats})")
        super().batch_repeat_interleave(repeats)

    def _rebatch(self, fn, new_batch):
        self._check_rows(new_batch, "this batch change")
        for l, n in enumerate(self._lengths):
            if n == 0:
                continue  # nothing visible; later writes clear what they expose
            for store in (self.keys, self.values):
                gathered = fn(store[l].narrow(0, 0, self._batch).narrow(self._sd, 0, n))  # a new tensor
                store[l].narrow(0, 0, new_batch).narrow(self._sd, 0, n).copy_(gathered)
        self._batch = new_batch

    def reset(self):
        """Forget every token and any crop offset; the storage (and its address) is kept.  O(1).

        Old values stay in memory but are never visible: a later write that leaves a hole past a
        layer's length zeroes that hole first (see ``BufferedCache.update``).
        """
        self._lengths = [0] * self.num_layers
        self._batch = None
        self._forget_crop()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(max_cache_len={self.max_cache_len}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, max_batch_size={self.max_batch_size}, "
                f"batch={self._batch}, lengths={self._lengths}, layout={self.layout!r}, bytes={self.memory_bytes()})")


class SubStaticCache(StaticKVCache):
    """Batch rows ``[start_idx, start_idx + length)`` of a :class:`StaticKVCache`, used as a cache.

    The buffers are views (``narrow``) of the parent's storage, so every write lands in the
    parent's memory: one preallocated pool can serve several requests at once, each with its
    own sub-cache.  Each sub-cache keeps its *own* per-layer lengths (each request has its own
    sequence) and implements the whole ``Cache`` interface over its rows only:
    ``batch_select_indices`` / ``batch_repeat_interleave`` may use at most ``length`` rows.

    It owns no memory: ``memory_bytes()`` reports the bytes of its slice of the parent.  Use the
    parent only as the pool (its own lengths do not see the sub-caches' writes).

    Example::

        pool = StaticKVCache(max_cache_len=256, num_layers=2, num_heads=4, head_dim=16, max_batch_size=8)
        req_a = SubStaticCache(pool, start_idx=0, length=2)    # rows 0-1
        req_b = SubStaticCache(pool, start_idx=2, length=6)    # rows 2-7
    """

    def __init__(self, parent: StaticKVCache, start_idx: int, length: int):
        if not isinstance(parent, StaticKVCache):
            raise TypeError(f"parent must be a StaticKVCache, got {type(parent).__name__}")
        non_negative_int("start_idx", start_idx)
        positive_int("length", length)
        if start_idx + length > parent.max_batch_size:
            raise ValueError(
                f"start_idx={start_idx} + length={length} = {start_idx + length} rows exceeds the parent's "
                f"max_batch_size={parent.max_batch_size}"
            )
        BufferedCache.__init__(self, parent.layout)
        self.parent, self.start_idx, self.length = parent, start_idx, length
        self._config = dict(parent._config, max_batch_size=length)
        self.keys = [k.narrow(0, start_idx, length) for k in parent.keys]
        self.values = [v.narrow(0, start_idx, length) for v in parent.values]
        self._lengths = [0] * self.num_layers
        self._offsets = [0] * self.num_layers

    def memory_bytes(self):
        """Bytes of the parent's storage this slice covers (it allocates none of its own)."""
        return super().memory_bytes()

    def __repr__(self) -> str:
        return (f"SubStaticCache(rows={self.start_idx}..{self.start_idx + self.length - 1} of "
                f"{self.parent.max_batch_size}, batch={self._batch}, lengths={self._lengths}, "
                f"bytes={self.memory_bytes()})")
