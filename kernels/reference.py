"""Plain-PyTorch versions of the ops: the test oracle. Simple on purpose (they build the
full score matrix per sequence); the memory-efficient CPU paths live beside each kernel.

Math runs in float32, or float64 when the inputs are float64; results come back in the
input dtype except log-sum-exp values, which stay in the compute dtype.
"""
import math

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Varlen attention in flash-attn's layout.

    q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 (B+1,). GQA: query head h
    uses KV head h // (Hq // Hkv). Causal masks are aligned bottom-right (query i of a
    sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq). Returns
    out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) in the compute dtype; a query
    row that sees no key gets out = 0 and lse = -inf.
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = _compute_dtype(q)
    out = torch.zeros(q.shape[0], hq, v.shape[2], dtype=cdt, device=q.device)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=cdt, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qb = q[q0:q1].to(cdt).transpose(0, 1)  # (Hq, Lq, D)
        kb = k[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vb = v[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        s = (qb @ kb.transpose(1, 2)) * scale  # (Hq, Lq, Lk)
        if causal:
            lq, lk = q1 - q0, k1 - k0
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (lk - lq), -math.inf)
        lse_b = torch.logsumexp(s, dim=-1)  # (Hq, Lq)
        p = torch.exp(s - lse_b[..., None]).nan_to_num(0.0)
        out = out.index_copy(0, torch.arange(q0, q1, device=q.device), (p @ vb).transpose(0, 1))
        lse = lse.index_copy(1, torch.arange(q0, q1, device=q.device), lse_b)
    return out.to(q.dtype), lse


def attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Gradients (dq, dk, dv) of attention_varlen_forward's output, by autograd (oracle)."""
    cdt = _compute_dtype(q)
    with torch.enable_grad():
        qc, kc, vc = (t.detach().to(cdt).requires_grad_(True) for t in (q, k, v))
        out, _ = attention_varlen_forward(qc, kc, vc, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        dq, dk, dv = torch.autograd.grad(out, (qc, kc, vc), dout.to(cdt))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_varlen_backward_from_lse(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                       softmax_scale=None, causal=False):
    """Flash-style backward of one key block: P = exp(scale * q k^T - lse), D = rowsum(dout * out),
    dS = P * (dout v^T - D). `out` and `lse` may belong to attention over a superset of these
    keys (ring attention, shared prefixes): the result is then this block's share of the
    gradients. With out/lse of this block alone it equals attention_varlen_backward."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    rep = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cdt = _compute_dtype(q)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qb = q[q0:q1].to(cdt).transpose(0, 1)
        kb = k[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(rep, dim=0)
        vb = v[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(rep, dim=0)
        dob = dout[q0:q1].to(cdt).transpose(0, 1)
        ob = out[q0:q1].to(cdt).transpose(0, 1)
        s = (qb @ kb.transpose(1, 2)) * scale
        if causal:
            lq, lk = q1 - q0, k1 - k0
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (lk - lq), -math.inf)
        p = torch.exp(s - lse[:, q0:q1].to(cdt)[..., None]).nan_to_num(0.0)
        delta = (dob * ob).sum(-1, keepdim=True)
        ds = p * (dob @ vb.transpose(1, 2) - delta)
        dq[q0:q1] = (ds @ kb).transpose(0, 1) * scale
        dkb = (ds.transpose(1, 2) @ qb) * scale  # (Hq, Lk, D)
        dvb = p.transpose(1, 2) @ dob
        dk[k0:k1] = dkb.unflatten(0, (hkv, rep)).sum(1).transpose(0, 1)
        dv[k0:k1] = dvb.unflatten(0, (hkv, rep)).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
