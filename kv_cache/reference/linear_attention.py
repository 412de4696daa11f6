"""``linear_kv_cache_attention``: the reference document's attention over a :class:`LinearKVCache`.

Dynamic-mask attention (flash-dmattn) adds an importance bias to the scores,
``softmax(q . k / sqrt(head_dim) + bias_k)``, and lets each query read only the
``keep_window_size`` keys of highest importance.  The cache that keeps exactly those keys, and
why keeping them loses nothing, is :mod:`kv_cache.long_context.linear`; this file is the
function with the reference API's signature that drives it (prompt, then one token at a time).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..long_context.linear import LinearKVCache

Tensor = torch.Tensor


def _biased_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, causal: bool) -> Tensor:
    """``softmax(q . k / sqrt(D) + bias) v`` with GQA; ``bias`` ``(B, H_kv, S_q, S_k)``."""
    G = query.shape[1] // key.shape[1]
    mask = bias.to(query.dtype).repeat_interleave(G, dim=1)
    if causal:
        Sq, Sk = query.shape[2], key.shape[2]
        future = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).triu(Sk - Sq + 1)
        mask = mask.masked_fill(future, float("-inf"))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=G > 1)


def linear_kv_cache_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor,
                              cache: Optional[LinearKVCache] = None, keep_window_size: int = 2048,
                              sequence_position: int = 0, inference_mode: bool = True, *, layer_idx: int = 0):
    """Attention with an importance bias over the ``keep_window_size`` most important tokens.

    Args:
        query: ``(B, H_q, S_q, D)``; key ``(B, H_kv, S_k, D)``; value ``(B, H_kv, S_k, D_v)``
            (``H_q`` a multiple of ``H_kv``: grouped-query attention).
        bias: importance added to the scaled scores, broadcastable to ``(B, H_kv, S_q, S_k)``;
            when decoding, ``(B, H_kv, 1, 1)``: the importance of the new key.
        cache: a :class:`LinearKVCache` or ``None`` (one is created).
        keep_window_size: tokens kept per (row, head); must match the cache's.
        sequence_position: position of the (first) new token; must follow the cache's last one.
        inference_mode: ``False`` runs plain attention (training) and leaves the cache alone.

    Returns ``(output (B, H_q, S_q, D_v), cache)``.  One query (decoding): the new token joins
    the cache, which keeps the top ``keep_window_size`` of all tokens so far, and the query
    attends over exactly those -- equal to full attention restricted to that set.  Several
    queries (a prompt) fall back to standard causal attention over the given keys; the tokens
    are then added to an *empty* cache so decoding can continue.  Cost per decoding step:
    ``O(keep_window_size)``, whatever the stream length.
    """
    for name, t in (("query", query), ("key", key), ("value", value), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D (batch, heads, seq, dim) tensor, got {got}")
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    if key.shape[0] != B or key.shape[3] != D or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                         f"must agree on batch, key/value heads, key length and head dim")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    try:
        bias = bias.expand(B, Hkv, Sq, Sk)
    except RuntimeError:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (batch, kv_heads, q_len, k_len)="
                         f"{(B, Hkv, Sq, Sk)}") from None
    if not inference_mode:
        return _biased_attention(query, key, value, bias, causal=Sq > 1), cache
    if cache is None:
        cache = LinearKVCache(keep_window_size, num_heads=Hkv, head_dim=D, dtype=key.dtype, device=key.device)
    elif not isinstance(cache, LinearKVCache):
        raise TypeError(f"cache must be a LinearKVCache or None, got {type(cache).__name__}")
    elif cache.keep_window_size != keep_window_size:
        raise ValueError(f"keep_window_size={keep_window_size} differs from the cache's {cache.keep_window_size}")
    if Sq > 1:
        if cache.get_cache_info(layer_idx)["tokens_seen"]:
            raise ValueError("a multi-token query over a non-empty LinearKVCache is not supported: feed the "
                             "prompt first (empty cache), then one token at a time")
        out = _biased_attention(query, key, value, bias, causal=True)
        cache.update(key, value, layer_idx, sequence_position, importance=bias[:, :, -1, :])
        return out, cache
    if Sk != 1:
        raise ValueError(f"a single query decodes one new token: key must hold 1 token, got {Sk}")
    keys, values = cache.update(key, value, layer_idx, sequence_position, importance=bias[:, :, 0, :])
    importance = cache.get_importance(layer_idx)[:, :, None, :]  # (B, H_kv, 1, n)
    return _biased_attention(query, keys, values, importance, causal=False), cache
