"""Varlen flash attention: Triton forward and backward, dispatched to a PyTorch CPU path.

Stable names other modules rely on:
  flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, deterministic=True,
                         return_attn_probs=False, block_table=None, *, return_lse=False)
      (flash-attn 2's order; flash_attn_func(q, k, v, dropout_p, ...) takes (B, L, H, D))
  varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, causal, parent=None) -> (out, lse (Hq, total_q) fp32, fp64 for fp64)
  varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal, parent=None, deterministic=True) -> (dq, dk, dv)
      flash-style: P = exp(scale*qk^T - lse), D = rowsum(dout*out); out/lse may come from
      attention over a superset of the keys (ring attention), giving this block's share.

Layout as flash-attn: q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cu_seqlens of length
S+1 (S segments; segment s pairs queries cu_seqlens_q[s]:[s+1] with keys cu_seqlens_k[s]:[s+1]).
Query head h reads KV head h // (Hq // Hkv). Causal masks are aligned bottom-right: query i of
a segment with Lq queries and Lk keys sees keys j <= i + Lk - Lq. A query that sees no key
gets out = 0 and lse = -inf. lse is in natural-log units.

`parent` (S,) int32 (-1 = none) adds a second key range per query segment: segment s also
attends, without a causal mask, to all keys of segment parent[s]. This is how shared-prefix
groups run (see shared_prefix.py); one level only: a segment does not see its parent's parent.

The Triton kernels: `_attn_fwd` (online softmax in base 2; the scale, with log2(e), applied in
one FMA with the row max; V loaded after the scores so K and V are waited for separately; K/V
through TMA tensor descriptors on sm_90+ (USE_TMA), pointers elsewhere; query blocks fastest in
the grid so co-running programs share K/V in L2), `_bwd_preprocess` (delta = rowsum(dout * out)),
`_bwd_dkdv` (one program per key block and KV head, heaviest causal blocks first, looping over
the query blocks of every query head of its GQA group, then over the segments whose parent it
is) and `_bwd_dq` (one program per query block). By default every gradient element is written
by one program in a fixed loop order: the backward is deterministic, without atomics. With
deterministic=False the dk/dv kernel also forms each block's dq share (5 matmuls per block
pair instead of 7) and adds it into an fp32 buffer with atomics; `_bwd_dq` is skipped.
Row offsets are 64-bit (a segment may hold more than 2^31 / (heads * head_dim) tokens).
The compile report for sm_90 (registers, spills, instructions per loop step) is
bench/aot_report.py.
"""
import math
import re

import torch

from . import attn_cpu, reference
from ._dispatch import use_triton
from ._triton import tl, triton

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634  # the kernels spell out log2(e) and ln(2) as literals

# Launch configurations for sm_90 (H100/H200) by padded head dim (BLOCK_D): block sizes,
# warps, pipeline stages. Chosen by reasoning (no autotuning in this CI) and checked to
# lower within Hopper's shared memory by tests/kernels/test_attn_aot.py. bench/gpu_attention.sh
# may patch this table to compare alternatives on a real GPU.
GPU_CONFIGS = {
    # 128-row query tiles over two warpgroups (wgmma M=64 each); K/V tiles double/triple buffered
    "fwd": {
        64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    },
    # K/V through TMA (sm_90+; head dims that are powers of two): a third K/V stage fits at
    # D = 128 (225 KiB of Hopper's 227)
    "fwd_tma": {
        64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    },
    # BLOCK_N key rows and their fp32 dk/dv stay in registers while query blocks stream through
    "dkdv": {
        64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    },
    # deterministic=False: the dk/dv kernel also forms dq (one more matmul, atomics)
    "dkdv_atomic": {
        64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    },
    "dq": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    },
}
# Triton 3.6 (the GPU image's version) gives the backward more registers to hold at the configs
# above, tuned under 3.7.1: dk/dv spills there (D=128: 112 B, D=64: 296 B; dk/dv + atomic dq D=128:
# 4 B). Under Triton < 3.7 these replace them: no spill, the fewest instructions per query row
# among the candidates compiled for sm_90 (bench/results/aot.md, "Triton 3.6.0").
GPU_CONFIGS_BEFORE_TRITON_3_7 = {
    "dkdv": {
        64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    },
    "dkdv_atomic": {
        64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    },
}
# float32 inputs on a GPU are for checking, not speed: 3xTF32 dots (about fp32 accuracy) need
# many registers, so small tiles; they still spill some (tests/kernels/test_attn_aot.py prints it)
GPU_CONFIGS_FP32 = {
    "fwd": {128: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)},
    "dkdv": {128: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)},
    "dkdv_atomic": {128: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)},
    "dq": {128: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)},
}
PREPROCESS_BLOCK = 128

# Used instead of GPU_CONFIGS when the kernels run on CPU tensors under TRITON_INTERPRET=1
# (tests): the interpreter costs per program and per loop step, so blocks stay moderate.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)

MAX_HEAD_DIM = 128

# K/V of the forward through TMA tensor descriptors (Hopper's bulk copies): None = where the GPU
# has them (sm_90+), True = always (the interpreter runs them too: tests), False = never
USE_TMA = None


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _parent_keys(Parent, cu_k, K, V, seg, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
                 BLOCK_N: tl.constexpr):
    """K and V bases, length and end of the whole key blocks of segment seg's parent range
    (length 0 when parent[seg] = -1)."""
    par = tl.load(Parent + seg)
    par_safe = tl.maximum(par, 0)
    x_start = tl.load(cu_k + par_safe)
    x_len = tl.where(par >= 0, tl.load(cu_k + par_safe + 1) - x_start, 0)
    xk_base = K + x_start.to(tl.int64) * stride_kt + kvh * stride_kh
    xv_base = V + x_start.to(tl.int64) * stride_vt + kvh * stride_vh
    return xk_base, xv_base, x_len, (x_len // BLOCK_N) * BLOCK_N


@triton.jit
def _own_key_blocks(q_len, k_len, m_lo, m_hi, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(diag, n_full, n_hi) for the query rows [m_lo, m_hi) of a segment against its own keys: key
    blocks below n_full need no mask, [n_full, n_hi) are masked, keys from n_hi on (after the
    last row's diagonal) are skipped."""
    if CAUSAL:
        diag = k_len - q_len
        n_hi = tl.minimum(k_len, m_hi + diag)
        n_full = tl.maximum(tl.minimum(k_len, m_lo + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        diag = 0
        n_hi = k_len
        n_full = k_len // BLOCK_N * BLOCK_N
    return diag, n_full, n_hi


@triton.jit
def _parent_rows(Parent, cu_k, seg, BLOCK_N: tl.constexpr):
    """First key row, length and end of the whole key blocks of segment seg's parent range
    (length 0 when parent[seg] = -1)."""
    par = tl.load(Parent + seg)
    par_safe = tl.maximum(par, 0)
    x_start = tl.load(cu_k + par_safe)
    x_len = tl.where(par >= 0, tl.load(cu_k + par_safe + 1) - x_start, 0)
    return x_start, x_len, (x_len // BLOCK_N) * BLOCK_N


@triton.jit
def _fwd_range(acc, l_i, m_i, q, K, V, row0, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
               n_lo, n_hi, k_len, diag, offs_m, offs_d, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online-softmax accumulation over the key blocks [n_lo, n_hi) of the keys starting at
    token row0. MASKED blocks may hold keys past k_len or (CAUSAL) keys after the diagonal
    j <= i + diag; unmasked ones hold neither. With USE_TMA, K and V are tensor descriptors
    over (total_k, Hkv * HEAD_DIM) (rows of a masked block past the segment are other tokens'
    or zeros: masked out of the scores); else pointers.

    In the tutorial's form: the scale is folded into one FMA with the row max (qk_scale > 0),
    V is loaded after the scores so K and V are waited for separately."""
    offs_n0 = tl.arange(0, BLOCK_N)
    if not USE_TMA:
        d_ok = offs_d < HEAD_DIM
        # 64-bit row offsets: a block's first row in a scalar, the rows inside it in the tile
        k_base = K + tl.cast(row0, tl.int64) * stride_kt + kvh * stride_kh
        v_base = V + tl.cast(row0, tl.int64) * stride_vt + kvh * stride_vh
        kt_offs = offs_n0[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
        v_offs = offs_n0[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
    for start_n in range(n_lo, n_hi, BLOCK_N):
        if USE_TMA:
            kt = K.load([row0 + start_n, kvh * HEAD_DIM]).T
        elif MASKED:
            kt = tl.load(k_base + tl.cast(start_n, tl.int64) * stride_kt + kt_offs,
                         mask=(start_n + offs_n0 < k_len)[None, :] & d_ok[:, None], other=0.0)
        else:
            kt = tl.load(k_base + tl.cast(start_n, tl.int64) * stride_kt + kt_offs, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        if MASKED:
            offs_n = start_n + offs_n0
            keep = offs_n[None, :] < k_len
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row without keys so far
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = V.load([row0 + start_n, kvh * HEAD_DIM])
        elif MASKED:
            v = tl.load(v_base + tl.cast(start_n, tl.int64) * stride_vt + v_offs,
                        mask=(start_n + offs_n0 < k_len)[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + tl.cast(start_n, tl.int64) * stride_vt + v_offs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, cu_q, cu_k, Parent, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_ot, stride_oh, stride_lh, n_heads_q, n_blocks_m,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_PARENT: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    # one program per (segment, query head, query block), query blocks fastest: the blocks that
    # run together read the same K/V from L2; the longest causal rows of each head first
    pid = tl.program_id(0)
    pid_sh = pid // n_blocks_m
    pid_m = n_blocks_m - 1 - pid % n_blocks_m
    seg = pid_sh // n_heads_q
    h = pid_sh % n_heads_q
    kvh = h // GROUP
    q_start = tl.load(cu_q + seg)
    q_len = tl.load(cu_q + seg + 1) - q_start
    m_lo = pid_m * BLOCK_M
    if m_lo >= q_len:
        return
    k_start = tl.load(cu_k + seg)
    k_len = tl.load(cu_k + seg + 1) - k_start
    m_hi = tl.minimum(m_lo + BLOCK_M, q_len)

    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PARENT:  # the parent's keys, all visible
        x_start, x_len, x_full = _parent_rows(Parent, cu_k, seg, BLOCK_N)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K, V, x_start, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
                                   0, x_full, x_len, 0, offs_m, offs_d, qk_scale,
                                   HEAD_DIM, BLOCK_N, False, False, PRECISION, USE_TMA)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K, V, x_start, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
                                   x_full, x_len, x_len, 0, offs_m, offs_d, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, False, PRECISION, USE_TMA)

    diag, n_full, n_hi = _own_key_blocks(q_len, k_len, m_lo, m_hi, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K, V, k_start, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
                               0, n_full, k_len, diag, offs_m, offs_d, qk_scale,
                               HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K, V, k_start, kvh, stride_kt, stride_kh, stride_vt, stride_vh,
                               n_full, n_hi, k_len, diag, offs_m, offs_d, qk_scale,
                               HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION, USE_TMA)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_base = Out + q_start.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess(Out, dOut, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Delta[h, t] = sum_d dout[t, h, d] * out[t, h, d] in fp32."""
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + offs_t[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dOut + offs_t[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + h.to(tl.int64) * stride_lh + offs_t, tl.sum(o * do, 1), mask=offs_t < total_q)


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_aqt,
                m_lo, m_hi, m_diag_end, diag, offs_n, offs_d, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, BLOCK_D) over the query rows [m_lo, m_hi), transposed: rows
    are keys. Blocks starting before m_diag_end get the causal mask j <= i + diag. One loop
    (not split into masked / unmasked loops as the forward is): two loops here hold more
    live registers than Hopper has and spill. ATOMIC_DQ: also add each query block's share of
    dq / sm_scale (a fifth matmul) into the fp32 rows at dq_base with atomics."""
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    qt_offs = offs_m0[None, :].to(tl.int64) * stride_qt + offs_d[:, None]  # 64-bit row offsets
    do_offs = offs_m0[:, None].to(tl.int64) * stride_dot + offs_d[None, :]
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < m_hi
        qt = tl.load(q_base + tl.cast(start_m, tl.int64) * stride_qt + qt_offs,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_base + tl.cast(start_m, tl.int64) * stride_dot + do_offs,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        # a row with lse = -inf saw no key at all: it contributes nothing
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse2[None, :])
        if CAUSAL:
            if start_m < m_diag_end:
                pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION)
            tl.atomic_add(dq_base + tl.cast(start_m, tl.int64) * stride_aqt + offs_m0[:, None].to(tl.int64) * stride_aqt
                          + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, dOut, Lse, Delta, dK, dV, dQacc, cu_q, cu_k, child_ptr, child_seg, qk_scale, sm_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_aqt, stride_aqh,
              stride_lh, n_heads_kv,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_PARENT: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    pid_sh = tl.program_id(0)
    seg = pid_sh // n_heads_kv
    kvh = pid_sh % n_heads_kv
    pid_n = tl.program_id(1)  # heaviest first: under a causal mask the first key blocks see the most queries
    k_start = tl.load(cu_k + seg)
    k_len = tl.load(cu_k + seg + 1) - k_start
    n_lo = pid_n * BLOCK_N
    if n_lo >= k_len:
        return

    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # own queries: row i sees key j when j <= i + diag; rows from m_diag_end on see the whole block
    q_len = tl.load(cu_q + seg + 1) - tl.load(cu_q + seg)
    if CAUSAL:
        diag = k_len - q_len
        m_first = tl.maximum(n_lo - diag, 0) // BLOCK_M * BLOCK_M
        m_diag_end = tl.maximum(n_lo + BLOCK_N - 1 - diag, 0)
    else:
        diag = 0
        m_first = 0
        m_diag_end = 0
    if HAS_PARENT:  # then the segments whose parent this is: they see all of its keys
        c_lo = tl.load(child_ptr + seg)
        n_ranges = 1 + tl.load(child_ptr + seg + 1) - c_lo
    else:
        c_lo = 0
        n_ranges = 1
    for g in range(GROUP):
        h = kvh * GROUP + g
        # one call site for all query ranges: a second inlined loop would spill registers
        for r in range(n_ranges):
            if HAS_PARENT:
                c = tl.where(r == 0, seg, tl.load(child_seg + tl.maximum(c_lo + r - 1, 0)))
            else:
                c = seg
            c_start = tl.load(cu_q + c)
            c_len = tl.load(cu_q + c + 1) - c_start
            dk, dv = _dkdv_range(dk, dv, k, v, Q + c_start.to(tl.int64) * stride_qt + h * stride_qh,
                                 dOut + c_start.to(tl.int64) * stride_dot + h * stride_doh,
                                 Lse + h.to(tl.int64) * stride_lh + c_start,
                                 Delta + h.to(tl.int64) * stride_lh + c_start,
                                 dQacc + c_start.to(tl.int64) * stride_aqt + h * stride_aqh,
                                 stride_qt, stride_dot, stride_aqt, tl.where(r == 0, m_first, 0), c_len,
                                 tl.where(r == 0, m_diag_end, 0), diag, offs_n, offs_d, qk_scale,
                                 HEAD_DIM, BLOCK_M, CAUSAL, PRECISION, ATOMIC_DQ)

    tl.store(dK + k_start.to(tl.int64) * stride_dkt + kvh * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkt
             + offs_d[None, :], (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + k_start.to(tl.int64) * stride_dvt + kvh * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvt
             + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, n_lo, n_hi, k_len, diag,
              offs_m, offs_d, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dq (BLOCK_M, BLOCK_D) over key blocks [n_lo, n_hi) (masking as _fwd_range)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    kt_offs = offs_n0[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # 64-bit row offsets
    vt_offs = offs_n0[None, :].to(tl.int64) * stride_vt + offs_d[:, None]
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < k_len
        kt_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kt + kt_offs
        vt_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vt + vt_offs
        if MASKED:
            kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, dOut, Lse, Delta, dQ, cu_q, cu_k, Parent, qk_scale, sm_scale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, n_heads_q,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_PARENT: tl.constexpr, PRECISION: tl.constexpr):
    pid_sh = tl.program_id(0)
    seg = pid_sh // n_heads_q
    h = pid_sh % n_heads_q
    kvh = h // GROUP
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    q_start = tl.load(cu_q + seg)
    q_len = tl.load(cu_q + seg + 1) - q_start
    m_lo = pid_m * BLOCK_M
    if m_lo >= q_len:
        return
    k_start = tl.load(cu_k + seg)
    k_len = tl.load(cu_k + seg + 1) - k_start
    m_hi = tl.minimum(m_lo + BLOCK_M, q_len)

    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    io_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_start.to(tl.int64) * stride_qt + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt
                + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(dOut + q_start.to(tl.int64) * stride_dot + h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dot
                 + offs_d[None, :], mask=io_mask, other=0.0)
    lse = tl.load(Lse + h.to(tl.int64) * stride_lh + q_start + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + h.to(tl.int64) * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PARENT:
        xk_base, xv_base, x_len, x_full = _parent_keys(Parent, cu_k, K, V, seg, kvh, stride_kt, stride_kh,
                                                       stride_vt, stride_vh, BLOCK_N)
        dq = _dq_range(dq, q, do, lse2, delta, xk_base, xv_base, stride_kt, stride_vt, 0, x_full, x_len, 0,
                       offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, False, False, PRECISION)
        dq = _dq_range(dq, q, do, lse2, delta, xk_base, xv_base, stride_kt, stride_vt, x_full, x_len, x_len, 0,
                       offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, True, False, PRECISION)

    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    diag, n_full, n_hi = _own_key_blocks(q_len, k_len, m_lo, m_hi, BLOCK_N, CAUSAL)
    dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, 0, n_full, k_len, diag,
                   offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION)
    dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, n_full, n_hi, k_len, diag,
                   offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION)

    tl.store(dQ + q_start.to(tl.int64) * stride_dqt + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqt
             + offs_d[None, :], (dq * sm_scale).to(dQ.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------- launchers

def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _config(kind, head_dim, device, dtype):
    if device.type == "cpu":  # TRITON_INTERPRET=1
        return dict(INTERPRET_CONFIG)
    table = (GPU_CONFIGS_FP32 if dtype == torch.float32 else GPU_CONFIGS)[kind]
    if dtype != torch.float32 and triton_version() < (3, 7):
        table = {**table, **GPU_CONFIGS_BEFORE_TRITON_3_7.get(kind, {})}
    return dict(table[min(key for key in table if key >= _block_d(head_dim))])


def triton_version() -> tuple[int, int]:
    major, minor = (int(re.match(r"\d+", part).group()) for part in triton.__version__.split(".")[:2])
    return major, minor


def _precision(dtype):
    # fp32: three TF32 products per dot (tensor cores, about fp32 accuracy); "ieee" would run on FMA
    # units and spill badly
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _use_tma(k, v):
    """Whether the forward reads K/V through TMA tensor descriptors: USE_TMA (None = on for
    Hopper and newer GPUs), fp16/bf16, head dim a power of two (a descriptor block spans whole
    heads), K/V packed (total, heads, head_dim) from a 16-byte aligned start."""
    if USE_TMA is False or TensorDescriptor is None:
        return False
    if USE_TMA is None and (k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9):
        return False
    total, heads, d = k.shape
    packed = all(t.stride() == (heads * d, d, 1) and t.data_ptr() % 16 == 0 for t in (k, v))
    # float32 is a checking path (3xTF32 dots, small tiles): pointers
    return packed and d == _block_d(d) and k.dtype in (torch.float16, torch.bfloat16) and total > 0


def _kv_descriptors(k, v, block_n):
    total, heads, d = k.shape
    return tuple(TensorDescriptor(t, [total, heads * d], [heads * d, 1], [block_n, d]) for t in (k, v))


def _segment_children(parent, num_segments):
    """CSR of the segments whose parent is each segment: child_seg[child_ptr[s]:child_ptr[s+1]],
    in increasing segment order (a fixed order keeps the backward deterministic)."""
    has = parent >= 0
    counts = torch.bincount(torch.where(has, parent, num_segments).long(), minlength=num_segments + 1)
    child_ptr = torch.zeros(num_segments + 1, dtype=torch.int32, device=parent.device)
    child_ptr[1:] = counts[:num_segments].cumsum(0).to(torch.int32)
    key = torch.where(has, parent, num_segments).long() * (num_segments + 1) + torch.arange(
        num_segments, device=parent.device)
    child_seg = torch.argsort(key).to(torch.int32)  # children first, grouped by parent
    return child_ptr, child_seg


def _triton_forward(q, k, v, cu_q, cu_k, max_q, scale, causal, parent):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    num_segments = cu_q.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or num_segments == 0 or max_q == 0:
        lse.fill_(-math.inf)
        out.zero_()
        return out, lse
    use_tma = _use_tma(k, v)
    cfg = _config("fwd_tma" if use_tma else "fwd", d, q.device, q.dtype)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    n_blocks_m = triton.cdiv(max_q, block_m)
    kv = _kv_descriptors(k, v, block_n) if use_tma else (k, v)
    _attn_fwd[(num_segments * hq * n_blocks_m,)](
        q, *kv, out, lse, cu_q, cu_k, parent if parent is not None else cu_q, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), hq, n_blocks_m,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_PARENT=parent is not None, PRECISION=_precision(q.dtype), USE_TMA=use_tma, **cfg)
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, parent, deterministic=True):
    total_q, hq, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    num_segments = cu_q.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total_q == 0 or total_k == 0 or num_segments == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(total_q, PREPROCESS_BLOCK), hq)](
        out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK=PREPROCESS_BLOCK)
    common = dict(GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal,
                  HAS_PARENT=parent is not None, PRECISION=_precision(q.dtype))
    if parent is not None:
        child_ptr, child_seg = _segment_children(parent, num_segments)
    else:
        child_ptr = child_seg = cu_q
    # deterministic: dq in its own kernel (7 matmuls per block pair); else the dk/dv kernel also
    # adds dq in fp32 with atomics (5 matmuls; the order of the additions varies run to run)
    dq_acc = q if deterministic else torch.zeros((total_q, hq, d), dtype=torch.float32, device=q.device)
    cfg = _config("dkdv" if deterministic else "dkdv_atomic", d, q.device, q.dtype)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if max_k == 0:
        dk.zero_(), dv.zero_()
    else:
        _bwd_dkdv[(num_segments * hkv, triton.cdiv(max_k, block_n))](
            q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, child_ptr, child_seg, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            dq_acc.stride(0), dq_acc.stride(1), lse.stride(0), hkv, BLOCK_M=block_m, BLOCK_N=block_n,
            ATOMIC_DQ=not deterministic, **common, **cfg)
    if not deterministic:
        return (dq_acc * scale).to(q.dtype), dk, dv
    cfg = _config("dq", d, q.device, q.dtype)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if max_q == 0:
        dq.zero_()
    else:
        _bwd_dq[(num_segments * hq, triton.cdiv(max_q, block_m))](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, parent if parent is not None else cu_q,
            scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), hq,
            BLOCK_M=block_m, BLOCK_N=block_n, **common, **cfg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd

def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, parent, triton_path):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be packed (total_tokens, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} differs from k/v head_dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of segment offsets (length batch+1); "
                             f"got {cu.dtype} with shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) "
                         "must describe the same number of segments")
    if parent is not None and (parent.dtype != torch.int32 or parent.shape != (cu_seqlens_q.numel() - 1,)):
        raise ValueError(f"parent must be int32 of shape (num_segments,) = ({cu_seqlens_q.numel() - 1},); "
                         f"got {parent.dtype} with shape {tuple(parent.shape)}")
    _check_offsets(cu_seqlens_q, q.shape[0], "cu_seqlens_q", "q")
    _check_offsets(cu_seqlens_k, k.shape[0], "cu_seqlens_k", "k/v")
    if triton_path:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernels take float16, bfloat16 or float32; got {q.dtype}")
        if q.shape[2] > MAX_HEAD_DIM:
            raise ValueError(f"head_dim {q.shape[2]} > {MAX_HEAD_DIM} is not supported by the Triton kernels")


def _check_offsets(cu, total, name, tensors):
    """On CPU (no device sync) the offsets are checked against the packed tensors: a wrong
    total would otherwise read past them, or crash PyTorch's CPU kernel outright."""
    if cu.device.type != "cpu" or cu.numel() == 0 or torch.compiler.is_compiling():
        return
    offsets = cu.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease; got {offsets[:8]}{' ...' if len(offsets) > 8 else ''}")
    if offsets[-1] != total:
        raise ValueError(f"{name} ends at {offsets[-1]} but {tensors} holds {total} tokens: "
                         "the offsets must describe exactly the packed tokens")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_max_seqlen(cu, max_seqlen, name):
    """On CPU tensors (interpreter runs) a too-small max_seqlen is caught; on GPU it would cost a sync."""
    if cu.device.type == "cpu" and cu.numel() > 1 and not torch.compiler.is_compiling():
        longest = int((cu[1:] - cu[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"{name}={max_seqlen} is smaller than the longest segment ({longest})")


def _no_parent_on_reference(parent):
    if parent is not None:
        raise NotImplementedError("shared-prefix attention on GPU tensors needs the Triton kernels; "
                                  "unset SPELL_KERNELS=torch")


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   parent=None):
    """Attention output (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32 (fp64 for fp64
    inputs, PyTorch path); no autograd."""
    triton_path = use_triton(q, k, v)
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, parent, triton_path)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if triton_path and not scale > 0:
        raise ValueError(f"softmax_scale must be positive for the Triton kernels (they take the row max of the "
                         f"unscaled scores); got {scale}")
    if not triton_path:
        if q.device.type != "cpu":  # SPELL_KERNELS=torch on a GPU: the plain reference, for debugging
            _no_parent_on_reference(parent)
            out, lse = reference.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
            return out, lse if lse.dtype == torch.float64 else lse.float()
        return attn_cpu.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, parent)
    _check_max_seqlen(cu_seqlens_q, max_seqlen_q, "max_seqlen_q")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), scale, causal, parent)


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, causal, parent=None, deterministic=True):
    """Gradients (dq, dk, dv) from the saved out and lse (flash-style; see module docstring).
    deterministic=False lets the Triton backward add dq with fp32 atomics (faster; bits vary)."""
    triton_path = use_triton(q, k, v)
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, parent, triton_path)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if not triton_path:
        if q.device.type != "cpu":
            _no_parent_on_reference(parent)
            return reference.attention_varlen_backward_from_lse(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                                scale, causal)
        return attn_cpu.varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                        parent)
    _check_max_seqlen(cu_seqlens_q, max_seqlen_q, "max_seqlen_q")
    _check_max_seqlen(cu_seqlens_k, max_seqlen_k, "max_seqlen_k")
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    return _triton_backward(dout, q, k, v, out, lse.float(), cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                            int(max_seqlen_k), scale, causal, parent, deterministic)


# torch.library custom ops with fake implementations: torch.compile traces a call as one opaque
# op (no graph break); autograd runs the backward op.

def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spell_kernels::flash_attn_varlen", mutates_args=())
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None,
             causal: bool, parent: torch.Tensor | None, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                              parent)
    return out, lse


@_attn_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, parent, deterministic):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q))


@torch.library.custom_op("spell_kernels::flash_attn_varlen_backward", mutates_args=())
def _attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, softmax_scale: float | None, causal: bool, parent: torch.Tensor | None,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, causal, parent, deterministic=deterministic)
    return dq, dk, dv


@_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, parent,
      deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, parent, deterministic = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, parent)
    ctx.args = (max_q, max_k, scale, causal, deterministic)


def _attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, parent = ctx.saved_tensors
    max_q, max_k, scale, causal, deterministic = ctx.args
    dq, dk, dv = _attn_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal,
                                   parent, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


class FlashAttnVarlenFunc:
    """(q, k, v) -> (out, lse) through the custom op; lse is returned for merging and is detached."""

    @staticmethod
    def apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, parent=None,
              deterministic=True):
        out, lse = _attn_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                            None if softmax_scale is None else float(softmax_scale), bool(causal), parent,
                            bool(deterministic))
        return out, lse.detach()


def _reject_unsupported(fn, dropout_p, window_size, softcap, alibi_slopes, block_table=None):
    """flash-attn arguments spell_kernels does not implement: their defaults pass, anything else
    raises NotImplementedError naming the argument."""
    if dropout_p:
        raise NotImplementedError(f"{fn}: dropout_p={dropout_p} is not supported (no attention dropout); "
                                  "pass 0.0 (flash-attn's default, and what evaluation uses)")
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{fn}: window_size={tuple(window_size)} (sliding-window attention) is not "
                                  "supported; pass (-1, -1)")
    if softcap:
        raise NotImplementedError(f"{fn}: softcap={softcap} (attention logit soft-capping) is not supported; "
                                  "pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported; pass None")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: block_table (paged KV cache) is not supported; pass None and "
                                  "contiguous packed k/v")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=True, return_attn_probs=False, block_table=None, *, return_lse=False):
    """Varlen attention with flash-attn 2's arguments, in flash-attn's order, and layout (see
    the module docstring): a positional call written for `flash_attn.flash_attn_varlen_func`
    means the same here.

    q (total_q, Hq, D), k/v (total_k, Hkv, D) with Hq % Hkv == 0; cu_seqlens_* int32 (batch+1,);
    max_seqlen_* the longest segment (sizes the GPU grid). Returns out (total_q, Hq, D).
    dropout_p, window_size, softcap, alibi_slopes and block_table are accepted at their
    defaults only (anything else raises NotImplementedError naming the argument).
    deterministic: True (the default here; flash-attn's is False) gives bitwise-repeatable
    gradients; False lets the Triton backward accumulate dq with fp32 atomics, two fewer
    matmuls per block pair. return_attn_probs=True returns (out, softmax_lse (Hq, total_q),
    None) as flash-attn does, except that the attention probabilities are not formed (None).
    return_lse=True (keyword only, spell's own) returns (out, lse); lse is fp32 (fp64 for
    fp64 inputs). Differentiable in q, k, v.
    """
    _reject_unsupported("flash_attn_varlen_func", dropout_p, window_size, softcap, alibi_slopes, block_table)
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale, causal, None, deterministic)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=True, return_attn_probs=False):
    """Batched attention with flash-attn 2's `flash_attn_func` arguments and layout:
    q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> out (B, Lq, Hq, D); causal masks bottom-right
    aligned. Same argument rules as flash_attn_varlen_func; return_attn_probs=True returns
    (out, softmax_lse (B, Hq, Lq), None)."""
    _reject_unsupported("flash_attn_func", dropout_p, window_size, softcap, alibi_slopes)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attn_func takes q, k, v as (batch, seqlen, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k/v must share the batch size; got {q.shape[0]} and {k.shape[0]}")
    batch, lq, hq, _ = q.shape
    lk = k.shape[1]
    rows = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out, lse = FlashAttnVarlenFunc.apply(q.reshape(batch * lq, hq, -1), k.reshape(batch * lk, *k.shape[2:]),
                                         v.reshape(batch * lk, *v.shape[2:]), rows * lq, rows * lk, lq, lk,
                                         softmax_scale, causal, None, deterministic)
    out = out.view(batch, lq, hq, -1)
    if return_attn_probs:
        return out, lse.view(hq, batch, lq).transpose(0, 1), None
    return out


def aot_variants(head_dim, dtype):
    """The kernels the launchers start on a GPU for this head dim and dtype, for the compile
    report (bench/aot_report.py) and its test: (label, kernel name, config kind, extra
    constexprs, names of tensor-descriptor arguments)."""
    return [("fwd", "_attn_fwd", "fwd", {"USE_TMA": False}, ()),
            ("fwd TMA", "_attn_fwd", "fwd_tma", {"USE_TMA": True}, ("K", "V")),
            ("bwd dk/dv", "_bwd_dkdv", "dkdv", {"ATOMIC_DQ": False}, ()),
            ("bwd dk/dv+dq atomic", "_bwd_dkdv", "dkdv_atomic", {"ATOMIC_DQ": True}, ()),
            ("bwd dq", "_bwd_dq", "dq", {}, ())]
