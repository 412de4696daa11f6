"""The Triton kernels of :mod:`~kv_cache.long_context.quantized_triton` (imported on first use:
importing Triton costs a quarter of a second that CPU-only runs should not pay).  Read that
module's docstring first; the shapes and the block-diagonal query trick are explained there."""

import triton
import triton.language as tl


@triton.jit
def _codes(P, row, t, live, PLANE: tl.constexpr, NBITS: tl.constexpr, DTYPE: tl.constexpr):
    """The codes of tokens ``t`` ``(BLOCK_N,)`` of one (batch, kv head) row as ``(BLOCK_N, D)``
    ``DTYPE`` (small integers: exact in every float type).  The bytes are loaded once, as one
    contiguous ``(BLOCK_N, PLANE)`` tile; plane ``i`` (bits ``i * NBITS ..``) is channels
    ``i * PLANE .. (i + 1) * PLANE - 1`` (the planar packing), so the planes are cut out with
    one shift and mask each and laid side by side with ``join`` / ``permute`` / ``reshape``."""
    b = tl.arange(0, PLANE)
    raw = tl.load(P + row + t[:, None] + b[None, :], mask=live[:, None], other=0)
    MASK: tl.constexpr = (1 << NBITS) - 1
    if NBITS == 8:
        codes = raw
    elif NBITS == 4:
        codes = tl.reshape(tl.permute(tl.join(raw & MASK, raw >> 4), (0, 2, 1)), (raw.shape[0], 2 * PLANE))
    else:  # 2 bits: element [.., i, j] of the nested join is plane 2 * i + j
        pairs = tl.join(tl.join(raw & MASK, (raw >> 4) & MASK), tl.join((raw >> 2) & MASK, raw >> 6))
        codes = tl.reshape(tl.permute(pairs, (0, 2, 3, 1)), (raw.shape[0], 4 * PLANE))
    return codes.to(DTYPE)


@triton.jit
def _group_tile(S, row, t, live, group, G: tl.constexpr):
    """``S[t, group]`` as float32 ``(ROWS, BLOCK_N)``: each query row's group's scale (or
    minimum) for every token -- the (tokens x groups) block is contiguous, so this load is."""
    return tl.load(S + row + t[None, :] * G + group[:, None], mask=live[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decode_split_kernel(Q, KP, KS, KM, VP, VS, VM, M_OUT, L_OUT, ACC_OUT, n, cap, split_len, R, SCALE,
                         D: tl.constexpr, NBITS: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """First half of flash-decoding: one program walks one slice of one (batch row, kv head)'s
    quantized tokens and writes its running max ``m``, running sum ``l`` and unnormalised output
    ``acc`` for each query row (see the module docstring of ``quantized_triton``)."""
    bh, sp = tl.program_id(0), tl.program_id(1)  # (batch row x kv head, slice of the tokens)
    PLANE: tl.constexpr = D * NBITS // 8
    GS: tl.constexpr = D // G
    DTYPE: tl.constexpr = Q.dtype.element_ty if HALF else tl.float32
    RG: tl.constexpr = ROWS // G  # query rows (padded) x groups = ROWS
    row = tl.arange(0, ROWS)
    r, group = row // G, row % G  # a kernel row is (query row r, group)
    d = tl.arange(0, D)
    # block-diagonal query: kernel row (r, g) holds query row r's channels of group g, zeros elsewhere,
    # so ONE product with the raw codes gives every group's partial score
    q = tl.load(Q + (bh * R + r[:, None]) * D + d[None, :],
                mask=(r[:, None] < R) & ((d // GS)[None, :] == group[:, None]), other=0.0)
    q_sum = tl.sum(q.to(tl.float32), 1)  # (ROWS,): the query summed over its group, the minima's weight
    q = q.to(DTYPE)
    start = sp * split_len
    end = tl.minimum(start + split_len, n)
    m = tl.full((RG,), float("-inf"), tl.float32)
    l = tl.zeros((RG,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)  # row (r, g): group g's scaled share; only its own channels are kept
    acc_min = tl.zeros((ROWS,), tl.float32)  # row (r, g): sum_t p_t * minimum[t, g]
    codes_row, scales_row = bh.to(tl.int64) * cap * PLANE, bh.to(tl.int64) * cap * G  # contiguous storage
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        live = t < end
        codes = _codes(KP, codes_row, t * PLANE, live, PLANE, NBITS, DTYPE)  # (BLOCK_N, D)
        if HALF:
            part = tl.dot(q, tl.trans(codes))  # (ROWS, BLOCK_N): q_g . codes_g
        else:
            part = tl.dot(q, tl.trans(codes), input_precision="ieee")
        part = part * _group_tile(KS, scales_row, t, live, group, G) + \
            q_sum[:, None] * _group_tile(KM, scales_row, t, live, group, G)
        scores = tl.sum(tl.reshape(part, (RG, G, BLOCK_N)), 1) * SCALE  # (RG, BLOCK_N)
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # (RG, BLOCK_N)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
        p_rows = tl.reshape(tl.broadcast_to(p[:, None, :], (RG, G, BLOCK_N)), (ROWS, BLOCK_N))
        a_rows = tl.reshape(tl.broadcast_to(alpha[:, None], (RG, G)), (ROWS,))
        codes = _codes(VP, codes_row, t * PLANE, live, PLANE, NBITS, DTYPE)
        ps = p_rows * _group_tile(VS, scales_row, t, live, group, G)
        if HALF:  # p rounded to half precision, as FlashAttention does for its values product
            acc = acc * a_rows[:, None] + tl.dot(ps.to(DTYPE), codes)
        else:
            acc = acc * a_rows[:, None] + tl.dot(ps, codes, input_precision="ieee")
        acc_min = acc_min * a_rows + tl.sum(p_rows * _group_tile(VM, scales_row, t, live, group, G), 1)
    # row (r, g) keeps the channels of group g (plus its minima's share): summing a query row's
    # G kernel rows gives the whole output row
    own = (d // GS)[None, :] == group[:, None]
    out_rows = tl.sum(tl.reshape(tl.where(own, acc + acc_min[:, None], 0.0), (RG, G, D)), 1)  # (RG, D)
    out = bh * tl.num_programs(1) + sp
    rr = tl.arange(0, RG)
    tl.store(M_OUT + out * RG + rr, m)
    tl.store(L_OUT + out * RG + rr, l)
    tl.store(ACC_OUT + out * RG * D + rr[:, None] * D + d[None, :], out_rows)


@triton.jit
def _merge_kernel(M, L, ACC, Q, RK, RV, OUT, splits, r, R, SCALE, RG, RK_BH, RV_BH,
                  D: tl.constexpr, ROWS: tl.constexpr, SPLITS: tl.constexpr, RES: tl.constexpr):
    """Second half of flash-decoding: merge a (batch, kv head)'s slices ``(m, l, acc)`` and, when
    ``RES > 0``, its exact tail of ``r <= RES`` tokens (``RK_BH`` / ``RV_BH``: elements from one
    (batch, kv head)'s tail to the next: the tail may be a prefix of a longer buffer); write
    ``acc / l`` in ``OUT``'s dtype."""
    bh = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    sl = tl.arange(0, SPLITS)
    m = tl.load(M + bh * splits * RG + sl[:, None] * RG + rows[None, :],
                mask=(sl[:, None] < splits) & (rows[None, :] < R), other=float("-inf"))  # (SPLITS, ROWS)
    top = tl.max(m, 0)
    if RES > 0:
        t = tl.arange(0, RES)
        q = tl.load(Q + (bh * R + rows[:, None]) * D + d[None, :], mask=rows[:, None] < R,
                    other=0.0).to(tl.float32)
        rk = tl.load(RK + bh * RK_BH + t[:, None] * D + d[None, :], mask=t[:, None] < r, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(rk), input_precision="ieee") * SCALE  # (ROWS, RES)
        s = tl.where(t[None, :] < r, s, float("-inf"))
        top = tl.maximum(top, tl.max(s, 1))
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    top = tl.where(rows < R, top, 0.0)  # padding rows: keep them finite
    for i in range(0, splits):
        live = rows < R
        w = tl.exp(tl.load(M + (bh * splits + i) * RG + rows, mask=live, other=0.0) - top)
        total += w * tl.load(L + (bh * splits + i) * RG + rows, mask=live, other=0.0)
        acc += w[:, None] * tl.load(ACC + (bh * splits + i) * RG * D + rows[:, None] * D + d[None, :],
                                    mask=live[:, None], other=0.0)
    if RES > 0:
        p = tl.exp(s - top[:, None])
        total += tl.sum(p, 1)
        rv = tl.load(RV + bh * RV_BH + t[:, None] * D + d[None, :], mask=t[:, None] < r, other=0.0).to(tl.float32)
        acc += tl.dot(p, rv, input_precision="ieee")
    total = tl.where(rows < R, total, 1.0)
    tl.store(OUT + (bh * R + rows[:, None]) * D + d[None, :],
             (acc / total[:, None]).to(OUT.dtype.element_ty), mask=rows[:, None] < R)
