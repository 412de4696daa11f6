"""Fused matrix products for decoding on a GPU: the norm before a product, the activation
before it and the residual add after it, in the product's own kernel (Triton).

Why
===

Decoding a token at batch 1 to 16 reads every weight once; each product is bound by memory,
and the small ones by the fixed cost of a kernel (~5 us in a CUDA graph on an H200, however few
bytes it reads; ``benchmarks/results/llama_gemv_gpu.md``).  A Llama block in the ordinary form
runs ten or so kernels per layer: RMSNorm, the q/k/v product, RoPE and the cache write,
attention, the output product, the residual add, RMSNorm again, the gate/up product, SiLU times
up, the down product (plus cuBLAS's split-K reduction) and the residual add.  Everything but
the products and attention moves only a few kilobytes, and each costs a launch.  Here those
pieces ride inside the products:

* ``norm``: ``rms_norm(x) @ W``: each program computes the rows' root mean square from ``x``
  itself (``K`` numbers per row, from L2) and scales the ``x`` tile it multiplies;
* ``gated``: ``(silu(gate) * up) @ W`` for ``x = [gate | up]``: the activation is applied to the
  ``x`` tile as it is loaded (the down projection's input);
* ``bias`` and ``residual``: ``x @ W + b + r`` in the epilogue.

A layer then runs five kernels around attention: norm + q/k/v, attention (with RoPE and the
cache write around it, as before), output product + residual, norm + gate/up, SiLU + down +
residual.  Each rounds where the unfused layer rounds (the norm's and the activation's outputs
and the product to the model's dtype before the residual add), so the two differ only in the
order of the sums.

Layout
======

Weights are :class:`~transformer.layers.Linear`'s ``(in, out)``: a program owns ``BN`` output
columns and walks ``K`` in ``BK``-row tiles, each tile ``BK`` rows of ``BN`` contiguous numbers.
Small products (``N = 2048``) have too few column tiles to fill the GPU, so ``K`` may be split
over ``SPLIT`` programs: each writes its float32 partial sums to a workspace, and the last of
a tile's programs to arrive (counted with an atomic, self-resetting counter) adds the partials
in a fixed order and writes the result.  The sum is therefore the same whichever program
finishes last: deterministic, unlike split-K by atomic adds.

Rows: one (a ``(BK,) x (BK, BN)`` weighted sum, in registers) or up to :data:`MAX_ROWS`
(a ``tl.dot`` of a 16-row tile, tensor cores).

Where it runs: :func:`available` (a CUDA tensor of half precision, Triton installed, at most
:data:`MAX_ROWS` rows, no gradient), or Triton's CPU interpreter (``TRITON_INTERPRET=1``, float32
and float16) for the tests.  Elsewhere the callers in :mod:`transformer.layers` run the same maths
unfused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

#: Whether Triton is installed (it ships with CUDA builds of PyTorch); checked without importing it.
HAS_TRITON = importlib.util.find_spec("triton") is not None
#: The most rows (batch x new tokens) a fused product takes: one 16-row tensor-core tile.
MAX_ROWS = 16
#: Where the fused kernel wins, measured on an H200 (Llama-3.2-1B's products, in CUDA graphs,
#: against the compiled unfused pieces; ``benchmarks/gemv_benchmark.py --fused``): products of at
#: most this many weights (16M: q/k/v, the output projection, the down projection), where a
#: kernel's launch and tail cost more than its bytes and one launch instead of two or three pays;
#: the large ones (gate/up 20 vs 33 us, the output head) stay with cuBLAS, which streams them
#: at ~90% of the bandwidth.
MAX_WEIGHTS = 1 << 24
#: The most rows of a product with a norm or a gate in front: at 16 rows the unfused pieces
#: were faster (q/k/v 7.4 vs 12.4 us, down 12.5 vs 27.4); a residual add alone fuses up to
#: :data:`MAX_ROWS` (output projection 6.5 vs 5.9 us at 16 rows, 6.3 vs 5.0 at one).
PROLOGUE_MAX_ROWS = 1

_enabled = True


@contextlib.contextmanager
def disabled():
    """Run the unfused products inside this block (for measuring one against the other and for
    tests).  Read when a forward is traced or run: a step compiled inside keeps what it saw."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def available(x: Tensor, weight: Optional[Tensor] = None, *, norm: bool = False, gated: bool = False) -> bool:
    """Whether the fused kernel serves ``x`` ``(..., K)`` times ``weight``, and wins there.

    Serves: Triton installed, fusion not :func:`disabled`, no gradient to record, and either a
    CUDA tensor of float16/bfloat16 or Triton's CPU interpreter (``TRITON_INTERPRET=1``) with
    float32/float16 (the interpreter runs on NumPy, whose bfloat16 products are wrong).
    Wins (measured, see :data:`MAX_WEIGHTS`): at most :data:`MAX_ROWS` rows, one row with a
    ``norm`` or ``gated`` prologue, and a weight of at most :data:`MAX_WEIGHTS` numbers."""
    if not (_enabled and HAS_TRITON) or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False  # the kernel has no backward
    if x.numel() > (PROLOGUE_MAX_ROWS if norm or gated else MAX_ROWS) * x.shape[-1]:
        return False
    if weight is not None and weight.numel() > MAX_WEIGHTS:
        return False
    if x.device.type == "cuda":
        return x.dtype in (torch.float16, torch.bfloat16)
    return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype in (torch.float32, torch.float16)


def _kernel():
    """The Triton kernel, imported on first use (importing Triton costs a quarter of a second)."""
    import triton

    from .fused_decode_kernels import fused_linear_kernel
    return triton, fused_linear_kernel


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _tiles(M: int, N: int, K: int, device: torch.device) -> Tuple[int, int, int, int, int]:
    """``(BN, BK, SPLIT, num_warps, num_stages)`` for an ``M x K`` by ``K x N`` product, from the
    best tiles measured on an H200 (``benchmarks/gemv_benchmark.py --fused``): one row walks
    ``K`` 256 at a time over 32 or 64 columns; 16 rows take tensor-core tiles of 64 or 128
    columns; ``K`` is split (at most 8 ways) until there are up to four programs per
    streaming multiprocessor."""
    if M == 1:
        bn, bk, warps = (32 if N <= 2048 else 64), 256, 4
    else:
        bn, bk = (64 if N <= 2048 else 128), 128
        warps = 4 if bn == 64 else 8
    tiles, split = -(-N // bn), 1
    while split < 8 and tiles * split * 2 <= 4 * _sm_count(device) and K // (split * 2) >= bk:
        split *= 2
    return bn, bk, split, warps, 3


_counters = {}  # device -> int32 counters, zero between calls (each call's last programs reset theirs)


def _counter(device: torch.device, n: int) -> Tensor:
    c = _counters.get(device)
    if c is None or c.numel() < n:
        c = _counters[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


def fused_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, norm_weight: Optional[Tensor] = None,
                 eps: float = 1e-5, gated: bool = False, residual: Optional[Tensor] = None,
                 tiles: Optional[Sequence[int]] = None) -> Tensor:
    """``residual + act(x') @ weight + bias`` in one kernel, for at most :data:`MAX_ROWS` rows.

    Args:
        x: ``(..., K)``, or ``(..., 2K)`` with ``gated`` (``[gate | up]``).
        weight: ``(K, N)`` (:class:`~transformer.layers.Linear`'s layout), rows contiguous.
        bias: ``(N,)`` or ``None``.
        norm_weight: RMSNorm's weight ``(K,)``: ``x' = rms_norm(x, eps) * norm_weight`` first.
        gated: ``x' = silu(gate) * up``.
        residual: ``(..., N)`` added after the product (rounded to ``x``'s dtype first).
        tiles: ``(BN, BK, SPLIT, num_warps, num_stages)``, a tuning knob (default :func:`_tiles`).

    Returns ``(..., N)`` in ``weight``'s dtype.  Cost: reads ``weight`` once (``K * N`` numbers)
    and ``x`` once per program (from L2); launches one kernel.  A ``torch.library`` custom op
    (``transformer::fused_linear``), so ``torch.compile`` and CUDA graphs take it as one call.
    """
    K, N = weight.shape
    M = x.numel() // x.shape[-1] if x.numel() else 0
    if x.shape[-1] != (2 * K if gated else K) or not 0 < M <= MAX_ROWS or weight.stride(1) != 1 \
            or (residual is not None and residual.shape != (*x.shape[:-1], N)):
        raise ValueError(f"fused_linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"(gated={gated}, 1 to {MAX_ROWS} rows, weight rows contiguous, residual "
                         f"{None if residual is None else tuple(residual.shape)})")
    y = torch.ops.transformer.fused_linear(x.reshape(M, x.shape[-1]), weight, bias, norm_weight, eps, gated,
                                           None if residual is None else residual.reshape(M, N),
                                           None if tiles is None else list(tiles))
    return y.view(*x.shape[:-1], N)


@torch.library.custom_op("transformer::fused_linear", mutates_args=())
def _fused_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor], eps: float,
                     gated: bool, residual: Optional[Tensor], tiles: Optional[List[int]]) -> Tensor:
    """The launch behind :func:`fused_linear`: ``x`` ``(M, K or 2K)``, ``residual`` ``(M, N)``."""
    triton, kernel = _kernel()
    K, N = weight.shape
    M = x.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    y = torch.empty(M, N, dtype=weight.dtype, device=x.device)
    r = residual if residual is not None else y
    bn, bk, split, warps, stages = tiles or _tiles(M, N, K, x.device)
    grid_n = triton.cdiv(N, bn)
    bm = 1 if M == 1 else 16
    parts = torch.empty(split * bm * (N + 1) if split > 1 else 1, dtype=torch.float32, device=x.device)
    kernel[(grid_n, split)](
        x, weight, norm_weight if norm_weight is not None else weight, bias if bias is not None else weight,
        r, y, parts, _counter(x.device, grid_n), M, N, K, x.stride(0), weight.stride(0), r.stride(0), y.stride(0),
        eps, NORM=norm_weight is not None, GATED=gated, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        ONE_ROW=M == 1, SPLIT=split, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return y


@_fused_linear_op.register_fake
def _(x, weight, bias, norm_weight, eps, gated, residual, tiles):
    return x.new_empty(x.shape[0], weight.shape[1], dtype=weight.dtype)
