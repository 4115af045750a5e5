"""The CPU path of varlen attention: memory-efficient, built on PyTorch's blocked CPU flash
attention (the kernel behind scaled_dot_product_attention on CPU), which also returns the
log-sum-exp and takes it back for the backward. No (L, L) matrix is ever formed.

What the PyTorch op lacks is added here: packed variable-length segments, bottom-right causal
alignment for Lq != Lk, and the parent key range of shared-prefix groups. Each segment's keys
are cut into pieces the op handles (all-visible, or a top-left causal square); pieces are merged
by log-sum-exp in fp32, and their gradients summed in fp32. Same semantics and argument order
as flash_attn.varlen_forward / varlen_backward, after those resolve the softmax scale.

fp16/bf16 inputs are computed in fp32 (flash-attn's rule: accumulate in fp32 whatever the input
dtype), each piece cast as it is used: the op's half-precision backward sums dK/dV over query
blocks in the input dtype (dV of 511 queries on one key came out 161 bf16 ulp from the exact sum
of dO). On CPUs without native bf16 the fp32 op is also the faster one (backward of 2048 causal
tokens, 4 heads, D = 64: ~7x; bench/results/attn_cpu_precision.md).
"""
import math

import torch

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bhld(t):
    """(L, H, D) packed rows -> (1, H, L, D) view, the op's layout."""
    return t.transpose(0, 1).unsqueeze(0)


def _pieces(q_len, own_keys, causal, parent_keys):
    """Key pieces of one query segment: (row_lo, row_hi, key_lo, key_hi, top_left_causal), with
    rows relative to the segment and keys absolute. parent_keys is (lo, hi) or None."""
    pieces = []
    if parent_keys is not None and parent_keys[1] > parent_keys[0]:
        pieces.append((0, q_len, parent_keys[0], parent_keys[1], False))
    k0, k1 = own_keys
    n = k1 - k0
    if not causal:
        pieces.append((0, q_len, k0, k1, False))
    elif n >= q_len:  # the first n - q_len keys are seen by every row; the rest is a causal square
        pieces.append((0, q_len, k0, k1 - q_len, False))
        pieces.append((0, q_len, k1 - q_len, k1, True))
    else:  # more queries than keys: the first q_len - n rows see nothing
        pieces.append((q_len - n, q_len, k0, k1, True))
    return [p for p in pieces if p[1] > p[0] and p[3] > p[2]]


def _segments(cu_seqlens_q, cu_seqlens_k, parent):
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    num_segments = len(cu_q) - 1
    parents = parent.tolist() if parent is not None else [-1] * num_segments
    for s in range(num_segments):
        p = parents[s]
        if not -1 <= p < num_segments or p == s:
            raise ValueError(f"parent[{s}] = {p}: must be -1 or the index of another segment (< {num_segments})")
        parent_keys = (cu_k[p], cu_k[p + 1]) if p >= 0 else None
        yield cu_q[s], cu_q[s + 1], (cu_k[s], cu_k[s + 1]), parent_keys


def _accum_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t):
    """t in its accumulation dtype (a copy for fp16/bf16, t itself for fp32/fp64)."""
    return t.to(_accum_dtype(t.dtype))


def _merge_(acc_out, acc_lse, out, lse):
    """In place: (acc_out, acc_lse) becomes the attention over both key sets (overflow-safe form)."""
    diff = (lse - acc_lse).nan_to_num_(nan=-math.inf)  # both -inf: nothing to add
    acc_out.sub_(torch.sigmoid(diff).transpose(0, 1).unsqueeze(-1) * (acc_out - out))
    acc_lse.copy_(torch.logaddexp(acc_lse, lse))


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, parent=None):
    total_q, hq, d = q.shape
    out = q.new_zeros((total_q, hq, v.shape[2]))
    lse = torch.full((hq, total_q), -math.inf, dtype=_accum_dtype(q.dtype), device=q.device)
    for q0, q1, own_keys, parent_keys in _segments(cu_seqlens_q, cu_seqlens_k, parent):
        pieces = _pieces(q1 - q0, own_keys, causal, parent_keys)
        if not pieces:
            continue
        merged = None
        if len(pieces) > 1:
            merged = (torch.zeros((q1 - q0, hq, v.shape[2]), dtype=lse.dtype),
                      torch.full((hq, q1 - q0), -math.inf, dtype=lse.dtype))
        for r0, r1, a, b, top_left in pieces:
            o, l = _flash_fwd(_bhld(_acc(q[q0 + r0:q0 + r1])), _bhld(_acc(k[a:b])), _bhld(_acc(v[a:b])), 0.0,
                              top_left, scale=softmax_scale)
            o, l = o[0].transpose(0, 1), l[0]
            if merged is None:
                out[q0 + r0:q0 + r1] = o
                lse[:, q0 + r0:q0 + r1] = l
            else:
                _merge_(merged[0][r0:r1], merged[1][:, r0:r1], o, l)
        if merged is not None:
            out[q0:q1] = merged[0]
            lse[:, q0:q1] = merged[1]
    nan_rows = q.isnan().any(-1)  # (T, H): PyTorch's CPU op returns a zero row for a NaN query; SDPA gives NaN
    if nan_rows.any():
        out[nan_rows] = math.nan
        lse[nan_rows.T] = math.nan
    return out, lse  # fp32, fp64 for fp64 inputs


def _expand_kv_heads(hq, hkv):
    """The op's GQA backward shares work out by KV head: with fewer KV heads than threads, threads
    idle (3-10x slower at 1 KV head on 2 threads). Then it gets one KV head per query head and each
    group's gradients are summed after; otherwise GQA is faster (2x at 9/3 heads, L = 8192)."""
    return hkv != hq and hkv < torch.get_num_threads()


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, parent=None):
    acc = _accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    lse = lse.to(acc)
    hq, hkv = q.shape[1], k.shape[1]
    expand = _expand_kv_heads(hq, hkv)
    for q0, q1, own_keys, parent_keys in _segments(cu_seqlens_q, cu_seqlens_k, parent):
        for r0, r1, a, b, top_left in _pieces(q1 - q0, own_keys, causal, parent_keys):
            rows = slice(q0 + r0, q0 + r1)
            kp, vp = (_acc(t[a:b]) for t in (k, v))
            if expand:
                kp, vp = (t.repeat_interleave(hq // hkv, dim=1) for t in (kp, vp))
            gq, gk, gv = _flash_bwd(_bhld(_acc(dout[rows])), _bhld(_acc(q[rows])), _bhld(kp), _bhld(vp),
                                    _bhld(_acc(out[rows])), lse[:, rows].unsqueeze(0).contiguous(), 0.0, top_left,
                                    scale=softmax_scale)
            dq[rows] += gq[0].transpose(0, 1)
            if expand:
                gk, gv = (g.unflatten(1, (hkv, hq // hkv)).sum(2) for g in (gk, gv))
            dk[a:b] += gk[0].transpose(0, 1)
            dv[a:b] += gv[0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
