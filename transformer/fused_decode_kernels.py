"""The Triton kernel of :mod:`transformer.fused_decode` (imported only when it runs: Triton is
needed on a GPU or under its CPU interpreter, never on the CPU paths)."""

import triton
import triton.language as tl


@triton.jit
def _epilogue(acc, rm, rn, n_ok, out_ok, BIAS, R, Y, stride_rm, stride_ym, HAS_BIAS: tl.constexpr,
              RESIDUAL: tl.constexpr):
    """``acc (BM, BN)`` float32 -> ``+ bias``, round to the output dtype, ``+ residual``, store."""
    dt = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.).to(tl.float32)[None, :]
    y = acc.to(dt)
    if RESIDUAL:  # the product rounds to the model's dtype first, as the unfused add sees it
        r = tl.load(R + rm[:, None] * stride_rm + rn[None, :], mask=out_ok, other=0.)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y, mask=out_ok)


@triton.jit
def fused_linear_kernel(X, W, G, BIAS, R, Y, P, C, M, N, K, stride_xm, stride_wk, stride_rm, stride_ym, eps,
                        NORM: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                        ONE_ROW: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``Y = R + act(X) @ W + BIAS`` for ``M <= 16`` rows; program ``(n, k)`` owns columns
    ``n * BN ..`` and the ``k``-th of ``SPLIT`` slices of ``K`` (see ``fused_decode``)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    BM: tl.constexpr = 1 if ONE_ROW else 16
    rm = tl.arange(0, BM)
    m_ok = rm < M
    dt = W.dtype.element_ty
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)  # the rows' sums of squares (NORM), over this program's slice of K
    for k0 in range(pid_k * k_per, tl.minimum((pid_k + 1) * k_per, K), BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x_ok = m_ok[:, None] & k_ok[None, :]
        xk = X + rm[:, None] * stride_xm + rk[None, :]
        x = tl.load(xk, mask=x_ok, other=0.)
        if GATED:  # x = [gate | up]: silu(gate) * up, rounded where the unfused layer rounds
            up = tl.load(xk + K, mask=x_ok, other=0.).to(tl.float32)
            g = x.to(tl.float32)
            x = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * up).to(dt)
        if NORM:  # rms_norm(x) @ W = (x * g) @ W / rms(x): the row's scale waits for the epilogue
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
            nw = tl.load(G + rk, mask=k_ok, other=0.).to(tl.float32)
            x = (xf * nw[None, :]).to(dt)
        w = tl.load(W + rk[:, None] * stride_wk + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.)
        if ONE_ROW:  # (1, BK) x (BK, BN): a weighted sum of the tile's rows
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w.to(tl.float32), axis=0)[None, :]
        else:
            acc += tl.dot(x.to(dt), w, out_dtype=tl.float32)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:  # park the partial sums; the tile's last program adds them in a fixed order
        tl.store(P + (pid_k * BM + rm[:, None]) * N + rn[None, :], acc, mask=out_ok)
        if NORM:  # every column tile computes the same sums for slice k: whichever writes last, the same bits
            tl.store(P + SPLIT * BM * N + pid_k * BM + rm, ss)
        tl.debug_barrier()
        arrived = tl.atomic_add(C + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(SPLIT):
                acc += tl.load(P + (s * BM + rm[:, None]) * N + rn[None, :], mask=out_ok, other=0.,
                               cache_modifier=".cg")
            if NORM:
                ss = tl.zeros((BM,), dtype=tl.float32)
                for s in range(SPLIT):
                    ss += tl.load(P + SPLIT * BM * N + s * BM + rm, cache_modifier=".cg")
                acc = acc * tl.rsqrt(ss / K + eps)[:, None]
            _epilogue(acc, rm, rn, n_ok, out_ok, BIAS, R, Y, stride_rm, stride_ym, HAS_BIAS, RESIDUAL)
            tl.atomic_xchg(C + pid_n, 0)  # ready for the next call (a CUDA graph replays it)
    else:
        if NORM:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        _epilogue(acc, rm, rn, n_ok, out_ok, BIAS, R, Y, stride_rm, stride_ym, HAS_BIAS, RESIDUAL)
