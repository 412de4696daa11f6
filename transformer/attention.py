"""One attention module for self-attention and cross-attention, with GQA and a KV cache.

Self-attention (``is_cross=False``): queries, keys and values come from the same sequence.
One fused ``qkv_proj`` produces all three in one matrix product.  With a cache, only the new
tokens' keys/values are computed; ``cache.update`` appends them and returns the whole history.

Cross-attention (``is_cross=True``): queries come from the decoder, keys/values from the
encoder output ("memory").  The memory is fixed for a whole generation, so its keys/values
are projected once, stored in the cross-attention half of an ``EncoderDecoderCache`` and
reused on every later step.

Grouped-query attention: ``n_kv_heads`` key/value heads each serve ``n_heads / n_kv_heads``
query heads; the cache stores only ``n_kv_heads`` heads.  ``scaled_dot_product_attention``
broadcasts the groups itself (``enable_gqa``), so no repeated copy of the cache is made.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .cpu_attention import paged_attention
from .layers import Linear, MaskPlan, PagedMask, VarlenMask, apply_rotary, make_norm


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention of ``q`` ``(B, H, S, D)`` over ``k``/``v`` ``(B or 1, H_kv, n, D)`` under a
    ``BlockMask``: its block-sparse kernel visits only the key blocks the mask lists (a paged
    pool read in place).  On a GPU, or inside ``torch.compile``, that is the compiled kernel
    (compiled once per shape); eager on a CPU it is PyTorch's reference implementation, which
    scores every key of ``k`` and applies the mask's rule (exact, for tests, slow for big pools).
    Returns ``(B, H, S, D)``."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if q.device.type == "cpu":
        import warnings
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        from .fast_decode import _allow_recompiles

        _allow_recompiles()  # one graph per batch shape; past the default 8 dynamo would fall back to eager
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: VarlenMask,
                     enable_gqa: bool) -> torch.Tensor:
    """Causal attention of packed sequences with PyTorch's variable-length (FlashAttention)
    kernel: ``q`` ``(T, H, D)``, ``k``/``v`` ``(N, H_kv, D)`` one sequence after another as
    ``mask`` says; returns ``(T, H, D)``.  Cost: only the diagonal blocks (each sequence with
    itself), against ``T x N`` for a dense mask."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_parameters()
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if enable_gqa and k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, mask.cu_seq_q, mask.cu_seq_k, mask.max_q, mask.max_k, **kw)


@functools.lru_cache(maxsize=1)
def _varlen_parameters() -> frozenset:
    """Keyword names of this PyTorch's ``varlen_attn`` (the causal keyword changed between
    releases), read once rather than on every layer of every prompt step."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """View a cache tensor in the ``(B, H, S, D)`` layout attention uses (no copy)."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def _from_bshd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """View a freshly projected ``(B, S, H, D)`` tensor in a cache's layout (no copy)."""
    return t.transpose(1, 2) if layout == "bhsd" else t


def _rotate_front(k: torch.Tensor, offsets: torch.Tensor, rotary) -> None:
    """Rotate the first ``m = len(offsets)`` keys of ``k`` ``(B, H_kv, n, D)`` *in place* by
    ``offsets`` ``(m,)`` more positions (rotations compose: a key rotated at ``j`` becomes one
    rotated at ``j + offset``).  Used for the rotations a cache says its returned keys still owe
    (``cache.rotary_offsets``: the sinks of ``SinkKVCache``, whose returned slots are scratch
    copies).  Cost: ``O(m * H_kv * D)``."""
    m = offsets.shape[-1]
    cos, sin = rotary(offsets.view(1, m))  # (1, m, 1, D/2)
    front = k[:, :, :m]
    front.copy_(apply_rotary(front.transpose(1, 2), cos, sin).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head (or grouped/multi-query) scaled dot-product attention.

    Args:
        config: model hyper-parameters (``d_model``, ``n_heads``, ``n_kv_heads``, ``head_dim``,
            ``bias``/``qkv_bias``, ``qk_norm``...).
        is_cross: build the cross-attention variant (separate query and key/value projections).

    Heads are ``head_dim`` wide; ``n_heads * head_dim`` need not equal ``d_model`` (Qwen3):
    ``out_proj`` maps the concatenated heads back to ``d_model``.  ``qkv_bias`` puts biases on
    the query/key/value projection alone (Qwen2).  ``qk_norm`` (Qwen3, self-attention) normalises
    every query and key head over its ``head_dim`` channels (``q_norm``/``k_norm``, one weight
    vector shared by all heads) before RoPE, which keeps attention logits from growing.

    ``forward(x, ...)``: ``x`` is ``(B, S, d_model)``; returns ``(B, S, d_model)``.
    Cost per token: ``2 * d_model * (n_heads + 2 n_kv_heads) * head_dim`` FLOPs of projections
    plus ``4 * n_heads * head_dim * kv_len`` FLOPs of attention over ``kv_len`` keys.
    """

    def __init__(self, config: ModelConfig, is_cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.is_cross = is_cross
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if is_cross:
            self.q_proj = Linear(config.d_model, q_dim, bias=config.attention_bias)
            self.kv_proj = Linear(config.d_model, 2 * kv_dim, bias=config.attention_bias)
        else:
            self.qkv_proj = Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.attention_bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm and not is_cross else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm and not is_cross else None
        self.out_proj = Linear(q_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention queries, keys, values of ``x`` ``(B, S, d_model)`` from one fused matmul:
        ``(B, S, H, D)``, ``(B, S, H_kv, D)``, ``(B, S, H_kv, D)`` (before RoPE; after the
        per-head ``q_norm``/``k_norm`` when ``config.qk_norm``)."""
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, S, self.n_heads + 2 * self.n_kv_heads, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def project_kv(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the encoder output: ``(B, S_src, H_kv, D)`` each."""
        B, S, _ = memory.shape
        k, v = self.kv_proj(memory).view(B, S, 2, self.n_kv_heads, self.head_dim).unbind(2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask=None,
        rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        rotary=None,
        cache=None,
        layer_idx: int = 0,
        cache_position: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to itself (self) or to ``memory`` (cross).

        Args:
            x: ``(B, S, d_model)`` queries' input.
            mask: a :class:`~transformer.layers.MaskPlan` (built here, after the cache update,
                from the positions the cache reports), a boolean ``(B or 1, 1, S, kv_len)``
                tensor (``True`` = may attend), or ``None`` (attend to every key).
            rope: ``(cos, sin)`` of the new tokens' positions, from ``rotary``, or ``None``.
            rotary: the :class:`~transformer.layers.RotaryEmbedding`, for a cache whose returned
                keys still owe a rotation after its update (``cache.rotary_offsets``).
            cache: self-attention: a ``kv_cache.Cache``; cross-attention: an
                ``EncoderDecoderCache`` (its cross half is filled once, then reused).
            layer_idx: which layer of the cache this module owns.
            cache_position: where the new keys go in the cache (``None`` = append).
            memory: ``(B, S_src, d_model)`` encoder output (cross-attention only).
        """
        B, S, _ = x.shape
        is_causal = isinstance(mask, MaskPlan) and mask.is_causal
        attend = None  # set for a cache that computes attention over its own storage (QuantizedKVCache.attend)
        if self.is_cross:
            q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
            k, v = self._cross_kv(memory, cache, layer_idx)
        else:
            q, k, v = self.project_qkv(x)
            if rope is not None:  # keys are rotated once, at their position, and cached rotated
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is None:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            else:
                layout = cache.layout
                attend = getattr(cache, "attend", None)
                if attend is not None:  # a cache that attends over its own compressed storage (quantized blocks)
                    cache.store(_from_bshd(k, layout), _from_bshd(v, layout), layer_idx, cache_position)
                else:
                    k, v = cache.update(_from_bshd(k, layout), _from_bshd(v, layout), layer_idx, cache_position)
                    k, v = _to_bhsd(k, layout), _to_bhsd(v, layout)
                    owed = None if rope is None else cache.rotary_offsets(layer_idx)
                    if owed is not None:  # a cache whose kept keys move (StreamingLLM's sinks): O(len(owed))
                        _rotate_front(k, owed, rotary)
        if isinstance(mask, MaskPlan):
            # built once per forward, shared by the layers: an additive tensor, or the compressed
            # mask of packed sequences (VarlenMask), or a BlockMask over a paged pool
            mask = mask.build(cache, layer_idx, q.dtype)
        gqa = self.n_kv_heads != self.n_heads
        if attend is not None:  # reads the packed blocks in place, an online softmax across them
            y = attend(q.transpose(1, 2), layer_idx, mask=mask, is_causal=is_causal).transpose(1, 2)
            return self.resid_dropout(self.out_proj(y.reshape(B, S, self.n_heads * self.head_dim)))
        k, v = k.to(q.dtype), v.to(q.dtype)
        if isinstance(mask, VarlenMask):  # packed sequences on a GPU: (1, T) queries over (1, N) keys
            y = varlen_attention(q[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0], mask, enable_gqa=gqa)  # (T, H, D)
        elif isinstance(mask, PagedMask):  # a paged pool read in place on a CPU: each query reads only its own keys
            y = paged_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask.block_table, mask.block_size,
                                mask.query_positions, mask.query_rows, mask.window)  # (B, S, H, D)
        elif mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask: a paged pool read in place
            y = flex_attention(q.transpose(1, 2).contiguous(), k, v, block_mask=mask, enable_gqa=gqa).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa,
            ).transpose(1, 2)  # (B, S, H, D)
        return self.resid_dropout(self.out_proj(y.reshape(B, S, self.n_heads * self.head_dim)))

    def _cross_kv(self, memory, cache, layer_idx):
        """Keys/values of the encoder output in ``(B, H_kv, S_src, D)``: projected or cached."""
        if cache is not None and cache.has_cross(layer_idx):
            k, v = cache.get_cross(layer_idx)
            layout = cache.cross_attention_cache.layout
            return _to_bhsd(k, layout), _to_bhsd(v, layout)
        if memory is None:
            raise ValueError("cross-attention needs `memory` (the encoder output) when its keys/values are not cached")
        k, v = self.project_kv(memory)
        if cache is None:
            return k.transpose(1, 2), v.transpose(1, 2)
        layout = cache.cross_attention_cache.layout
        k, v = cache.set_cross(layer_idx, _from_bshd(k, layout), _from_bshd(v, layout))
        return _to_bhsd(k, layout), _to_bhsd(v, layout)
