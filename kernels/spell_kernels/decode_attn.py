"""Decode attention over a shared prefix: one new query token per live sample, where the
samples of one group share the prompt's KV and each sample has its own generated KV.

Cache layout (one layer): a flat pool `k_cache, v_cache (num_slots, Hkv, D)`. Group g's
prompt KV lives in slots [prefix_start[g], prefix_start[g] + prefix_len[g]); sample b's own
KV (its generated tokens, the current one included) in [own_start[b], own_start[b] + own_len[b]).
The queries of group g are rows [cu_group_queries[g], cu_group_queries[g + 1]) of q.

Triton path (flash-decoding): the prefix is split across programs; one program loads a KV
block of the prefix once and multiplies it with all queries of the group times all query
heads of one KV head (those rows form the M side of the `tl.dot`), so the prefix is read
once per group per step. The own ranges are the same kernel with groups of one. Partial
results are combined by log-sum-exp in fp32 by a second small kernel.

PyTorch path (CPU): per group one call of PyTorch's fused CPU flash attention with the
group's queries x heads as rows, on a strided view of the prefix (no per-sample copy); the
own ranges gathered into one padded, masked batch; then one log-sum-exp merge. Off CPU
(SPELL_KERNELS=torch on CUDA) the same with chunked matmuls.

Inference only: the Triton path has no backward (the sampler calls it under no_grad).
"""
import math

import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .lse_merge import merge_attn_states

_LOG2E = 1.4426950408889634


@triton.jit
def _split_partial_kernel(
    Q, K, V, OutPart, LsePart, KeyStart, KeyLen, CuQ,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ps, stride_pb, stride_ph, stride_ls, stride_lb,
    first_split, split_len, num_m_blocks, head_dim, qk_scale_log2,
    REP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attention of one segment's query rows to one split of the segment's key range.

    Grid (splits, segments * num_m_blocks, Hkv). Segment s owns queries [CuQ[s], CuQ[s+1])
    and keys at slots KeyStart[s] + [0, KeyLen[s]). Row r of a block is query r // REP,
    query head kv_head * REP + r % REP. Writes the normalised partial output and its
    log-sum-exp (natural log; -inf when the split holds no key) to split slot
    first_split + program_id(0).
    """
    split = tl.program_id(0)
    segment = tl.program_id(1) // num_m_blocks
    m_block = tl.program_id(1) % num_m_blocks
    kv_head = tl.program_id(2)

    q_begin = tl.load(CuQ + segment)
    q_end = tl.load(CuQ + segment + 1)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query = q_begin + rows // REP
    head = kv_head * REP + rows % REP
    row_mask = query < q_end
    query64 = query.to(tl.int64)  # row offsets in 64 bits: query x row stride may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_ptrs = Q + query64[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    key_len = tl.load(KeyLen + segment)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, key_len)
    hi = tl.where(m_block * BLOCK_M < (q_end - q_begin) * REP, hi, lo)  # no rows: skip the keys
    key_base = tl.load(KeyStart + segment).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        slot = key_base + n
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    slot_id = (first_split + split).to(tl.int64)
    out_ptrs = (OutPart + slot_id * stride_ps + query64[:, None] * stride_pb + head[:, None] * stride_ph
                + offs_d[None, :])
    tl.store(out_ptrs, out, mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LsePart + slot_id * stride_ls + query64 * stride_lb + head, lse, mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    OutPart, LsePart, Out, Lse, num_splits, num_heads, head_dim,
    stride_ps, stride_pb, stride_ph, stride_ls, stride_lb,
    stride_ob, stride_oh, stride_lse_h,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B,): merges the split partials of all heads of one query by log-sum-exp."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < num_heads
    d_mask = offs_d < head_dim
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # scalar offsets advance split by split, in 64 bits (b is): split x split stride may pass 2^31
    lse_offset = b * stride_lb
    out_offset = b * stride_pb
    out_tile = offs_h[:, None] * stride_ph + offs_d[None, :]
    for _ in range(num_splits):
        lse_s = tl.load(LsePart + lse_offset + offs_h, mask=h_mask, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe)
        has_keys = h_mask & (lse_s != float("-inf"))  # a split without keys may hold no output
        o = tl.load(OutPart + out_offset + out_tile, mask=has_keys[:, None] & d_mask[None, :], other=0.0)
        lse_offset += stride_ls
        out_offset += stride_ps
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    l_safe = tl.where(l == 0.0, 1.0, l)
    out = acc / l_safe[:, None]
    lse = tl.where(l == 0.0, float("-inf"), m + tl.log(l_safe))
    tl.store(Out + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    tl.store(Lse + offs_h * stride_lse_h + b, lse, mask=h_mask)


# Shipped launch configuration (checked to lower for sm_90 in tests/kernels/test_decode_aot.py).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
MAX_BLOCK_M = 64
_INTERPRETER_SPLITS = 3  # on CPU (interpreter) a few splits keep tests fast and still exercise the merge


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_splits(max_len: int, programs_per_split: int, device: torch.device) -> tuple[int, int]:
    """(split_len, num_splits): enough programs to fill the GPU, each split a whole number of blocks."""
    blocks = triton.cdiv(max_len, BLOCK_N)
    if blocks == 0:
        return BLOCK_N, 0
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(target, max(programs_per_split, 1))
    else:
        splits = _INTERPRETER_SPLITS
    splits = max(1, min(splits, blocks))
    split_len = triton.cdiv(blocks, splits) * BLOCK_N
    return split_len, triton.cdiv(max_len, split_len)


def _launch_split(q, k_cache, v_cache, out_part, lse_part, key_start, key_len, cu_q, first_split,
                  split_len, num_splits, max_rows, scale):
    if num_splits == 0 or max_rows == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    rep = hq // hkv
    block_m = min(MAX_BLOCK_M, max(16, _next_pow2(max_rows)))
    num_m_blocks = triton.cdiv(max_rows, block_m)
    grid = (num_splits, (cu_q.numel() - 1) * num_m_blocks, hkv)
    _split_partial_kernel[grid](
        q, k_cache, v_cache, out_part, lse_part, key_start, key_len, cu_q,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        first_split, split_len, num_m_blocks, d, scale * _LOG2E,
        REP=rep, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=max(16, _next_pow2(d)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )


def _decode_triton(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries, own_start, own_len,
                   scale, max_group_queries, max_prefix_len, max_own_len):
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    rep = hq // hkv
    num_groups = prefix_len.numel()
    dev = q.device
    max_rows = max_group_queries * rep
    block_m = min(MAX_BLOCK_M, max(16, _next_pow2(max_rows)))
    prefix_split_len, prefix_splits = _num_splits(
        max_prefix_len, num_groups * triton.cdiv(max_rows, block_m) * hkv, dev)
    own_split_len, own_splits = _num_splits(max_own_len, b * triton.cdiv(rep, 16) * hkv, dev)
    total_splits = prefix_splits + own_splits

    out = torch.empty((b, hq, d), dtype=q.dtype, device=dev)
    lse = torch.empty((hq, b), dtype=torch.float32, device=dev)
    if b == 0:
        return out, lse
    # -inf for rows no program writes (queries outside every group); out_part is only read where lse is finite
    out_part = torch.empty((max(total_splits, 1), b, hq, d), dtype=torch.float32, device=dev)
    lse_part = torch.full((max(total_splits, 1), b, hq), float("-inf"), dtype=torch.float32, device=dev)
    _launch_split(q, k_cache, v_cache, out_part, lse_part, prefix_start, prefix_len, cu_group_queries,
                  0, prefix_split_len, prefix_splits, max_rows, scale)
    own_segments = torch.arange(b + 1, dtype=torch.int32, device=dev)
    _launch_split(q, k_cache, v_cache, out_part, lse_part, own_start, own_len, own_segments,
                  prefix_splits, own_split_len, own_splits, rep, scale)
    _combine_splits_kernel[(b,)](
        out_part, lse_part, out, lse, total_splits, hq, d,
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        BLOCK_H=max(2, _next_pow2(hq)), BLOCK_D=max(16, _next_pow2(d)), num_warps=NUM_WARPS,
    )
    return out, lse


PREFIX_CHUNK = 8192  # keys per matmul in the generic PyTorch fallback (bounds its score matrix)


def _attend_matmul(q4, k4, v4, scale, cdt, key_valid=None):
    """q4 (N, Hkv, M, D); k4/v4 (N, Hkv, L >= 1, D), views of the cache; key_valid (N, L) bool
    or None. Returns out (N, Hkv, M, D) and lse (N, Hkv, M) in cdt (-inf / 0 for rows without
    keys), reading k/v once, in chunks of PREFIX_CHUNK keys."""
    q4 = q4.to(cdt) * scale
    out = lse = None
    for c0 in range(0, k4.shape[2], PREFIX_CHUNK):
        kc, vc = k4[:, :, c0:c0 + PREFIX_CHUNK].to(cdt), v4[:, :, c0:c0 + PREFIX_CHUNK].to(cdt)
        s = torch.matmul(q4, kc.transpose(-1, -2))  # (N, Hkv, M, C)
        if key_valid is not None:
            s.masked_fill_(~key_valid[:, None, None, c0:c0 + PREFIX_CHUNK], -math.inf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), 0.0, m)
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vc).div_(torch.where(l == 0, 1.0, l))
        lse_c = (m + l.log()).squeeze(-1)
        if out is None:
            out, lse = o, lse_c
        else:  # merge_attn_states' layout: every (n, h, m) row is a token of one head
            merged, merged_lse = merge_attn_states(out.reshape(-1, 1, out.shape[-1]), lse.reshape(1, -1),
                                                   o.reshape(-1, 1, o.shape[-1]), lse_c.reshape(1, -1))
            out, lse = merged.view(o.shape), merged_lse.view(lse_c.shape)
    return out, lse


def _attend(q4, k4, v4, scale, cdt, key_valid=None):
    """Attention of query rows to keys, with the log-sum-exp; shapes as `_attend_matmul`. On CPU:
    PyTorch's fused, blocked flash attention (the kernel behind SDPA on CPU), which takes the
    cache's strided views as they are and returns the log-sum-exp; elsewhere the matmul path."""
    if q4.device.type != "cpu":
        return _attend_matmul(q4, k4, v4, scale, cdt, key_valid)
    mask = None
    if key_valid is not None:
        mask = torch.zeros(key_valid.shape, dtype=q4.dtype).masked_fill_(~key_valid, -math.inf)[:, None, None, :]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q4, k4, v4, 0.0, False, attn_mask=mask, scale=scale)
    out, lse = out.to(cdt), lse.to(cdt)
    if key_valid is not None:  # a row without keys: out 0, lse -inf
        empty = ~key_valid.any(-1)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None, None], -math.inf)
    return out, lse


def _decode_torch(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries, own_start, own_len, scale):
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    rep = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_p = torch.zeros((b, hq, d), dtype=cdt, device=q.device)
    lse_p = torch.full((hq, b), -math.inf, dtype=cdt, device=q.device)
    cu = cu_group_queries.tolist()
    for g, (p0, plen) in enumerate(zip(prefix_start.tolist(), prefix_len.tolist())):
        q0, q1 = cu[g], cu[g + 1]
        n = q1 - q0
        if n == 0 or plen == 0:
            continue
        # the group's rows of KV head h: (query i, head h * rep + r) at i * rep + r
        q_rows = q[q0:q1].view(n, hkv, rep, d).transpose(0, 1).reshape(1, hkv, n * rep, d)
        o, lse = _attend(q_rows, k_cache[p0:p0 + plen].transpose(0, 1)[None],
                         v_cache[p0:p0 + plen].transpose(0, 1)[None], scale, cdt)
        out_p[q0:q1] = o[0].view(hkv, n, rep, d).transpose(0, 1).reshape(n, hq, d)
        lse_p[:, q0:q1] = lse[0].view(hkv, n, rep).transpose(1, 2).reshape(hq, n)

    own = own_len.tolist()
    max_own = max(own, default=0)
    if max_own == 0:
        return out_p, lse_p
    # own ranges gathered into (B, L) slots, padded to the longest and masked if lengths differ
    pos = torch.arange(max_own, device=q.device)
    slots = (own_start[:, None] + pos[None, :]).clamp_(max=k_cache.shape[0] - 1).flatten()
    k_own = k_cache.index_select(0, slots).view(b, max_own, hkv, d).transpose(1, 2)
    v_own = v_cache.index_select(0, slots).view(b, max_own, hkv, d).transpose(1, 2)
    key_valid = None if min(own) == max_own else pos[None, :] < own_len[:, None]
    out_o, lse_o = _attend(q.view(b, hkv, rep, d), k_own, v_own, scale, cdt, key_valid)
    return merge_attn_states(out_p, lse_p, out_o.reshape(b, hq, d), lse_o.reshape(b, hq).T)


def _check_inputs(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries, own_start, own_len):
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError(f"expected q (B, Hq, D) and k_cache/v_cache (num_slots, Hkv, D); got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2] != q.shape[2]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same "
                         f"shape with head dim {q.shape[2]} (q's)")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_cache.shape[1]})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (head_dim) dimension")
    num_groups = prefix_start.numel()
    tables = dict(prefix_start=(prefix_start, num_groups), prefix_len=(prefix_len, num_groups),
                  cu_group_queries=(cu_group_queries, num_groups + 1),
                  own_start=(own_start, q.shape[0]), own_len=(own_len, q.shape[0]))
    for name, (t, size) in tables.items():
        if t.dim() != 1 or t.numel() != size or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of length {size}; got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _table_stats(prefix_start, prefix_len, cu_group_queries, own_start, own_len, num_slots, batch):
    """(max queries per group, max prefix length, max own length), checking the tables' values:
    one device->host sync."""
    num_queries = cu_group_queries[1:] - cu_group_queries[:-1]
    zero = torch.zeros((), dtype=torch.int64, device=prefix_len.device)

    def amax(t):
        return t.max().long() if t.numel() else zero

    def amin(t):
        return t.min().long() if t.numel() else zero

    stats = torch.stack([
        amax(num_queries), amax(prefix_len), amax(own_len),
        amin(num_queries), cu_group_queries[0].long(), cu_group_queries[-1].long(),
        amin(prefix_start), amin(prefix_len), amax(prefix_start + prefix_len),
        amin(own_start), amin(own_len), amax(own_start + own_len),
    ]).tolist()
    (max_nq, max_prefix, max_own, min_nq, cu_first, cu_last, min_ps, min_pl, max_pend,
     min_os, min_ol, max_oend) = stats
    if min_nq < 0 or cu_first != 0 or cu_last != batch:
        raise ValueError(f"cu_group_queries must rise from 0 to the number of queries ({batch}); "
                         f"got first {cu_first}, last {cu_last}")
    if min(min_ps, min_pl, min_os, min_ol) < 0 or max(max_pend, max_oend) > num_slots:
        raise ValueError(f"prefix/own slot ranges must be non-negative and end within the cache's "
                         f"{num_slots} slots")
    return max_nq, max_prefix, max_own


def decode_attn_shared_prefix(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries, own_start, own_len,
                              softmax_scale=None, *, return_lse=False,
                              max_group_queries=None, max_prefix_len=None, max_own_len=None):
    """Attention of one new query token per sample over its group's shared prefix plus its own keys.

    q (B, Hq, D); k_cache, v_cache (num_slots, Hkv, D) with Hq a multiple of Hkv (GQA: query
    head h reads KV head h // (Hq // Hkv)); fp32, fp16 or bf16. Integer tables:
    prefix_start, prefix_len (G,); cu_group_queries (G + 1,) from 0 to B (queries of a group
    are adjacent); own_start, own_len (B,). Query b of group g attends to slots
    [prefix_start[g], +prefix_len[g]) and [own_start[b], +own_len[b]) (the current token's KV
    is written to its own range before the call). A plain sequence is a group of one (its
    whole cache as prefix, or as own range). Lengths may be 0; a query with no key gets 0.

    max_group_queries / max_prefix_len / max_own_len: Python ints, at least the largest
    queries per group, prefix length and own length in the tables (keys beyond them are
    silently left out on the Triton path). Pass them to avoid the device->host sync (and the
    table checks) the call otherwise makes to size its grid.

    Returns out (B, Hq, D) in q's dtype, and with return_lse=True also lse (Hq, B) fp32
    (flash-attn's varlen layout, ready for `merge_attn_states`; float64 for float64 inputs,
    which only the PyTorch path takes).
    """
    _check_inputs(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries, own_start, own_len)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if use_triton(q, k_cache, v_cache):
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"the Triton path takes fp32, fp16 or bf16; got {q.dtype} (float64: use the "
                            "PyTorch path on CPU tensors, SPELL_KERNELS=torch)")
        if None in (max_group_queries, max_prefix_len, max_own_len):
            max_group_queries, max_prefix_len, max_own_len = _table_stats(
                prefix_start, prefix_len, cu_group_queries, own_start, own_len, k_cache.shape[0], q.shape[0])
        tables = (t.to(torch.int32) for t in (prefix_start, prefix_len, cu_group_queries, own_start, own_len))
        out, lse = _decode_triton(q.contiguous(), k_cache, v_cache, *tables, scale,
                                  max_group_queries, max_prefix_len, max_own_len)
    else:
        if None in (max_group_queries, max_prefix_len, max_own_len):
            _table_stats(prefix_start, prefix_len, cu_group_queries, own_start, own_len, k_cache.shape[0],
                         q.shape[0])
        out, lse = _decode_torch(q, k_cache, v_cache, prefix_start, prefix_len, cu_group_queries,
                                 own_start.long(), own_len.long(), scale)
        out, lse = out.to(q.dtype), lse.float() if lse.dtype != torch.float64 else lse
    return (out, lse) if return_lse else out
