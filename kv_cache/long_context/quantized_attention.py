"""Attention that reads a quantized KV cache block by block (the flash-decoding pattern).

``QuantizedKVCache.update`` returns the whole history dequantized: ``2 * n * H_kv * D`` floats
written and read again every step, for every layer -- at 16K tokens that is 20x the time of
attention over a plain float cache.  :func:`quantized_attention` never builds that history.
It walks the quantized tokens in blocks of ``block`` tokens; for each block it

1. widens the codes into a small float scratch buffer and applies the block's scales and
   minima in place (``x = minimum + code * scale``, exactly :func:`~kv_cache.long_context.
   quantized.dequantize`'s arithmetic),
2. scores the queries against the block's keys (one matrix product),
3. folds the block into a running softmax -- the *online softmax* of FlashAttention: keep per
   query the largest score so far ``m``, the sum of ``exp(score - m)`` so far ``l`` and the
   weighted sum of values so far ``acc``; a new block with larger scores rescales both by
   ``exp(m_old - m_new)``,
4. dequantizes the block's values the same way and adds ``exp(score - m) @ values`` to ``acc``,

and finally treats the exact residual tail (the newest tokens, kept in full precision) as one
more block.  The answer is ``acc / l``: the same softmax-weighted average as attention over the
dequantized history, up to float rounding (``tests/test_long_context_quantized.py`` pins it).

Why blocks, and why scratch buffers: a block of 256 tokens x 32 heads x 128 channels is 4 MiB
of float32, which stays in the CPU's caches between the widening, the scaling and the matrix
product; and reusing one scratch buffer avoids asking the allocator (and the kernel's page
faults) for fresh memory every block.  Both matter more on a CPU than the arithmetic does
(measured in ``benchmarks/long_context_benchmark.py``: 8-bit at 16K tokens goes from 20x the
full cache's step to about 1.5x).  On a GPU larger blocks keep the number of kernel launches
small (``block`` defaults to 8192 there).

Cost per call: reads ``n * H_kv * D * nbits / 8`` bytes of codes plus the scales, ``O(S * n *
H * D)`` arithmetic like any attention, and ``O(block * H_kv * D)`` memory of scratch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


#: Blocks per softmax tile: the scores of ``TILE_BLOCKS * block`` tokens go to one small buffer and
#: are merged into the running softmax at once (fewer small operations per token than per block).
TILE_BLOCKS = 16


def default_block(device: torch.device) -> int:
    """Tokens per block: 256 on a CPU (the block's floats stay in cache), 8192 on a GPU (few launches)."""
    return 256 if torch.device(device).type == "cpu" else 8192


def _widen_codes(packed: Tensor, nbits: int, out: Tensor) -> Tensor:
    """Write the integer codes of ``packed`` ``(B, H, w, D * nbits // 8)`` into float ``out``
    ``(B, H, w, D)`` *plane by plane*: with ``per = 8 // nbits`` codes in a byte, code ``i`` of
    every byte (channels ``i, i + per, ...``) goes to ``out[..., i * D/per:(i + 1) * D/per]``.
    Contiguous writes instead of every ``per``-th float; the query is permuted the same way
    (:func:`plane_order`), so scores and outputs do not change.  One pass per plane."""
    if nbits == 8:
        return out.copy_(packed)
    per, mask = 8 // nbits, 2 ** nbits - 1
    planes = out.unflatten(-1, (per, -1))
    for i in range(per):
        planes[..., i, :].copy_((packed >> (nbits * i)) & mask if i else packed & mask)
    return out


def plane_order(x: Tensor, nbits: int, inverse: bool = False) -> Tensor:
    """Channels of ``x`` ``(..., D)`` in the plane order of :func:`_widen_codes` (channel
    ``per * j + i`` to ``i * D/per + j``), or back with ``inverse``.  Identity for 8 bits."""
    per = 8 // nbits
    if per == 1:
        return x
    if inverse:
        return x.unflatten(-1, (per, -1)).transpose(-1, -2).flatten(-2)
    return x.unflatten(-1, (-1, per)).transpose(-1, -2).flatten(-2)


def _dequantize_into(packed: Tensor, scale: Tensor, minimum: Tensor, nbits: int, out: Tensor) -> Tensor:
    """Quantized tokens (``packed`` codes, float32 ``scale``/``minimum`` ``(B, H, w, planes * groups)``) as
    float32 in ``out`` ``(B, H, w, D)`` in plane order: widen the codes, then ``* scale + minimum``
    in place (a group of ``group_size`` channels is ``group_size / per`` channels in each plane)."""
    _widen_codes(packed, nbits, out)
    groups = out.unflatten(-1, (scale.shape[-1], -1))  # (B, H, w, planes * groups, group_size / per)
    groups.mul_(scale[..., None]).add_(minimum[..., None])
    return out


def _per_plane(t: Tensor, nbits: int) -> Tensor:
    """float16 scales or minima ``(B, H, w, groups)`` as float32 ``(B, H, w, planes * groups)``,
    one copy per plane of :func:`_widen_codes` (a 5-D broadcast is far slower than a 4-D one)."""
    per = 8 // nbits
    t = t.float()
    return t if per == 1 else t.unsqueeze(-2).expand(*t.shape[:-1], per, t.shape[-1]).flatten(-2)


@torch.no_grad()
def quantized_attention(query: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], n_quantized: int,
                        nbits: int, residual_keys: Optional[Tensor] = None, residual_values: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None, is_causal: bool = False, scale: Optional[float] = None,
                        block: Optional[int] = None) -> Tensor:
    """Softmax attention of ``query`` over quantized keys/values plus an exact tail, block by block.

    Args:
        query: ``(B, H, S, D)`` (any float dtype; the arithmetic is float32).
        keys, values: ``(packed, scale, minimum)`` storage of a ``QuantizedKVCache`` layer, each
            ``(B, H_kv, capacity, *)``; tokens ``0..n_quantized-1`` are read.  ``H_kv`` divides
            ``H`` (grouped-query attention: query heads ``h * H / H_kv ..`` share kv head ``h``).
        n_quantized: quantized tokens to read.
        nbits: bits per code (8, 4 or 2).
        residual_keys, residual_values: ``(B, H_kv, r, D)`` exact newest tokens, or ``None``.
        mask: ``None`` (every key visible), or boolean (``True`` = may attend) or additive,
            broadcastable to ``(B, H, S, n)`` with ``n = n_quantized + r`` keys in time order.
        is_causal: query ``i`` sits at position ``n - S + i`` and sees keys up to it (a prompt);
            combined with ``mask`` if both are given.
        scale: score scale, default ``1 / sqrt(D)``.
        block: tokens per block (default :func:`default_block`).

    Returns ``(B, H, S, D)`` in ``query``'s dtype.  A query that sees no key gets zeros.
    Inference only: no gradient flows (rounding to codes has none anyway), and the in-place
    arithmetic on the scratch buffers is what keeps it fast.
    """
    B, H, S, D = query.shape
    if n_quantized == 0 and residual_keys is None:
        raise ValueError("quantized_attention needs some key: n_quantized=0 and no residual_keys")
    H_kv = (keys[0] if n_quantized else residual_keys).shape[1]
    if H % H_kv:
        raise ValueError(f"query heads H={H} must be a multiple of the cache's key/value heads H_kv={H_kv}")
    block = default_block(query.device) if block is None else block
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (tokens per block), got {block!r}")
    r = 0 if residual_keys is None else residual_keys.shape[2]
    n, g = n_quantized + r, H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = plane_order(query.float() * scale, nbits).reshape(B, H_kv, g * S, D)  # a kv head's g heads as g*S rows
    bias = _additive_mask(mask, is_causal, B, H, H_kv, g, S, n, query.device)  # (B|1, H_kv|1, g*S, n) or None

    m = torch.full((B, H_kv, g * S, 1), float("-inf"), device=query.device)
    l = torch.zeros(B, H_kv, g * S, 1, device=query.device)
    acc = torch.zeros(B, H_kv, g * S, (values[0].shape[-1] * 8 // nbits) if n_quantized else residual_values.shape[-1],
                      device=query.device)
    if n_quantized:  # one scratch block for keys and one for values, reused by every block
        width = min(block, n_quantized)
        k_buf = torch.empty(B, H_kv, width, keys[0].shape[-1] * 8 // nbits, device=query.device)
        v_buf = torch.empty(B, H_kv, width, acc.shape[-1], device=query.device)

    def fold(tile_a: int, tile_b: int, m: Tensor, l: Tensor, acc: Tensor, exact=None):
        """One softmax tile (tokens ``tile_a..tile_b-1``): its scores block by block into one small
        buffer, one online-softmax merge into ``(m, l, acc)``, then its values block by block."""
        scores = q.new_empty(B, H_kv, g * S, tile_b - tile_a)
        if exact is None:  # the tile's float16 scales and minima widened once, not per block
            ks, km, vs, vm = (_per_plane(t[:, :, tile_a:tile_b], nbits) for t in (keys[1], keys[2], values[1], values[2]))
            for i in range(0, tile_b - tile_a, block):
                j = min(tile_b - tile_a, i + block)
                k = _dequantize_into(keys[0][:, :, tile_a + i:tile_a + j], ks[:, :, i:j], km[:, :, i:j], nbits,
                                     k_buf[:, :, :j - i])
                torch.matmul(q, k.transpose(-1, -2), out=scores[..., i:j])
        else:
            torch.matmul(q, plane_order(exact[0].float(), nbits).transpose(-1, -2), out=scores)
        if bias is not None:
            scores += bias[..., tile_a:tile_b]
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        if bias is not None:  # a row that has seen only masked keys so far: keep exp() away from inf - inf
            m_new = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = scores.sub_(m_new).exp_()
        correction = torch.exp(m - m_new)
        l = l.mul_(correction).add_(p.sum(-1, keepdim=True))
        acc = acc.mul_(correction)
        if exact is None:
            for i in range(0, tile_b - tile_a, block):
                j = min(tile_b - tile_a, i + block)
                v = _dequantize_into(values[0][:, :, tile_a + i:tile_a + j], vs[:, :, i:j], vm[:, :, i:j], nbits,
                                     v_buf[:, :, :j - i])
                acc += p[..., i:j] @ v
        else:
            acc += p @ plane_order(exact[1].float(), nbits)
        return m_new, l, acc

    tile = block * TILE_BLOCKS
    for a in range(0, n_quantized, tile):
        m, l, acc = fold(a, min(n_quantized, a + tile), m, l, acc)
    if r:
        m, l, acc = fold(n_quantized, n, m, l, acc, exact=(residual_keys, residual_values))
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    return plane_order(out, nbits, inverse=True).reshape(B, H, S, acc.shape[-1]).to(query.dtype)


def _additive_mask(mask: Optional[Tensor], is_causal: bool, B: int, H: int, H_kv: int, g: int, S: int, n: int,
                   device) -> Optional[Tensor]:
    """``mask`` (and causality) as an additive float mask laid out like the grouped queries:
    ``(B or 1, H_kv or 1, g * S, n)``; ``None`` when every key is visible."""
    if mask is None and not is_causal:
        return None
    bias = torch.zeros(1, 1, S, n, device=device)
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-1] != n or mask.shape[-2] not in (1, S):
            raise ValueError(f"mask must be (B or 1, H or 1, S or 1, n) = (.., .., {S}, {n}), got {tuple(mask.shape)}")
        add = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool \
            else mask.float()
        bias = bias + add  # (B|1, H|1, S, n)
    if is_causal:
        q_pos = torch.arange(n - S, n, device=device)[:, None]
        bias = bias.masked_fill(torch.arange(n, device=device)[None] > q_pos, float("-inf"))
    Bm, Hm = bias.shape[:2]
    if Hm == 1:  # one mask for every head: repeat it for the g query heads sharing a kv head
        return bias.expand(Bm, 1, S, n).repeat(1, 1, g, 1) if g > 1 else bias
    return bias.reshape(Bm, H_kv, g * S, n)
