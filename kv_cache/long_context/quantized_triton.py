"""Decoding over a quantized KV cache in one GPU kernel (Triton): flash-decoding with the
dequantization folded into the products.

On a GPU the block loop of :mod:`~kv_cache.long_context.quantized_attention` costs 10-20x the
full cache's step (one launch per operation per block, every block's floats written to memory
and read back), and ``torch.compile``'s kernels for the same maths were no better (measured on
an H200, ``docs/long_context.md``).  Here one program of the split kernel
(:mod:`~kv_cache.long_context.quantized_triton_kernels`) owns one (batch row x kv head, slice of
the tokens) and walks its slice ``BLOCK_N`` tokens at a time, never writing a dequantized number:

1. **Block-diagonal query.**  With ``G`` groups of ``GS`` channels per head, kernel row
   ``(r, g)`` holds query row ``r``'s channels of group ``g`` and zeros elsewhere, so *one*
   tensor-core product ``q_bd @ codes^T`` gives every group's partial score
   ``partial[(r, g), t] = q_r[group g] . code_t[group g]``.  The codes are small integers, exact in
   bfloat16/float16, so for a half-precision query this product is exact.
2. **Scales after the product.**  A score is ``sum_g scale[t, g] * partial[(r, g), t] +
   minimum[t, g] * (q_r summed over group g)``: the scales and minima touch ``rows x BLOCK_N``
   numbers instead of ``BLOCK_N x D``, and they are loaded as one contiguous (tokens x groups) tile.
3. **Online softmax** (FlashAttention's running max ``m`` and sum ``l``) per query row.
4. **Values, the same trick in reverse**: ``acc[(r, g), :] += (p_r * scale[:, g]) @ codes`` and
   ``sum_t p_t * minimum[t, g]``; at the end each row keeps its own group's channels and the
   ``G`` rows of a query row are summed into its output.

The codes of a block are loaded once as a contiguous ``(BLOCK_N, D * nbits / 8)`` byte tile; 4-
and 2-bit planes (the planar packing of :func:`~kv_cache.long_context.quantized._pack`) are cut
out with one shift and mask each and laid side by side.  A second kernel merges the slices'
``(m, l, acc)`` and the exact residual tail (the second half of flash-decoding).

Cost: reads ``n * D * nbits / 8`` code bytes and ``4 n * G`` bytes of float16 scales and minima
per kv head once; writes ``splits * rows * (D + 2)`` floats.  ``rows = R * G`` padded to a power
of two >= 16 (the smallest tensor-core tile), at most :data:`MAX_ROWS` (decoding: a few heads
per kv head, one or a few new tokens).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

#: Whether Triton is installed (it ships with CUDA builds of PyTorch).  Checked without importing
#: it: importing Triton takes a quarter of a second, which a CPU-only run should not pay.
HAS_TRITON = importlib.util.find_spec("triton") is not None

#: Kernel rows per program: (query row, group) pairs, padded to a power of two >= 16 (the
#: smallest ``M`` of a tensor-core ``tl.dot``); more rows than this are left to the block loop.
MAX_ROWS = 64
#: Tokens per step of a program's loop (measured best on an H200 at 32K-131K tokens, with 4
#: programs per multiprocessor, 4 warps, 2 pipeline stages for 8-bit codes and 1 for 4/2-bit).
BLOCK_N = 256
#: The same for float32 queries (float32 tiles of 256 tokens need more shared memory than an H200 has).
BLOCK_N_FLOAT32 = 64
#: Exact tail tokens the merge kernel reads (a cache's ``residual_length``).
MAX_RESIDUAL = 256


def available(query: Tensor, nbits: int, group_size: int, head_dim: int, rows: int, residual: int = 0) -> bool:
    """Whether :func:`quantized_decode` can serve a call with ``rows`` query rows per kv head and
    ``residual`` exact tail tokens: Triton importable, the query on a CUDA device (or Triton's
    CPU interpreter switched on with ``TRITON_INTERPRET=1``, for a float32 or float16 query), a
    power-of-two head size of at least 16 cut into a power-of-two number of groups,
    ``rows x groups <= MAX_ROWS`` and ``residual <= MAX_RESIDUAL``."""
    if not HAS_TRITON or nbits not in (2, 4, 8) or residual > MAX_RESIDUAL:
        return False
    if query.device.type != "cuda" and (os.environ.get("TRITON_INTERPRET") != "1" or query.dtype == torch.bfloat16):
        return False  # (the interpreter runs on NumPy, which has no bfloat16: its bf16 products are wrong)
    pow2 = lambda x: x >= 1 and x & (x - 1) == 0  # noqa: E731
    if head_dim < 16 or not pow2(head_dim) or group_size < 1 or head_dim % group_size:
        return False
    groups = head_dim // group_size
    return pow2(groups) and rows * groups <= MAX_ROWS


def _tail_rows(t: Tensor):
    """``(tensor, elements between (batch, kv head) rows)`` for a ``(B, H, r, D)`` exact tail the
    merge kernel can read as it is: each row's ``r x D`` contiguous, rows evenly spaced (a
    ``QuantizedKVCache`` window, a prefix of its buffer); anything else is copied."""
    B, H, r, D = t.shape
    if t.stride(3) == 1 and t.stride(2) == D and (B == 1 or t.stride(0) == H * t.stride(1)):
        return t, t.stride(1)
    return t.contiguous(), r * D


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@torch.no_grad()
def quantized_decode(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], n: int, nbits: int,
                     residual_keys: Optional[Tensor] = None, residual_values: Optional[Tensor] = None,
                     scale: Optional[float] = None, *, block_n: Optional[int] = None, programs_per_sm: int = 4,
                     num_warps: int = 4, num_stages: Optional[int] = None) -> Tensor:
    """Attention of a few query rows over ``n`` quantized tokens plus an exact tail, no mask.

    Args:
        q: ``(B, H_kv, R, D)``, ``R`` query rows per kv head (``R x groups <= MAX_ROWS``);
            bfloat16 or float16 queries use half-precision tensor-core products (exact on the
            codes), float32 queries exact float32 ones.
        keys, values: ``(packed, scale, minimum)`` as a ``QuantizedKVCache`` layer holds them,
            contiguous ``(B, H_kv, capacity, *)``; tokens ``0..n-1`` are read (``n >= 1``).
        residual_keys, residual_values: ``(B, H_kv, r, D)`` with ``r <= MAX_RESIDUAL``, or ``None``.
        scale: score scale, default ``1 / sqrt(D)``, applied to the float32 scores.

    Returns ``(B, H_kv, R, D)`` in ``q``'s dtype.  Splits the tokens into enough slices to give
    every streaming multiprocessor ``programs_per_sm`` programs, then merges the slices and the
    tail exactly in a second kernel.  ``block_n``, ``programs_per_sm``, ``num_warps`` and
    ``num_stages`` are tuning knobs (defaults measured on an H200, ``docs/long_context.md``).
    """
    if not HAS_TRITON:
        raise RuntimeError("quantized_decode needs Triton (it ships with CUDA builds of PyTorch)")
    import triton

    from .quantized_triton_kernels import _decode_split_kernel, _merge_kernel
    B, H_kv, R, D = q.shape
    G = keys[1].shape[-1]
    r = 0 if residual_keys is None else residual_keys.shape[2]
    if not available(q, nbits, D // G, D, R, r):
        raise ValueError(f"quantized_decode cannot serve R={R} rows, head_dim {D}, groups of {D // G}, {nbits} bits, "
                         f"a tail of {r} tokens on {q.device}; expected what available() accepts "
                         f"(quantized_attention falls back itself)")
    kp, ks, km = keys
    vp, vs, vm = values
    if not all(t.is_contiguous() for t in (kp, ks, km, vp, vs, vm)) or kp.shape[2] != ks.shape[2]:
        raise ValueError("quantized_decode reads a QuantizedKVCache layer's own storage: contiguous "
                         "(B, H_kv, capacity, *) tensors of one capacity")
    half = q.dtype in (torch.bfloat16, torch.float16)
    block_n = (BLOCK_N if half else BLOCK_N_FLOAT32) if block_n is None else block_n
    splits = max(1, min(triton.cdiv(n, block_n), (programs_per_sm * _sm_count(q.device)) // (B * H_kv)))
    split_len = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, split_len)
    rows = max(16, triton.next_power_of_2(R * G))  # kernel rows: (query row, group) pairs, padded
    rg = rows // G
    q = q.contiguous() if half else q.float().contiguous()
    out = torch.empty(B, H_kv, R, D, device=q.device, dtype=q.dtype)
    parts = torch.empty(B * H_kv * splits * rg * (D + 2), device=q.device)  # each slice's (m, l, acc)
    m, l, acc = parts.split([B * H_kv * splits * rg, B * H_kv * splits * rg, B * H_kv * splits * rg * D])
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _decode_split_kernel[(B * H_kv, splits)](
        q, kp, ks, km, vp, vs, vm, m, l, acc, n, kp.shape[2], split_len, R, scale,
        D=D, NBITS=nbits, G=G, ROWS=rows, BLOCK_N=block_n, HALF=half,
        num_warps=num_warps, num_stages=(2 if nbits == 8 else 1) if num_stages is None else num_stages)
    rk, rk_bh = _tail_rows(residual_keys) if r else (q, 0)
    rv, rv_bh = _tail_rows(residual_values) if r else (q, 0)
    _merge_kernel[(B * H_kv,)](
        m, l, acc, q, rk, rv, out, splits, r, R, scale, rg, rk_bh, rv_bh,
        D=D, ROWS=max(16, triton.next_power_of_2(R)), SPLITS=max(16, triton.next_power_of_2(splits)),
        RES=0 if r == 0 else max(16, triton.next_power_of_2(r)))
    return out
