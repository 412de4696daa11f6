"""``LinearKVCache``: keep the ``keep_window_size`` most *important* tokens, exactly.

Dynamic-mask attention (flash-dmattn) adds an importance bias to the attention scores,
``softmax(q . k / sqrt(head_dim) + bias_k)``, and lets each query read only the ``k`` keys of
highest importance.  When a key's importance is fixed the moment the key is created (it
depends on the key's token, not on the query), the top-``k`` set obeys

    TopK(s_0..s_t) = TopK(TopK(s_0..s_{t-1}) together with s_t)

so a token that drops out of the top ``k`` can never come back: keeping the current top ``k``
(and evicting the least important when a new token arrives) loses nothing.  Memory becomes
``O(keep_window_size)`` instead of ``O(t)``, and a decoding step reads ``keep_window_size`` keys
instead of ``t``, while the output is *exactly* attention over the top ``k`` of all tokens seen.
(H2O's "heavy hitters" use accumulated attention as importance instead; that importance changes
over time, so eviction there is an approximation.  Here it is exact by construction.)

Each batch row and each key/value head keeps its own set.  Ties in importance are broken
towards the newer token (the oldest of the least important is evicted), deterministically.
Storage is not in time order; :meth:`LinearKVCache.key_positions` says which token is where.

:class:`LinearKVCache` implements the ``Cache`` interface, ``update(key, value, layer_idx,
importance=...)``; it is not used by ``transformer``'s models (they produce no importance).
The reference document's attention function over it, ``linear_kv_cache_attention``, lives with
the other reference APIs in :mod:`kv_cache.reference.linear_attention`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..basic.base import Cache, check_kv_pair, repeat_rows, select_rows
from ..validate import layer_index, positive_int

Tensor = torch.Tensor


class LinearKVCache(Cache):
    """Per row and key/value head, the ``keep_window_size`` tokens of highest importance.

    Args:
        keep_window_size: tokens kept per (row, head) and per layer.
        num_heads, head_dim: key/value heads and head size, checked on every update (``None``:
            taken from the first update).
        dtype, device: storage dtype/device (``None``: those of the first update).

    Storage per layer, allocated on its first update: keys and values ``(B, H, K, D)``,
    importance ``(B, H, K)`` float32 and positions ``(B, H, K)`` int64 -- constant, whatever the
    stream length.  ``get_seq_length`` is the position of the next token (tokens seen).

    Example::

        cache = LinearKVCache(keep_window_size=4, num_heads=2, head_dim=8)
        for t in range(10):
            k, v = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0,
                                importance=torch.randn(1, 2, 1))
        k.shape                              # (1, 2, 4, 8): the 4 most important of 10 tokens
        cache.get_cache_info()["evictions"]  # 6 tokens dropped per (row, head)
    """

    is_lossless = False
    layout = "bhsd"

    def __init__(self, keep_window_size: int = 2048, num_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None):
        self.keep_window_size = positive_int("keep_window_size", keep_window_size)
        self.num_heads = None if num_heads is None else positive_int("num_heads", num_heads)
        self.head_dim = None if head_dim is None else positive_int("head_dim", head_dim)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        self.dtype, self.device = dtype, None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every token and free the buffers."""
        self.keys: List[Optional[Tensor]] = []
        self.values: List[Optional[Tensor]] = []
        self.importance: List[Optional[Tensor]] = []
        self.positions: List[Optional[Tensor]] = []
        self._count: List[int] = []   # tokens held per (row, head)
        self._next: List[int] = []    # position of the next token
        self._given: List[int] = []   # tokens given
        self._batch: Optional[int] = None

    def _grow(self, layer_idx: int) -> None:
        layer_index(layer_idx)
        while len(self._count) <= layer_idx:
            for lst in (self.keys, self.values, self.importance, self.positions):
                lst.append(None)
            self._count.append(0)
            self._next.append(0)
            self._given.append(0)

    def _check(self, layer_idx: int, key: Tensor, value: Tensor, importance) -> Tensor:
        B, H, S, D = key.shape
        if self.num_heads is not None and H != self.num_heads:
            raise ValueError(f"key for layer {layer_idx} has {H} heads, expected num_heads={self.num_heads}")
        if self.head_dim is not None and D != self.head_dim:
            raise ValueError(f"key for layer {layer_idx} has head dim {D}, expected head_dim={self.head_dim}")
        if self.dtype is not None and (key.dtype != self.dtype or value.dtype != self.dtype):
            raise ValueError(f"key/value for layer {layer_idx} are {key.dtype}/{value.dtype}, expected dtype={self.dtype}")
        if self.device is not None and key.device.type != self.device.type:
            raise ValueError(f"key for layer {layer_idx} is on {key.device}, expected device={self.device}")
        if importance is None:
            raise ValueError("LinearKVCache.update needs importance=(batch, heads, new_tokens) scores: it keeps the "
                             "most important tokens (a model that produces no importance cannot use this cache)")
        if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (B, H, S):
            got = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
            raise ValueError(f"importance for layer {layer_idx} must have shape (batch, heads, new_tokens)="
                             f"{(B, H, S)}, got {got}")
        if self._batch is not None and B != self._batch and any(self._given):
            raise ValueError(f"key for layer {layer_idx} has batch size {B}, but the cache holds {self._batch} rows; "
                             f"use batch_select_indices / batch_repeat_interleave, or reset()")
        buf = self.keys[layer_idx]
        if buf is not None and (buf.shape[:2] != (B, H) or buf.shape[3] != D or buf.dtype != key.dtype
                                or self.values[layer_idx].shape[3] != value.shape[3]):
            raise ValueError(f"key/value for layer {layer_idx} have shapes {tuple(key.shape)}/{tuple(value.shape)}; "
                             f"the layer stores {tuple(buf.shape)} ({buf.dtype})")
        return importance.float()

    # ------------------------------------------------------------------ Cache API
    def update(self, key: Tensor, value: Tensor, layer_idx: int = 0, cache_position=None, *,
               importance: Optional[Tensor] = None):
        """Offer ``S`` new tokens; keep the top ``keep_window_size``; return the kept keys/values.

        ``key`` ``(B, H, S, D)``, ``value`` ``(B, H, S, D_v)``, ``importance`` ``(B, H, S)`` (one
        score per new key).  ``cache_position``: ``None`` appends; on an empty layer an int may
        set the position of the first token.  Returns views ``(B, H, n, D)``, ``n =
        min(keep_window_size, tokens seen)``, in storage order.  Cost: ``S == 1``:
        ``O(keep_window_size)`` (find the least important, overwrite it); ``S > 1``: a sort of
        ``n + S`` candidates.
        """
        check_kv_pair(key, value, layer_idx)
        self._grow(layer_idx)
        imp = self._check(layer_idx, key, value, importance)
        l, S, K = layer_idx, key.shape[2], self.keep_window_size
        if cache_position is not None:
            start = int(torch.as_tensor(cache_position).reshape(-1)[0])
            if self._given[l] == 0:
                self._next[l] = start
            elif start != self._next[l]:
                raise ValueError(f"LinearKVCache only appends: the next position of layer {l} is {self._next[l]}, "
                                 f"got cache_position starting at {start}")
        if self.keys[l] is None or self.keys[l].shape[0] != key.shape[0]:
            B, H = key.shape[:2]
            self.keys[l] = key.new_zeros(B, H, K, key.shape[3])
            self.values[l] = value.new_zeros(B, H, K, value.shape[3])
            self.importance[l] = torch.zeros(B, H, K, device=key.device)
            self.positions[l] = torch.zeros(B, H, K, dtype=torch.long, device=key.device)
        t = self._next[l]
        if S == 1 and self._count[l] == K:
            self._replace_least_important(l, key, value, imp, t)
        elif S == 1:
            c = self._count[l]
            self.keys[l][:, :, c] = key[:, :, 0]
            self.values[l][:, :, c] = value[:, :, 0]
            self.importance[l][:, :, c] = imp[:, :, 0]
            self.positions[l][:, :, c] = t
            self._count[l] = c + 1
        else:
            self._merge(l, key, value, imp, t)
        self._next[l], self._given[l], self._batch = t + S, self._given[l] + S, key.shape[0]
        n = self._count[l]
        return self.keys[l][:, :, :n], self.values[l][:, :, :n]

    def _replace_least_important(self, l, key, value, imp, t):
        """The new token replaces the oldest of the least important kept tokens, if it is at
        least as important (ties favour the newer token); otherwise it is dropped."""
        kept_imp, kept_pos = self.importance[l], self.positions[l]
        lowest = kept_imp.amin(-1, keepdim=True)                                          # (B, H, 1)
        slot = torch.where(kept_imp == lowest, kept_pos, torch.iinfo(torch.long).max).argmin(-1, keepdim=True)
        admit = imp >= lowest                                                             # (B, H, 1)
        for buf, new in ((self.keys[l], key), (self.values[l], value)):
            idx = slot[..., None].expand(-1, -1, 1, buf.shape[3])
            buf.scatter_(2, idx, torch.where(admit[..., None], new, buf.gather(2, idx)))
        kept_imp.scatter_(2, slot, torch.where(admit, imp, lowest))
        kept_pos.scatter_(2, slot, torch.where(admit, torch.full_like(slot, t), kept_pos.gather(2, slot)))

    def _merge(self, l, key, value, imp, t):
        """Top ``K`` of (kept + new) by (importance, position), stored in position order."""
        c, S = self._count[l], key.shape[2]
        B, H = key.shape[:2]
        new_pos = torch.arange(t, t + S, device=key.device).expand(B, H, S)
        cand_imp = torch.cat([self.importance[l][:, :, :c], imp], dim=2)
        cand_pos = torch.cat([self.positions[l][:, :, :c], new_pos], dim=2)
        by_pos = cand_pos.argsort(-1, descending=True)  # newest first, so a stable sort keeps ties newest first
        by_imp = cand_imp.gather(-1, by_pos).sort(dim=-1, descending=True, stable=True).indices
        m = min(self.keep_window_size, c + S)
        sel = by_pos.gather(-1, by_imp)[..., :m]
        sel = sel.gather(-1, cand_pos.gather(-1, sel).argsort(-1))  # tidy: position order
        for buf, new in ((self.keys[l], key), (self.values[l], value)):
            cand = torch.cat([buf[:, :, :c], new], dim=2)
            buf[:, :, :m] = cand.gather(2, sel[..., None].expand(-1, -1, -1, buf.shape[3]))
        self.importance[l][:, :, :m] = cand_imp.gather(-1, sel)
        self.positions[l][:, :, :m] = cand_pos.gather(-1, sel)
        self._count[l] = m

    def key_positions(self, layer_idx: int = 0, in_cache: bool = False) -> Tensor:
        """Absolute positions ``(B, H, n)`` of the kept tokens, in storage order (per row and head).
        ``in_cache=True`` gives each token's rank by position among the kept ones."""
        n = self._count[layer_idx]
        pos = self.positions[layer_idx][:, :, :n]
        return pos.argsort(-1).argsort(-1) if in_cache else pos

    def get_importance(self, layer_idx: int = 0) -> Tensor:
        """Importance ``(B, H, n)`` of the kept tokens, in storage order."""
        return self.importance[layer_idx][:, :, :self._count[layer_idx]]

    def get(self, layer_idx: int = 0):
        """Kept ``(keys, values)`` of ``layer_idx`` (storage order), or ``None``."""
        if layer_idx >= len(self._count) or self._count[layer_idx] == 0:
            return None
        n = self._count[layer_idx]
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Position of the next token of ``layer_idx`` (tokens seen, plus any starting offset)."""
        return self._next[layer_idx] if layer_idx < len(self._next) else 0

    def get_max_cache_shape(self) -> int:
        """Tokens kept per (row, head): ``keep_window_size``."""
        return self.keep_window_size

    def get_cache_info(self, layer_idx: int = 0) -> Dict[str, float]:
        """``capacity_utilization`` (kept / keep_window_size), ``evictions`` (tokens dropped per
        row and head), ``tokens_seen``, ``cached_tokens``, ``keep_window_size``, ``memory_bytes``."""
        given = self._given[layer_idx] if layer_idx < len(self._given) else 0
        kept = self._count[layer_idx] if layer_idx < len(self._count) else 0
        return {"capacity_utilization": kept / self.keep_window_size, "evictions": given - kept,
                "tokens_seen": given, "cached_tokens": kept, "keep_window_size": self.keep_window_size,
                "memory_bytes": self.memory_bytes()}

    def batch_select_indices(self, indices) -> None:
        """Keep batch rows ``indices`` (in that order).  O(stored)."""
        if self._batch is not None:
            self._batch = select_rows((self.keys, self.values, self.importance, self.positions), indices,
                                      self._batch)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times.  O(stored * repeats)."""
        self._batch = repeat_rows((self.keys, self.values, self.importance, self.positions), repeats, self._batch)

    def crop(self, max_length: int) -> None:
        """Refused unless it is a no-op: this cache keeps the most *important* tokens, a different
        set per row and head, so "the ``max_length`` most recent tokens" is not a set it holds.

        ``crop(n)`` with ``n`` >= the tokens kept changes nothing; anything smaller raises
        ``ValueError`` naming what to use instead (a smaller ``keep_window_size``, ``rollback``
        while nothing was evicted, or ``reset``).
        """
        keep = self._crop_count(max_length)
        for l, n in enumerate(self._count):
            if n > keep:
                raise ValueError(
                    f"crop({max_length}) on layer {l}: a LinearKVCache keeps the {n} most important tokens per row and "
                    f"head (different tokens in each), not a run of recent ones, so it cannot keep 'the most recent "
                    f"{max_length}'; expected max_length >= {n}. Bound its memory with keep_window_size, undo new "
                    f"tokens with rollback() (while nothing was evicted), or reset()")

    def rollback(self, max_length: int) -> None:
        """Roll back to the first ``max_length`` positions; only while nothing was evicted."""
        for l in range(len(self._count)):
            start = self._next[l] - self._given[l]
            keep = self._rollback_target(max_length, self._next[l])
            if keep == self._next[l]:
                continue
            if self._given[l] > self._count[l]:
                raise ValueError(f"rollback({max_length}) on layer {l}: {self._given[l] - self._count[l]} token(s) were "
                                 f"already evicted; a LinearKVCache cannot roll back past an eviction")
            self._count[l] = max(0, keep - start)  # nothing evicted: storage is in position order
            self._given[l], self._next[l] = self._count[l], start + self._count[l]

    def memory_bytes(self) -> int:
        """Bytes of keys, values, importance and positions buffers."""
        return sum(t.numel() * t.element_size()
                   for lst in (self.keys, self.values, self.importance, self.positions) for t in lst if t is not None)

    def __repr__(self) -> str:
        return (f"LinearKVCache(keep_window_size={self.keep_window_size}, layers={len(self._count)}, "
                f"batch={self._batch}, kept={self._count}, seen={self._given}, bytes={self.memory_bytes()})")
