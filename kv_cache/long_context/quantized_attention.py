"""Attention that reads a quantized KV cache block by block (the flash-decoding pattern).

``QuantizedKVCache.update`` returns the whole history dequantized: ``2 * n * H_kv * D`` floats
written and read again every step, for every layer -- at 16K tokens that is 20x the time of
attention over a plain float cache.  :func:`quantized_attention` never builds that history.
It walks the quantized tokens in blocks of ``block`` tokens; for each block it

1. widens the codes into a small float scratch buffer and multiplies them by the block's
   scales in place (``code * scale``),
2. scores the queries against the block's keys (one matrix product),
3. folds the block into a running softmax -- the *online softmax* of FlashAttention: keep per
   query the largest score so far ``m``, the sum of ``exp(score - m)`` so far ``l`` and the
   weighted sum of values so far ``acc``; a new block with larger scores rescales both by
   ``exp(m_old - m_new)``,
4. widens and scales the block's values the same way and adds ``exp(score - m) @ values`` to
   ``acc``,

and finally treats the exact residual tail (the newest tokens, kept in full precision) as one
more block.  The answer is ``acc / l``: the same softmax-weighted average as attention over the
dequantized history (``x = minimum + code * scale``), up to float rounding
(``tests/test_long_context_quantized.py`` pins it).

Where the minima went: a group's ``minimum`` is one number for all of its channels, so its share
of a score is ``minimum * (sum of the query over the group's channels)`` and its share of the
output is ``sum_t p_t * minimum_t`` copied to the group's channels -- both computed in the small
``(tokens, groups)`` space, once per tile, instead of one more pass over every dequantized float.
And why 4- and 2-bit codes cost little more than 8-bit ones: the packing is planar (byte ``j``
holds channel ``j`` of each contiguous plane of ``D / per`` channels), so the planes are cut out
with whole-row ``uint8`` shifts and masks and widened in one contiguous conversion, in the
natural channel order (no permutation of the query, groups stay whole).

Why blocks, and why scratch buffers: a block of 256 tokens x 32 heads x 128 channels is 4 MiB
of float32, which stays in the CPU's caches between the widening, the scaling and the matrix
product; and reusing one scratch buffer avoids asking the allocator (and the kernel's page
faults) for fresh memory every block.  Both matter more on a CPU than the arithmetic does
(measured in ``benchmarks/long_context_benchmark.py``: at 16K tokens 8-bit goes from 20x the
full cache's step to about 1.1x, 4-bit from 24x to about 1.5x).  On a GPU, where this loop
serves masked calls only (decoding takes :mod:`~kv_cache.long_context.quantized_triton`), larger
blocks keep the number of kernel launches small (``block`` defaults to 8192 there).

Cost per call: reads ``n * H_kv * D * nbits / 8`` bytes of codes plus the scales, ``O(S * n *
H * D)`` arithmetic like any attention, and ``O(block * H_kv * D)`` memory of scratch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import quantized_triton

Tensor = torch.Tensor


#: Blocks per softmax tile: the scores of ``TILE_BLOCKS * block`` tokens go to one small buffer and
#: are merged into the running softmax at once (fewer small operations per token than per block).
TILE_BLOCKS = 16


def default_block(device: torch.device) -> int:
    """Tokens per block: 256 on a CPU (the block's floats stay in cache), 8192 on a GPU (few launches)."""
    return 256 if torch.device(device).type == "cpu" else 8192


def _widen_codes(packed: Tensor, nbits: int, out: Tensor, planes: Optional[Tensor] = None) -> Tensor:
    """Write the integer codes of ``packed`` ``(B, H, w, D * nbits // 8)`` into float ``out``
    ``(B, H, w, D)``.  The packing is planar (:func:`~kv_cache.long_context.quantized._pack`): bits
    ``i * nbits ..`` of every byte are the contiguous channels ``i * D/per .. (i + 1) * D/per - 1``.

    The planes are first cut out in ``uint8`` into ``planes`` (a ``(B, H, w, D)`` byte scratch
    buffer: one shift and/or one mask per plane, a quarter of the bytes a float pass moves), then
    widened in one contiguous conversion -- the same single pass the 8-bit codes need."""
    if nbits == 8:
        return out.copy_(packed)
    per, mask = 8 // nbits, 2 ** nbits - 1
    if planes is None:
        planes = torch.empty(out.shape, dtype=torch.uint8, device=out.device)
    cut = planes.unflatten(-1, (per, -1))
    for i in range(per):
        plane = cut[..., i, :]
        if i == 0:
            torch.bitwise_and(packed, mask, out=plane)
        else:  # the top plane needs no mask: the shift leaves only its bits
            torch.bitwise_right_shift(packed, nbits * i, out=plane)
            if i < per - 1:
                plane.bitwise_and_(mask)
    return out.copy_(planes)


def _scaled_codes(packed: Tensor, scale: Tensor, nbits: int, out: Tensor, planes: Optional[Tensor]) -> Tensor:
    """``code * scale`` of quantized tokens as float32 in ``out`` ``(B, H, w, D)``: widen the
    codes, then one in-place multiply by the float32 ``scale`` ``(B, H, w, groups)``.

    The ``+ minimum`` half of :func:`~kv_cache.long_context.quantized.dequantize` is *not* applied
    here: it is one number for a whole group of channels, so the attention adds its share in the
    small space of groups instead (``(q . 1_group) * minimum`` for scores, ``p @ minimum`` for the
    output) -- one pass over ``D`` floats per token saved."""
    _widen_codes(packed, nbits, out, planes)
    out.unflatten(-1, (scale.shape[-1], -1)).mul_(scale[..., None])
    return out


#: The ways :func:`quantized_attention` can run (see its ``method`` argument).
METHODS = ("auto", "blocks", "triton")


@torch.no_grad()
def quantized_attention(query: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], n_quantized: int,
                        nbits: int, residual_keys: Optional[Tensor] = None, residual_values: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None, is_causal: bool = False, scale: Optional[float] = None,
                        block: Optional[int] = None, method: str = "auto") -> Tensor:
    """Softmax attention of ``query`` over quantized keys/values plus an exact tail.

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
        method: ``"blocks"`` (the eager block loop above), ``"triton"`` (one GPU kernel,
            :func:`~kv_cache.long_context.quantized_triton.quantized_decode`: decoding without a
            mask) or ``"auto"``: ``"triton"`` where it can serve the call (a CUDA query, no mask,
            what :func:`~kv_cache.long_context.quantized_triton.available` accepts), else
            ``"blocks"``.

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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r = 0 if residual_keys is None else residual_keys.shape[2]
    n, g = n_quantized + r, H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bias = _additive_mask(mask, is_causal, B, H, H_kv, g, S, n, query.device)  # (B|1, H_kv|1, g*S, n) or None
    if method == "auto":
        groups = keys[1].shape[-1] if n_quantized else 1
        method = "triton" if bias is None and n_quantized and \
            quantized_triton.available(query, nbits, D // groups, D, g * S, r) else "blocks"
    if method == "triton":
        if bias is not None or not n_quantized:
            raise ValueError("method='triton' reads quantized tokens without a mask; got "
                             f"{'a mask' if bias is not None else 'n_quantized=0'} (use method='blocks' or 'auto')")
        out = quantized_triton.quantized_decode(query.reshape(B, H_kv, g * S, D), keys, values, n_quantized, nbits,
                                                residual_keys, residual_values, scale)
        return out.reshape(B, H, S, D).to(query.dtype)
    q = (query.float() * scale).reshape(B, H_kv, g * S, D)  # a kv head's g heads as g*S rows
    m = torch.full((B, H_kv, g * S, 1), float("-inf"), device=query.device)
    l = torch.zeros(B, H_kv, g * S, 1, device=query.device)
    acc = torch.zeros(B, H_kv, g * S, (values[0].shape[-1] * 8 // nbits) if n_quantized else residual_values.shape[-1],
                      device=query.device)
    if n_quantized:  # one scratch block for keys and one for values, reused by every block
        width, groups = min(block, n_quantized), keys[1].shape[-1]
        k_buf = torch.empty(B, H_kv, width, keys[0].shape[-1] * 8 // nbits, device=query.device)
        v_buf = torch.empty(B, H_kv, width, acc.shape[-1], device=query.device)
        planes = None if nbits == 8 else torch.empty(k_buf.shape, dtype=torch.uint8, device=query.device)
        # sum of the query over each group's channels: (q . minimum) per group is the minima's share of a score
        q_groups = q.unflatten(-1, (groups, -1)).sum(-1)  # (B, H_kv, g*S, groups)

    def fold(tile_a: int, tile_b: int, m: Tensor, l: Tensor, acc: Tensor, exact=None):
        """One softmax tile (tokens ``tile_a..tile_b-1``): its scores block by block into one small
        buffer, one online-softmax merge into ``(m, l, acc)``, then its values block by block."""
        scores = q.new_empty(B, H_kv, g * S, tile_b - tile_a)
        if exact is None:  # the tile's float16 scales and minima widened once, not per block
            ks, km, vs, vm = (t[:, :, tile_a:tile_b].float() for t in (*keys[1:], *values[1:]))  # (B, H_kv, w, groups)
            for i in range(0, tile_b - tile_a, block):
                j = min(tile_b - tile_a, i + block)
                k = _scaled_codes(keys[0][:, :, tile_a + i:tile_a + j], ks[:, :, i:j], nbits, k_buf[:, :, :j - i],
                                  None if planes is None else planes[:, :, :j - i])
                torch.matmul(q, k.transpose(-1, -2), out=scores[..., i:j])
            scores += q_groups @ km.transpose(-1, -2)  # the minima's share, in the small space of groups
        else:
            torch.matmul(q, exact[0].float().transpose(-1, -2), out=scores)
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
                v = _scaled_codes(values[0][:, :, tile_a + i:tile_a + j], vs[:, :, i:j], nbits, v_buf[:, :, :j - i],
                                  None if planes is None else planes[:, :, :j - i])
                acc += p[..., i:j] @ v
            acc.unflatten(-1, (groups, -1)).add_((p @ vm)[..., None])  # minima's share: sum_t p_t * minimum_t per group
        else:
            acc += p @ exact[1].float()
        return m_new, l, acc

    tile = block * TILE_BLOCKS
    for a in range(0, n_quantized, tile):
        m, l, acc = fold(a, min(n_quantized, a + tile), m, l, acc)
    if r:
        m, l, acc = fold(n_quantized, n, m, l, acc, exact=(residual_keys, residual_values))
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    return out.reshape(B, H, S, acc.shape[-1]).to(query.dtype)


def _additive_mask(mask: Optional[Tensor], is_causal: bool, B: int, H: int, H_kv: int, g: int, S: int, n: int,
                   device) -> Optional[Tensor]:
    """``mask`` (and causality) as an additive float mask laid out like the grouped queries:
    ``(B or 1, H_kv or 1, g * S, n)``; ``None`` when every key is visible."""
    if mask is None and (not is_causal or S == 1):  # one causal query, the newest, sees every key
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
