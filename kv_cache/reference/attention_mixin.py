"""``CachedAttentionMixin``: let any attention module keep its keys/values in an ``AdvancedKVCache``.

The manager knows nothing about models, and a model need not know the manager is paged.  The
mixin is the small bridge: add it to an attention ``nn.Module`` and, where the module has
projected the new tokens' keys and values, call :meth:`CachedAttentionMixin.cached_kv`::

    class MyAttention(CachedAttentionMixin, nn.Module):
        def forward(self, x, sequence_id):
            q, k, v = self.project(x)                       # k, v: (S, H_kv, D) new tokens
            k, v = self.cached_kv(self.layer_id, sequence_id, k, v)   # (L, H_kv, D) all tokens
            return attend(q, k, v)

    attn.set_cache(manager)          # share one manager between every layer (and model)

Several requests then run through the same module, each under its own ``sequence_id``, their
keys and values living side by side in one budgeted pool.

The reference guide's ``MultiHeadAttentionV2`` uses a second, whole-sequence style: it calls
``attn.set_cache(manager, sequence_id)`` once, then at every step reads the cached keys/values
with :meth:`CachedAttentionMixin._get_cached_kv`, computes the missing tokens and stores the
*whole* extended K/V back with :meth:`CachedAttentionMixin._cache_kv` (``set_cache``: replace).
Both styles share the manager; a sequence should use one of them.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence, Tuple, Union

import torch

from ..paged.advanced import AdvancedKVCache

Tensor = torch.Tensor


class CachedAttentionMixin:
    """Mixin giving an attention module ``set_cache``, ``cached_kv`` (append style),
    ``_get_cached_kv`` / ``_cache_kv`` (the reference guide's whole-K/V style) and ``clear_cached``.

    Attributes set by :meth:`set_cache`: ``kv_cache`` (the manager, ``None`` = no caching) and
    ``cache_sequence_id`` (the default sequence when a call passes ``sequence_id=None``).
    The mixin defines no ``__init__`` and works with any base class.
    """

    kv_cache: Optional[AdvancedKVCache] = None
    cache_sequence_id: Hashable = "default"

    def set_cache(self, cache: Optional[AdvancedKVCache], sequence_id: Hashable = "default") -> None:
        """Attach ``cache`` (or detach with ``None``) and set the default ``sequence_id``."""
        if cache is not None and not isinstance(cache, AdvancedKVCache):
            raise TypeError(f"cache must be an AdvancedKVCache or None, got {type(cache).__name__}")
        self.kv_cache = cache
        self.cache_sequence_id = sequence_id

    def cached_kv(self, layer_id: int, sequence_id: Union[Hashable, Sequence[Hashable], None],
                  key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        """Store the new tokens' ``key``/``value`` and return the sequence's keys/values so far.

        One sequence: ``key``/``value`` ``(S, H_kv, D)`` or flat ``(S, H_kv * D)`` -> ``(L, ...)``
        of the same rank, ``L`` = tokens held after the write (the window's tokens plus the new
        ones under ``SLIDING_WINDOW``).  The read happens before the write: a cold sequence is
        a miss (computed from scratch), a warm one a hit.  The new tokens are *appended*
        (``AdvancedKVCache.append_cache``), so a sequence the pool evicted raises
        :class:`~kv_cache.errors.EvictedSequenceError` instead of silently restarting empty.
        A batch: ``sequence_id`` a list of ``B`` ids and ``key``/``value`` ``(B, S, H_kv, D)`` ->
        ``(B, L, H_kv, D)`` (rows of equal length, see ``AdvancedKVCache.append_and_gather``).
        Without an attached cache the inputs are returned unchanged (attention over the new
        tokens only).  Cost: one gather of the history plus one copy of the new tokens.
        """
        cache = self.kv_cache
        if cache is None:
            return key, value
        if sequence_id is None:
            sequence_id = self.cache_sequence_id
        if isinstance(sequence_id, (list, tuple)):
            return cache.append_and_gather(layer_id, list(sequence_id), key, value)
        past = cache.get_cache(layer_id, sequence_id)
        cache.append_cache(layer_id, sequence_id, key, value)
        if past is None:
            return key, value
        return torch.cat([past[0], key]), torch.cat([past[1], value])

    def _get_cached_kv(self, layer_id: int, seq_len: Optional[int] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """The cached keys/values of this module's sequence (``cache_sequence_id``) in ``layer_id``.

        Returns flat ``(1, n, num_kv_heads * head_dim)`` tensors (``(batch, n, embed_dim)`` with
        ``batch`` 1 and no GQA: the shape the reference guide's attention views back into heads),
        holding at most the first ``seq_len`` tokens (``n = min(seq_len, stored)``; all of them
        when ``seq_len`` is ``None``), or ``None`` on a miss: no cache attached, nothing stored,
        or the sequence was evicted.  Cost: one gather of ``n`` tokens (counted as a hit or miss).
        """
        cache = self.kv_cache
        if cache is None:
            return None
        got = cache.get_cache(layer_id, self.cache_sequence_id, seq_len)
        if got is None:
            return None
        k, v = got
        return k.reshape(1, k.shape[0], -1), v.reshape(1, v.shape[0], -1)

    def _cache_kv(self, layer_id: int, key: Tensor, value: Tensor) -> None:
        """Store ``key``/``value`` as the *whole* keys/values of this module's sequence in ``layer_id``.

        ``key``/``value``: ``(1, n, num_kv_heads * head_dim)`` (``(batch, n, embed_dim)``) -- all
        ``n`` tokens of the sequence, not just the new ones: what was stored is replaced
        (``AdvancedKVCache.set_cache``), so storing a recomputed K/V after an eviction is a
        correct restart.  One cache sequence is one batch row: a batch of several rows is
        refused (give each row its own ``sequence_id``, as the reference guide's speculative
        decoder does, or use :meth:`cached_kv` with a list of ids).  No cache attached: nothing
        happens.  Cost: one copy of the ``n`` tokens.
        """
        cache = self.kv_cache
        if cache is None:
            return
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 1:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"_cache_kv: {name} is {got}, expected (1, n, num_kv_heads * head_dim): one "
                                 f"sequence (sequence_id={self.cache_sequence_id!r}) is one batch row")
        cache.set_cache(layer_id, self.cache_sequence_id, key[0], value[0])

    def clear_cached(self, sequence_id: Optional[Hashable] = None) -> None:
        """Free one sequence (default: ``cache_sequence_id``) from the attached cache."""
        if self.kv_cache is not None:
            self.kv_cache.clear_sequence(self.cache_sequence_id if sequence_id is None else sequence_id)
