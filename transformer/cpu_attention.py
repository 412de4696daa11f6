"""Paged attention on a CPU: each query reads only its own sequence's keys, where they are.

A serving engine keeps every sequence's keys in fixed-size blocks of one shared pool (see
``kv_cache/paged``).  On a GPU, FlexAttention reads those blocks in place, the block tables
serving as its sparse layout.  On a CPU PyTorch has no kernel that does this well (measured,
``docs/serving.md``):

* FlexAttention's CPU path scores every slot of the pool (21 ms a decode call at 64 rows);
* gathering each row's blocks into a padded batch and calling ``scaled_dot_product_attention``
  copies the whole history every step, then reads it again;
* SDPA over dense per-request rows (``kv_cache.paged.rows``) reads every row padded to the
  step's longest (1.7x the keys it needs on the serving benchmark), at ~8-10 GB/s on this
  project's 2-core test VM whose memory streams at ~25-30 GB/s: for one query per row its CPU
  kernel pays a small matrix product per (row, head).

So this module holds a small C kernel (the source is below, compiled with the system C
compiler on first use and cached) that does what a paged decode kernel must and nothing else.
For query ``t`` of row ``b`` at position ``p``::

    keys  j = lo .. p              (lo = 0, or p - window + 1 with a sliding window)
    slot  = block_table[b, j // block_size] * block_size + j % block_size
    s_j   = scale * q_t . K[slot]            one pass over the keys, kept in a small buffer
    out_t = sum_j softmax(s)_j * V[slot]     one pass over the values

which is attention's usual rule (the one :func:`~transformer.layers.attention_mask` builds:
causal by position, optionally windowed) over exactly the keys it allows.  Work items are
queries (or, with few queries to share out, (query, key/value head) pairs), spread over the
threads with OpenMP; the ``G`` query heads of a grouped-query head share one read of its keys.
Keys and values are read once each, a key's heads in one contiguous read: cost ``O(sum of the
queries' key counts * H * D)``.  On the test VM it reads ~12-15 GB/s, about half of what a
bare read of the same blocks reaches (the rest is the arithmetic of many short dot products);
a decode layer of 128 rows takes 0.65x the time of SDPA over dense rows, which also read the
padding (``python -m benchmarks.cpu_attention_benchmark``).  float32 only (a CPU engine's
dtype); elsewhere :func:`available` says no and the caller keeps its other path.

This module knows the pool only as a ``(slots, H_kv, D)`` tensor and a block table.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* One work item: query q (H, D) of a row whose pool blocks are `row`, its kv heads g0 .. g1 - 1,
   keys at positions lo .. hi - 1; writes out (H, D) for those heads.  s: scratch for the scores,
   (H, stride).  always_inline, so that the caller's constant D unrolls the inner loops. */
static inline __attribute__((always_inline)) void attend_item(
        const float *q, const float *k, const float *v, const int64_t *row, int64_t lo, int64_t hi,
        int64_t bs, int64_t Hkv, int64_t g0, int64_t g1, int64_t G, const int64_t D, float scale,
        float *s, int64_t stride, float *out) {
    const int64_t n = hi - lo, h0 = g0 * G, h1 = g1 * G, row_elems = Hkv * D;
    /* pass 1: scores, block by block (one table lookup per block); a key's heads are adjacent */
    for (int64_t jb = lo / bs; jb * bs < hi; jb++) {
        const int64_t a = jb * bs > lo ? jb * bs : lo, e = (jb + 1) * bs < hi ? (jb + 1) * bs : hi;
        const float *kb = k + (row[jb] * bs - jb * bs) * row_elems;
        for (int64_t j = a; j < e; j++) {
            const float *kj = kb + j * row_elems;
            for (int64_t g = g0; g < g1; g++)  /* (no division by G in the inner loops) */
                for (int64_t h = g * G; h < (g + 1) * G; h++) {
                    const float *qh = q + h * D, *kh = kj + g * D;
                    float acc = 0.f;
                    #pragma omp simd reduction(+:acc)
                    for (int64_t d = 0; d < D; d++) acc += qh[d] * kh[d];
                    s[h * stride + j - lo] = acc * scale;
                }
        }
    }
    /* softmax of each head's scores (normalised at the end) */
    for (int64_t h = h0; h < h1; h++) {
        float *sh = s + h * stride, m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m;
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) sh[j] = expf(sh[j] - m);  /* glibc's vector expf (libmvec) */
        for (int64_t d = 0; d < D; d++) out[h * D + d] = 0.f;
    }
    /* pass 2: the weighted sum of the values */
    for (int64_t jb = lo / bs; jb * bs < hi; jb++) {
        const int64_t a = jb * bs > lo ? jb * bs : lo, e = (jb + 1) * bs < hi ? (jb + 1) * bs : hi;
        const float *vb = v + (row[jb] * bs - jb * bs) * row_elems;
        for (int64_t j = a; j < e; j++) {
            const float *vj = vb + j * row_elems;
            for (int64_t g = g0; g < g1; g++)
                for (int64_t h = g * G; h < (g + 1) * G; h++) {
                    const float w = s[h * stride + j - lo], *vh = vj + g * D;
                    float *oh = out + h * D;
                    #pragma omp simd
                    for (int64_t d = 0; d < D; d++) oh[d] += w * vh[d];
                }
        }
    }
    for (int64_t h = h0; h < h1; h++) {
        float z = 0.f;
        #pragma omp simd reduction(+:z)
        for (int64_t j = 0; j < n; j++) z += s[h * stride + j];
        const float r = 1.f / z;
        for (int64_t d = 0; d < D; d++) out[h * D + d] *= r;
    }
}

/* out[t, h, :] = softmax_j(scale * q[t, h] . K[slot(t, j), h / G]) @ V[slot(t, j), h / G]
   over the keys j = lo(t) .. pos[t] of row qrow[t] (see the Python module's docstring).
   q, out: (T, H, D); k, v: (slots, Hkv, D); table: (R, W) int64, -1 past a row's blocks;
   pos, qrow: (T,) int64; max_keys: the most keys any query reads.  Returns -1, or a query
   whose row, position or blocks are out of range (nothing was read for it).  A work item is one
   query and a range of its kv heads (all of them when there are enough queries to share out,
   so that each key's heads are one contiguous read). */
int64_t paged_attention_f32(const float *q, const float *k, const float *v, const int64_t *table,
                            const int64_t *pos, const int64_t *qrow, float *out, int64_t T, int64_t R,
                            int64_t W, int64_t slots, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                            int64_t window, int64_t max_keys, float scale, int threads) {
    const int64_t G = H / Hkv;
    int64_t bad = -1;  /* a query whose keys are not all in the pool: nothing is read for it */
    const int64_t split = T >= 4 * threads ? 1 : Hkv;  /* head ranges per query */
    const int64_t items = T * split, per = Hkv / split;
    #pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(H * max_keys));
        #pragma omp for schedule(dynamic, 2)
        for (int64_t it = 0; it < items; it++) {
            const int64_t t = it / split, g0 = (it % split) * per, b = qrow[t], p = pos[t];
            const int64_t lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
            const float *qt = q + t * H * D;
            float *ot = out + t * H * D;
            const int64_t *row = table + b * W;
            int ok = b >= 0 && b < R && p >= 0 && p - lo < max_keys && p / bs < W;
            for (int64_t jb = lo / bs; ok && jb <= p / bs; jb++) ok = row[jb] >= 0 && (row[jb] + 1) * bs <= slots;
            if (!ok) {
                #pragma omp atomic write
                bad = t;
                continue;
            }
            switch (D) {  /* constant head sizes unroll; any other runs the same code generically */
                case 32: attend_item(qt, k, v, row, lo, p + 1, bs, Hkv, g0, g0 + per, G, 32, scale, s, max_keys, ot); break;
                case 64: attend_item(qt, k, v, row, lo, p + 1, bs, Hkv, g0, g0 + per, G, 64, scale, s, max_keys, ot); break;
                case 128: attend_item(qt, k, v, row, lo, p + 1, bs, Hkv, g0, g0 + per, G, 128, scale, s, max_keys, ot); break;
                default: attend_item(qt, k, v, row, lo, p + 1, bs, Hkv, g0, g0 + per, G, D, scale, s, max_keys, ot);
            }
        }
        free(s);
    }
    return bad;
}
"""

#: Compiler flags, tried in turn: tuned for this CPU with OpenMP threads; then without
#: ``-march=native`` (a compiler that does not know it); then single-threaded (no OpenMP, e.g.
#: Apple's clang).  ``-fno-math-errno`` lets the compiler use vector ``expf``.
_FLAG_SETS = (["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], ["-O3", "-fno-math-errno", "-fopenmp"],
              ["-O3", "-fno-math-errno"])
_lib = None  # the loaded library, False when it cannot be built here
_why = ""  # why not, for error messages


def _cache_dir() -> str:
    """Where the compiled kernel is kept: ``$TRANSFORMER_KERNEL_CACHE`` or ``~/.cache/transformer-kernels``."""
    return os.environ.get("TRANSFORMER_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "transformer-kernels")


def _machine_key() -> str:
    """The compiled code is tuned to this CPU (``-march=native``): its name includes the CPU's
    model and feature flags, so a cache shared between machines never hands one another's."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = "".join(line for line in f if line.startswith(("flags", "model name")))
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build(cc: str, flags, directory: str) -> str:
    """The library compiled from :data:`_SOURCE` with ``flags`` in ``directory`` (reused when
    there already).  Raises ``OSError`` (the compiler's message) when it cannot be built."""
    key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _machine_key()]).encode()).hexdigest()[:16]
    path = os.path.join(directory, f"paged_attention_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, so = os.path.join(tmp, "paged_attention.c"), os.path.join(tmp, "paged_attention.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", src, "-o", so, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(done.stderr.strip()[:500])
        os.replace(so, path)  # atomic: a concurrent process sees no file or a whole one
    return path


def _load():
    """Compile (once per source, flags and CPU; cached on disk) and load the kernel library.
    Returns the ``ctypes`` library, or ``None`` with :data:`_why` set when no C compiler works.
    The cache is :func:`_cache_dir`, or a per-user folder under the temporary directory where
    that cannot be written."""
    global _lib, _why
    if _lib is not None:
        return _lib or None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _lib, _why = False, "no C compiler found (set CC, or install gcc)"
        return None
    errors = []
    fallback = os.path.join(tempfile.gettempdir(), f"transformer-kernels-{getattr(os, 'getuid', lambda: 0)()}")
    for flags in _FLAG_SETS:
        for directory in (_cache_dir(), fallback):
            try:
                lib = ctypes.CDLL(_build(cc, flags, directory))
            except OSError as e:  # no compiler there, flags it refuses, a folder it cannot write
                errors.append(str(e))
                continue
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.paged_attention_f32.argtypes = [ptr] * 7 + [i64] * 10 + [ctypes.c_float, ctypes.c_int]
            lib.paged_attention_f32.restype = i64
            _lib = lib
            return lib
    _lib, _why = False, f"{cc} failed: {errors[0]}"
    return None


def why_not() -> str:
    """Why the kernel cannot be built here (empty when it can, or before anyone asked)."""
    return _why


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Can :func:`paged_attention` run for tensors on ``device`` of ``dtype`` here?  A CPU,
    float32, and a working C compiler (compiles the kernel on the first call, ~1 s)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _load() is not None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                    block_size: int, query_positions: torch.Tensor, query_rows: Optional[torch.Tensor] = None,
                    window: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Attention of each query over its own row's keys in a paged pool, read in place.

    Args:
        q: ``(B, S, H, D)`` queries: ``S`` new tokens for each of ``B`` rows (decode), or one
            packed row ``(1, T)`` of several sequences' tokens (prompt chunks, ``query_rows``).
        k, v: the pool's keys and values, ``(slots, H_kv, D)`` (or with a leading 1), slot
            ``block * block_size + i`` holding position ``i`` of that block.
        block_table: ``(R, W)``: the pool blocks of each sequence in order, ``-1`` after its
            last; block ``j`` of a sequence holds its positions ``j * block_size ..``.
        block_size: tokens per block.
        query_positions: ``(B, S)`` each query's position; it sees its sequence's keys at
            positions ``<=`` its own (``> p - window`` too with a ``window``).  Every key it may
            see must be in the pool already (the step's own keys written first).
        query_rows: ``(B, S)`` the block-table row of each query; default: query ``(b, s)``
            reads row ``b``.
        window: optional sliding window (keys within the last ``window`` positions).
        scale: score scale (default ``1 / sqrt(D)``, as ``scaled_dot_product_attention``).

    Returns ``(B, S, H, D)``: what ``scaled_dot_product_attention`` over each sequence's keys
    with the causal (and window) mask gives, up to float rounding.  Cost: each query reads its
    keys and values once, ``O(sum of key counts * H * D)``; no copy of the history.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU paged-attention kernel is not available: {_why}")
    B, S, H, D = q.shape
    k, v = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])
    Hkv = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"paged_attention takes float32 CPU tensors, got {name} {t.dtype} on {t.device}")
    if H % Hkv or k.shape[-1] != D or v.shape != k.shape:
        raise ValueError(f"paged_attention: q heads H={H} must be a multiple of the pool's H_kv={Hkv}, with "
                         f"equal head sizes; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if query_rows is None:
        query_rows = torch.arange(B).view(B, 1).expand(B, S)
    if query_positions.shape != (B, S) or query_rows.shape != (B, S):
        raise ValueError(f"paged_attention: query_positions and query_rows must be (B, S) = {(B, S)}; got "
                         f"{tuple(query_positions.shape)} and {tuple(query_rows.shape)}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    table = block_table.to(torch.int64).contiguous()
    pos, rows = query_positions.to(torch.int64).contiguous(), query_rows.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    most = int(pos.max()) + 1 if pos.numel() else 0  # the scores buffer's width: the most keys a query reads
    window = 0 if window is None else int(window)
    bad = lib.paged_attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), table.data_ptr(), pos.data_ptr(),
                                  rows.data_ptr(), out.data_ptr(), B * S, table.shape[0], table.shape[1], k.shape[0],
                                  H, Hkv, D, block_size, window, min(most, window) if window else most,
                                  D ** -0.5 if scale is None else float(scale), torch.get_num_threads())
    if bad >= 0:
        b, s = divmod(bad, S)
        raise ValueError(f"paged_attention: query ({b}, {s}) at position {int(pos.view(-1)[bad])} of block-table row "
                         f"{int(rows.view(-1)[bad])} reads keys outside the pool: its row must exist (0 <= row < "
                         f"{table.shape[0]}) and hold a block (>= 0, < {k.shape[0] // block_size}) for every position "
                         f"up to its own (block_table has {table.shape[1]} columns of {block_size})")
    return out
