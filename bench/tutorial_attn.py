"""Yardstick for bench/aot_report.py: the algorithm of Triton's fused-attention tutorial
(06-fused-attention, Triton 3.x), rewritten here for comparison only; not shipped, not tested
for numbers, never imported by spell_kernels.

Fixed-length batches flattened to (B*H*N, D). Forward: K/V through host TMA descriptors, the
scale folded into one FMA with the row max, causal split into an off-diagonal loop (no mask)
and a diagonal loop (STAGE 1 / 2). Backward: one program per key block computes dk/dv over
the query blocks below it, then (same program, other role) dq for one query block; the
diagonal runs with narrower blocks (MASK_SLICE). Seven matmuls per block pair, like ours.
"""
import triton
import triton.language as tl

# the configurations the tutorial's autotuner favours on H100 (bf16/fp16)
FWD_CONFIG = {64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)}
BWD_CONFIG = dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, MASK_SLICE=2, num_warps=4,
                  num_stages=5)


@triton.jit
def _tut_fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, row0, start_m, qk_scale, offs_m, offs_n, n_ctx,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr):
    if STAGE == 1:
        lo, hi = 0, start_m * BLOCK_M
    elif STAGE == 2:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
    else:
        lo, hi = 0, n_ctx
    row = row0 + lo
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = desc_k.load([row, 0]).T
        qk = tl.dot(q, k)
        if STAGE == 2:
            keep = offs_m[:, None] >= start_n + offs_n[None, :]
            qk = qk * qk_scale + tl.where(keep, 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_blk = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_blk
        m_i = m_new
        row += BLOCK_N
    return acc, l_i, m_i


@triton.jit
def tut_attn_fwd(sm_scale, M, desc_q, desc_k, desc_v, desc_o, n_ctx,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * n_ctx
    q_row = row0 + start_m * BLOCK_M
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504
    q = desc_q.load([q_row, 0])
    if STAGE & 1:  # off-diagonal blocks (causal) or everything
        acc, l_i, m_i = _tut_fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, row0, start_m, qk_scale, offs_m, offs_n,
                                      n_ctx, BLOCK_M, BLOCK_N, 4 - STAGE)
    if STAGE & 2:  # the diagonal block, masked
        acc, l_i, m_i = _tut_fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, row0, start_m, qk_scale, offs_m, offs_n,
                                      n_ctx, BLOCK_M, BLOCK_N, 2)
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + bh * n_ctx + offs_m, m_i)
    desc_o.store([q_row, 0], acc.to(desc_o.dtype))


@triton.jit
def tut_bwd_preprocess(O, DO, Delta, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + offs_m[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    tl.store(Delta + offs_m, tl.sum(o * do, 1))


@triton.jit
def _tut_bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, start_n, start_m, num_steps,
                  BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M1)
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_k = tl.arange(0, HEAD_DIM)
    qT_ptrs = Q + offs_m[None, :] * stride_tok + offs_k[:, None]
    do_ptrs = DO + offs_m[:, None] * stride_tok + offs_k[None, :]
    curr_m = start_m
    for _ in range(num_steps):
        qT = tl.load(qT_ptrs)
        offs_m = curr_m + tl.arange(0, BLOCK_M1)
        m = tl.load(M + offs_m)
        pT = tl.math.exp2(tl.dot(k, qT) - m[None, :])
        if MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs)
        dv += tl.dot(pT.to(do.dtype), do)
        delta = tl.load(D + offs_m)
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk += tl.dot(dsT, tl.trans(qT))
        curr_m += BLOCK_M1
        qT_ptrs += BLOCK_M1 * stride_tok
        do_ptrs += BLOCK_M1 * stride_tok
    return dk, dv


@triton.jit
def _tut_bwd_dq(dq, q, K, V, do, m, D, stride_tok, start_m, start_n, num_steps,
                BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_n = start_n + tl.arange(0, BLOCK_N2)
    offs_k = tl.arange(0, HEAD_DIM)
    kT_ptrs = K + offs_n[None, :] * stride_tok + offs_k[:, None]
    vT_ptrs = V + offs_n[None, :] * stride_tok + offs_k[:, None]
    delta = tl.load(D + offs_m)
    curr_n = start_n
    for _ in range(num_steps):
        kT = tl.load(kT_ptrs)
        vT = tl.load(vT_ptrs)
        p = tl.math.exp2(tl.dot(q, kT) - m)
        if MASK:
            offs_n = curr_n + tl.arange(0, BLOCK_N2)
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, vT).to(tl.float32)
        ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq += tl.dot(ds, tl.trans(kT))
        curr_n += BLOCK_N2
        kT_ptrs += BLOCK_N2 * stride_tok
        vT_ptrs += BLOCK_N2 * stride_tok
    return dq


@triton.jit
def tut_attn_bwd(Q, K, V, sm_scale, DO, DQ, DK, DV, M, D, stride_z, stride_h, stride_tok, H, n_ctx,
                 BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                 MASK_SLICE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K arrives pre-scaled by sm_scale * log2(e) (as in the tutorial); causal."""
    bhid = tl.program_id(2)
    adj = (stride_h * (bhid % H) + stride_z * (bhid // H)).to(tl.int64)
    pid = tl.program_id(0)
    Q += adj
    K += adj
    V += adj
    DO += adj
    DQ += adj
    DK += adj
    DV += adj
    M += (bhid * n_ctx).to(tl.int64)
    D += (bhid * n_ctx).to(tl.int64)
    offs_k = tl.arange(0, HEAD_DIM)

    start_n = pid * BLOCK_N1
    start_m = start_n
    MASK_BLOCK_M1: tl.constexpr = BLOCK_M1 // MASK_SLICE
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    k = tl.load(K + offs_n[:, None] * stride_tok + offs_k[None, :])
    v = tl.load(V + offs_n[:, None] * stride_tok + offs_k[None, :])
    num_steps = BLOCK_N1 // MASK_BLOCK_M1
    dk, dv = _tut_bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, start_n, start_m, num_steps,
                           MASK_BLOCK_M1, BLOCK_N1, HEAD_DIM, True)
    start_m += num_steps * MASK_BLOCK_M1
    num_steps = (n_ctx - start_m) // BLOCK_M1
    dk, dv = _tut_bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, start_n, start_m, num_steps,
                           BLOCK_M1, BLOCK_N1, HEAD_DIM, False)
    tl.store(DV + offs_n[:, None] * stride_tok + offs_k[None, :], dv)
    tl.store(DK + offs_n[:, None] * stride_tok + offs_k[None, :], dk * sm_scale)

    start_m = pid * BLOCK_M2
    end_n = start_m + BLOCK_M2
    MASK_BLOCK_N2: tl.constexpr = BLOCK_N2 // MASK_SLICE
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    q = tl.load(Q + offs_m[:, None] * stride_tok + offs_k[None, :])
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], tl.float32)
    do = tl.load(DO + offs_m[:, None] * stride_tok + offs_k[None, :])
    m = tl.load(M + offs_m)[:, None]
    num_steps = BLOCK_M2 // MASK_BLOCK_N2
    dq = _tut_bwd_dq(dq, q, K, V, do, m, D, stride_tok, start_m, end_n - num_steps * MASK_BLOCK_N2, num_steps,
                     BLOCK_M2, MASK_BLOCK_N2, HEAD_DIM, True)
    end_n -= num_steps * MASK_BLOCK_N2
    num_steps = end_n // BLOCK_N2
    dq = _tut_bwd_dq(dq, q, K, V, do, m, D, stride_tok, start_m, end_n - num_steps * BLOCK_N2, num_steps,
                     BLOCK_M2, BLOCK_N2, HEAD_DIM, False)
    tl.store(DQ + offs_m[:, None] * stride_tok + offs_k[None, :], (dq * 0.6931471824645996).to(DQ.dtype.element_ty))
