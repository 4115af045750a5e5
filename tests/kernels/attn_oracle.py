"""Oracles and tolerances shared by the attention tests.

The float64 reference is spell_kernels.reference. The tolerance follows flash-attn's tests:
the error of the op under test may be at most k times the error of plain PyTorch computing the
same attention in the same low precision (k = 2 for outputs, 3 for gradients), plus a floor of a
few units of the dtype's rounding, since two exact-ish computations can both round.
"""
import math

import torch

from spell_kernels import reference


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def attention_in_dtype(q, k, v, cu_q, cu_k, scale, causal):
    """Plain PyTorch attention doing every step (matmuls, softmax) in the inputs' dtype: what
    'PyTorch's own error in this precision' means. Differentiable. Returns out and lse (Hq, T)."""
    hq, hkv = q.shape[1], k.shape[1]
    outs = []
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=q.dtype, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        lq, lk = qb.shape[1], kb.shape[1]
        if lq == 0:
            continue
        if lk == 0:
            outs.append(torch.zeros_like(qb).transpose(0, 1))
            continue
        s = (qb @ kb.transpose(1, 2)) * scale
        if causal:
            hidden = torch.arange(lk, device=q.device)[None, :] > torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            s = s.masked_fill(hidden, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without keys: 0
        outs.append((p @ vb).transpose(0, 1))
        lse[:, cq[b]:cq[b + 1]] = torch.logsumexp(s.detach(), -1)
    return (torch.cat(outs) if outs else torch.zeros_like(q)), lse


def floor(dtype):
    return 4 * torch.finfo(dtype).eps


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(name, got, ref64, lowp, factor, dtype=None):
    """|got - ref| <= factor * |lowp - ref| + floor, all as max-abs errors (dtype: that of the
    computation, when `got` is kept in another, as lse is in fp32)."""
    err, base = max_err(got, ref64), max_err(lowp, ref64)
    bound = factor * base + floor(dtype or got.dtype) * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x PyTorch's {base:.3e} (+floor) = {bound:.3e}"


def reference_attention(q, k, v, dout, cu_q, cu_k, scale, causal):
    """float64 out, lse and (dq, dk, dv)."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out, lse = reference.attention_varlen_forward(q64, k64, v64, cu_q, cu_k, scale, causal)
    grads = reference.attention_varlen_backward(dout.double(), q64, k64, v64, cu_q, cu_k, scale, causal)
    return out, lse, grads


def lowp_attention(q, k, v, dout, cu_q, cu_k, scale, causal):
    """PyTorch in the inputs' dtype: out, lse and (dq, dk, dv)."""
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = attention_in_dtype(ql, kl, vl, cu_q, cu_k, scale, causal)
    grads = torch.autograd.grad(out, (ql, kl, vl), dout, allow_unused=True)
    grads = tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (ql, kl, vl)))
    return out.detach(), lse, grads
