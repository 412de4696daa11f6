"""``KVCache``: a hand-driven cache for encoder-decoder models, addressed by explicit positions.

The ``Cache`` classes decide *where* new tokens go (append, or ``cache_position``).  Some code
prefers to say it explicitly: "layer 3, self-attention, after these keys it holds 10 tokens".
``KVCache`` is that manual interface.  Underneath it is two :class:`StaticKVCache` objects
(``self_cache`` for decoder self-attention, ``cross_cache`` for cross-attention over the
encoder output), created by :meth:`KVCache.initialize_cache` once the batch size is known.

The meaning of ``seq_len`` (the one thing to get right):

* ``update_cache(layer_idx, attention_type, k, v, seq_len)``: ``seq_len`` is the length of
  that layer and attention type *after* this write.  ``k``/``v`` ``(batch, num_heads, s, d_k)``
  land at positions ``[seq_len - s, seq_len)``; the layer then holds exactly ``seq_len`` tokens
  (anything stored at or after ``seq_len - s`` is replaced or discarded, so a ``seq_len``
  smaller than ``stored + s`` rolls back), and the call returns all of them:
  ``(batch, num_heads, seq_len, d_k)``.  So a 10-token prompt into an empty cache is
  ``seq_len=10``, and one more token is ``seq_len=11``.  Errors name ``seq_len``, the value
  and the allowed range: ``seq_len < s`` (the new tokens do not fit), ``seq_len - s > stored``
  (a hole before the new tokens), ``seq_len > max_seq_len`` (:class:`CacheCapacityError`).
* ``get_cached_kv(layer_idx, attention_type, seq_len)``: ``seq_len`` is how many tokens to
  return, from position 0: ``(batch, num_heads, seq_len, d_k)``; ``None`` returns all of them.
  More than stored is an error.

Typical decoding loop::

    cache = KVCache(num_layers=6, num_heads=8, d_k=64, max_seq_len=512)
    cache.initialize_cache(batch_size=4)
    for i in range(6):                                   # once per source (S_src tokens)
        cache.update_cache(i, "cross", k_src[i], v_src[i], seq_len=S_src)
    for t in range(steps):                               # one new token per step
        k_all, v_all = cache.update_cache(i, "self", k_t, v_t, seq_len=t + 1)

A model written against the ``Cache`` interface can use the same storage through
:meth:`KVCache.as_encoder_decoder_cache`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..basic.encoder_decoder import EncoderDecoderCache
from ..basic.static import StaticKVCache
from ..errors import CacheCapacityError
from ..validate import layer_index, positive_int

Tensor = torch.Tensor
ATTENTION_TYPES = ("self", "cross")


class KVCache:
    """Manual self- and cross-attention cache with explicit ``seq_len`` positions.

    Args:
        num_layers: decoder layers.
        num_heads: key/value heads per layer.
        d_k: head dimension.
        max_seq_len: capacity in tokens of each layer, for self and for cross attention.
        dtype, device: storage dtype (inputs must match) and device (default CPU).

    Memory (after ``initialize_cache(B)``): ``2 caches * 2 (K, V) * num_layers * B * num_heads *
    max_seq_len * d_k`` elements, allocated once; ``update_cache`` copies only the new tokens.
    """

    def __init__(self, num_layers: int, num_heads: int, d_k: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.num_layers = positive_int("num_layers", num_layers)
        self.num_heads = positive_int("num_heads", num_heads)
        self.d_k = positive_int("d_k", d_k)
        self.max_seq_len = positive_int("max_seq_len", max_seq_len)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.batch_size: Optional[int] = None
        self.self_cache: Optional[StaticKVCache] = None
        self.cross_cache: Optional[StaticKVCache] = None
        self._view: Optional[EncoderDecoderCache] = None

    # ------------------------------------------------------------------ lifecycle
    def initialize_cache(self, batch_size: int) -> None:
        """Allocate both caches for ``batch_size`` rows (drops anything stored before)."""
        self.batch_size = positive_int("batch_size", batch_size)
        make = lambda: StaticKVCache(  # noqa: E731
            max_cache_len=self.max_seq_len, num_layers=self.num_layers, num_heads=self.num_heads,
            head_dim=self.d_k, max_batch_size=batch_size, dtype=self.dtype, device=self.device)
        self.self_cache, self.cross_cache = make(), make()
        self._view = None

    @property
    def is_initialized(self) -> bool:
        """True between ``initialize_cache`` and ``clear_cache``."""
        return self.self_cache is not None

    def clear_cache(self) -> None:
        """Free the storage; ``is_initialized`` becomes False until ``initialize_cache`` again.

        A view from an earlier ``as_encoder_decoder_cache()`` keeps the old storage alive but is no
        longer connected to this object.
        """
        self.self_cache = self.cross_cache = self._view = None
        self.batch_size = None

    def as_encoder_decoder_cache(self) -> EncoderDecoderCache:
        """This cache seen through the ``Cache`` interface (same storage, same lengths, no copy).

        Writes through either face are visible through the other; the same view object is
        returned until the next ``initialize_cache``/``clear_cache``.
        """
        self._require_init("as_encoder_decoder_cache")
        if self._view is None:
            self._view = EncoderDecoderCache(self.self_cache, self.cross_cache)
        return self._view

    # ------------------------------------------------------------------ checks
    def _require_init(self, method: str) -> None:
        if not self.is_initialized:
            raise RuntimeError(f"{method}() called before initialize_cache(batch_size): the cache holds no storage")

    def _cache_for(self, attention_type) -> StaticKVCache:
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={attention_type!r} is not supported; expected one of {ATTENTION_TYPES}")
        return self.self_cache if attention_type == "self" else self.cross_cache

    def _check_layer(self, layer_idx) -> None:
        layer_index(layer_idx, self.num_layers)

    @staticmethod
    def _where(layer_idx: int, attention_type: str) -> str:
        return f"layer {layer_idx} ({attention_type!r})"

    def _check_seq_len(self, seq_len, lo: int, hi: int, layer_idx: int, attention_type: str, meaning: str) -> None:
        """``seq_len`` must be an int in ``[lo, hi]``; the error names it, the range and why."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not lo <= seq_len <= hi:
            raise ValueError(
                f"seq_len={seq_len!r} for {self._where(layer_idx, attention_type)}: expected an int in [{lo}, {hi}] "
                f"({meaning})"
            )

    def _check_uncropped(self, cache: StaticKVCache, layer_idx: int, attention_type: str, method: str) -> None:
        first = cache.first_position(layer_idx)
        if first:
            raise ValueError(
                f"{method}: {self._where(layer_idx, attention_type)} was crop()ped through as_encoder_decoder_cache() "
                f"and no longer holds positions 0..{first - 1}, but seq_len counts tokens from position 0; expected "
                f"an uncropped cache (call initialize_cache() to start again)")

    def _check_kv(self, name: str, t) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ok = (t.dim() == 4 and t.shape[0] <= self.batch_size and t.shape[1] == self.num_heads
              and t.shape[2] >= 1 and t.shape[3] == self.d_k)
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected (batch <= {self.batch_size}, num_heads={self.num_heads}, "
                f"s >= 1, d_k={self.d_k})"
            )

    # ------------------------------------------------------------------ read / write
    def update_cache(self, layer_idx: int, attention_type: str, k: Tensor, v: Tensor,
                     seq_len: int) -> Tuple[Tensor, Tensor]:
        """Write ``k``/``v`` ``(batch, num_heads, s, d_k)`` so that the layer holds ``seq_len`` tokens.

        ``seq_len`` = the length of this layer/type *after* the write: the ``s`` new tokens take
        positions ``[seq_len - s, seq_len)``, so ``s <= seq_len <= stored + s`` (smaller than
        ``stored + s`` rolls back what lay after ``seq_len - s``) and ``seq_len <= max_seq_len``.
        Returns the cached ``(k, v)``, ``(batch, num_heads, seq_len, d_k)`` views.
        Cost: one copy of the ``s`` new tokens.
        """
        self._require_init("update_cache")
        cache = self._cache_for(attention_type)
        self._check_layer(layer_idx)
        self._check_kv("k", k)
        self._check_kv("v", v)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        self._check_uncropped(cache, layer_idx, attention_type, "update_cache")
        stored, s = cache.get_seq_length(layer_idx), k.shape[2]
        self._check_seq_len(seq_len, s, stored + s, layer_idx, attention_type,
                            f"seq_len is the length after the write: the {s} new token(s) take positions "
                            f"seq_len-{s}..seq_len-1, after at most the {stored} stored ones, leaving no hole")
        if seq_len > self.max_seq_len:
            raise CacheCapacityError(
                f"seq_len={seq_len} for {self._where(layer_idx, attention_type)} exceeds max_seq_len="
                f"{self.max_seq_len}; expected seq_len <= {self.max_seq_len} (build the cache with a larger "
                f"max_seq_len)")
        cache._lengths[layer_idx] = seq_len - s  # roll back what lies after the new tokens' first position
        try:
            out = cache.update(k, v, layer_idx)
        except Exception:
            cache._lengths[layer_idx] = stored
            raise
        if attention_type == "cross" and self._view is not None:
            self._view.is_updated[layer_idx] = True
        return out

    def get_cached_kv(self, layer_idx: int, attention_type: str,
                      seq_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The first ``seq_len`` cached tokens: ``(batch, num_heads, seq_len, d_k)`` views.

        ``seq_len=None`` returns everything stored.  Asking for more than is stored is an error.
        """
        self._require_init("get_cached_kv")
        cache = self._cache_for(attention_type)
        self._check_layer(layer_idx)
        self._check_uncropped(cache, layer_idx, attention_type, "get_cached_kv")
        stored = cache.get_seq_length(layer_idx)
        seq_len = stored if seq_len is None else seq_len
        self._check_seq_len(seq_len, 0, stored, layer_idx, attention_type,
                            f"seq_len is how many tokens to return from position 0, and {stored} are stored")
        rows = cache.batch_size if cache.batch_size is not None else self.batch_size
        k = cache.keys[layer_idx].narrow(0, 0, rows).narrow(2, 0, seq_len)
        v = cache.values[layer_idx].narrow(0, 0, rows).narrow(2, 0, seq_len)
        return k, v

    def get_seq_len(self, layer_idx: int = 0, attention_type: str = "self") -> int:
        """Tokens stored for ``layer_idx`` / ``attention_type`` (default: self-attention, layer 0).

        Returns 0 before ``initialize_cache``.
        """
        if not self.is_initialized:
            return 0
        self._check_layer(layer_idx)
        return self._cache_for(attention_type).get_seq_length(layer_idx)

    def memory_bytes(self) -> int:
        """Bytes allocated by both caches (0 before ``initialize_cache``)."""
        if not self.is_initialized:
            return 0
        return self.self_cache.memory_bytes() + self.cross_cache.memory_bytes()

    def __repr__(self) -> str:
        state = (f"batch_size={self.batch_size}, self_len={self.get_seq_len()}, "
                 f"cross_len={self.get_seq_len(0, 'cross')}") if self.is_initialized else "uninitialized"
        return (f"KVCache(num_layers={self.num_layers}, num_heads={self.num_heads}, d_k={self.d_k}, "
                f"max_seq_len={self.max_seq_len}, {state})")
