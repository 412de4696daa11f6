"""``EncoderDecoderCache``: the two caches of a sequence-to-sequence decoder, as one object.

A decoder layer of an encoder-decoder model (the original Transformer, T5, Whisper...) has two
attentions, and they need different caches:

* **self-attention** over the target generated so far: grows by one token per step, exactly
  like a GPT's cache -- the *self-attention cache*;
* **cross-attention** over the encoder output ("memory").  The source does not change while
  decoding, so each layer's projected keys/values of the memory are computed **once**, on the
  first step, and reused on every later step -- the *cross-attention cache*.  Without it each
  step would re-project the whole source: ``O(S_src * d_model^2)`` per layer per step.

``EncoderDecoderCache`` implements the ``Cache`` interface by delegating to the self-attention
cache (``update``/``get``/``get_seq_length``/``key_positions``/``crop``/``rollback`` are about the
decoder's history) and adds
the cross-attention bookkeeping models use:

``has_cross(layer_idx)``            are this layer's cross K/V already stored?
``set_cross(layer_idx, key, value)`` store them (once per source); returns the stored views
``get_cross(layer_idx)``            the stored ``(keys, values)``
``get_or_set_cross(layer_idx, fn)`` ``get_cross`` if stored, else ``set_cross(layer_idx, *fn())``
``is_updated``                      dict ``layer_idx -> bool`` behind ``has_cross``

Batch operations (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``)
apply to both caches, since both are indexed by batch row; ``crop`` (keep the most recent
target tokens) and ``rollback`` (keep the first ones) only touch the self-attention cache
(shortening the target does not change the source); ``reset`` empties both and clears
``is_updated`` (ready for a new source).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .base import BufferedCache, Cache
from .dynamic import DynamicKVCache

Tensor = torch.Tensor


def _stored_layers(cache: Cache) -> range:
    """Layer indices a cache can report on without error (for scanning existing contents)."""
    n = getattr(cache, "num_layers", None)
    if n is None:
        n = len(cache._lengths) if isinstance(cache, BufferedCache) else 0
    return range(n)


class EncoderDecoderCache(Cache):
    """A self-attention cache plus a cross-attention cache for an encoder-decoder model.

    Args:
        self_attention_cache: the decoder's growing history (default ``DynamicKVCache()``).
        cross_attention_cache: per decoder layer, the keys/values of the encoder output,
            written once per source (default ``DynamicKVCache()``).  A static cache here needs
            ``max_cache_len >= source length``.

    Shapes are those of the wrapped caches (``(B, H_kv, S, D)`` in "bhsd").  Cost: every method
    costs what the wrapped cache's method costs; batch operations pay for both caches.

    If the cross-attention cache already holds keys/values for some layers when wrapped (for
    instance the manual :class:`kv_cache.KVCache`), those layers start as ``is_updated``.

    Example (what a cross-attention module does each step)::

        cache = EncoderDecoderCache()
        if cache.has_cross(i):
            k, v = cache.get_cross(i)                     # steps 2, 3, ...: no projection
        else:
            k, v = cache.set_cross(i, k_proj(memory), v_proj(memory))   # first step only
    """

    def __init__(self, self_attention_cache: Optional[Cache] = None,
                 cross_attention_cache: Optional[Cache] = None):
        self_attention_cache = DynamicKVCache() if self_attention_cache is None else self_attention_cache
        cross_attention_cache = DynamicKVCache() if cross_attention_cache is None else cross_attention_cache
        for name, c in (("self_attention_cache", self_attention_cache),
                        ("cross_attention_cache", cross_attention_cache)):
            if not isinstance(c, Cache):
                raise TypeError(f"{name} must be a kv_cache.Cache, got {type(c).__name__}")
        if self_attention_cache is cross_attention_cache:
            raise ValueError("self_attention_cache and cross_attention_cache must be two different cache objects")
        self.self_attention_cache = self_attention_cache
        self.cross_attention_cache = cross_attention_cache
        #: layer_idx -> True once that layer's cross-attention keys/values are stored.
        self.is_updated: dict = {l: True for l in _stored_layers(cross_attention_cache)
                                 if cross_attention_cache.get_seq_length(l) > 0}

    @property
    def layout(self) -> str:
        """Layout of the self-attention cache (the cross cache's is ``cross_attention_cache.layout``)."""
        return self.self_attention_cache.layout

    @property
    def is_lossless(self) -> bool:
        """That of the self-attention cache (False after it was cropped, or for a window cache)."""
        return self.self_attention_cache.is_lossless

    # ------------------------------------------------------------------ self-attention side
    def update(self, key, value, layer_idx, cache_position=None):
        """Store new decoder keys/values in the self-attention cache; return that layer's history."""
        return self.self_attention_cache.update(key, value, layer_idx, cache_position)

    def get(self, layer_idx):
        """The self-attention ``(keys, values)`` of ``layer_idx``, or ``None``."""
        return self.self_attention_cache.get(layer_idx)

    def get_seq_length(self, layer_idx=0):
        """Decoder tokens stored for ``layer_idx`` (self-attention cache)."""
        return self.self_attention_cache.get_seq_length(layer_idx)

    def get_max_cache_shape(self):
        """Capacity of the self-attention cache (``None`` when unbounded)."""
        return self.self_attention_cache.get_max_cache_shape()

    def key_positions(self, layer_idx, in_cache=False):
        """Positions of the self-attention keys of ``layer_idx`` (see ``Cache.key_positions``)."""
        return self.self_attention_cache.key_positions(layer_idx, in_cache)

    def rotary_offsets(self, layer_idx):
        """Rotations the self-attention cache's keys still owe (``None`` for the usual caches)."""
        return self.self_attention_cache.rotary_offsets(layer_idx)

    def retention_mask(self, query_positions, key_positions):
        """The self-attention cache's retention mask (``None`` for caches that drop nothing)."""
        return self.self_attention_cache.retention_mask(query_positions, key_positions)

    def crop(self, max_length):
        """Keep the most recent ``max_length`` decoder tokens; the cross keys/values (the source) stay."""
        self.self_attention_cache.crop(max_length)

    def rollback(self, max_length):
        """Keep the first ``max_length`` decoder positions (negative: drop from the end); source stays."""
        self.self_attention_cache.rollback(max_length)

    # ------------------------------------------------------------------ both sides
    def batch_select_indices(self, indices):
        """Keep batch rows ``indices`` in both caches (a beam keeps its own source row)."""
        self.self_attention_cache.batch_select_indices(indices)
        self.cross_attention_cache.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats):
        """Repeat every row ``repeats`` times in both caches (beam expansion)."""
        self.self_attention_cache.batch_repeat_interleave(repeats)
        self.cross_attention_cache.batch_repeat_interleave(repeats)

    def reset(self):
        """Empty both caches and forget which layers have cross keys/values (new source)."""
        self.self_attention_cache.reset()
        self.cross_attention_cache.reset()
        self.is_updated.clear()

    def memory_bytes(self):
        """Bytes held by both caches."""
        return self.self_attention_cache.memory_bytes() + self.cross_attention_cache.memory_bytes()

    # ------------------------------------------------------------------ cross-attention side
    def has_cross(self, layer_idx: int) -> bool:
        """True once ``set_cross(layer_idx, ...)`` has stored that layer's encoder keys/values."""
        return bool(self.is_updated.get(layer_idx, False))

    def set_cross(self, layer_idx: int, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        """Store the projected encoder ``key``/``value`` of ``layer_idx`` (once per source).

        Shapes: ``(B, H_kv, S_src, D)`` in "bhsd" (the cross cache's layout).  Returns the stored
        ``(keys, values)`` (views for buffered caches).  Raises if the layer is already set:
        call ``reset()`` before encoding a new source.  Cost: one copy of the keys/values.
        """
        if self.has_cross(layer_idx) or self.cross_attention_cache.get_seq_length(layer_idx) > 0:
            raise ValueError(
                f"cross-attention keys/values for layer_idx={layer_idx} are already stored (is_updated["
                f"{layer_idx}] is True); they are computed once per source -- call reset() before a new source"
            )
        out = self.cross_attention_cache.update(key, value, layer_idx)
        self.is_updated[layer_idx] = True
        return out

    def get_cross(self, layer_idx: int) -> Tuple[Tensor, Tensor]:
        """The stored cross-attention ``(keys, values)`` of ``layer_idx``.  O(1), no copy."""
        if not self.has_cross(layer_idx):
            raise ValueError(
                f"no cross-attention keys/values for layer_idx={layer_idx} (is_updated[{layer_idx}] is "
                f"False); expected set_cross({layer_idx}, key, value) to be called first"
            )
        return self.cross_attention_cache.get(layer_idx)

    def get_or_set_cross(self, layer_idx: int,
                         compute: Callable[[], Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """``get_cross(layer_idx)`` if stored, else ``set_cross(layer_idx, *compute())``.

        ``compute`` is only called on the first step, so the projection of the memory runs once.
        """
        if self.has_cross(layer_idx):
            return self.get_cross(layer_idx)
        key, value = compute()
        return self.set_cross(layer_idx, key, value)

    def get_cross_seq_length(self, layer_idx: int = 0) -> int:
        """Source tokens stored for ``layer_idx`` in the cross-attention cache (0 if not set)."""
        return self.cross_attention_cache.get_seq_length(layer_idx)

    def __repr__(self) -> str:
        return (f"EncoderDecoderCache(self_attention_cache={self.self_attention_cache!r}, "
                f"cross_attention_cache={self.cross_attention_cache!r}, "
                f"is_updated={sorted(l for l, u in self.is_updated.items() if u)})")
