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


# --- RL ops: oracles for logprob.py, policy_loss.py and advantages.py ---------------------

LOG_RATIO_CLAMP = 20.0  # |log(pi / pi_old)| bound before exp in the PPO ratio


def linear_logprob(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """(logprobs, entropy) of softmax(hidden @ weight.T / temperature), from the full logits.

    Differentiable by autograd; 0 where the target is ignore_index."""
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    logits = (hidden.to(cdt) @ weight.to(cdt).T) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).long()[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=cdt, device=hidden.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def ppo_clip_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=None,
                  agg="token-mean", seq_ids=None, denominator=None):
    """PPO-clip surrogate (Schulman et al. 2017) with asymmetric clip (DAPO) and dual clip
    (Ye et al. 2020), aggregated by loops over sequences. Differentiable by autograd.

    per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and for A < 0 also
    min(., -A dual_clip); r = exp(clamp(logp - old_logp, +-LOG_RATIO_CLAMP)).
    token-mean: sum over masked tokens / their count; seq-mean-token-mean: mean over
    sequences of each sequence's token mean; seq-mean-token-sum: mean over sequences of each
    sequence's token sum. denominator replaces the count of tokens (or sequences)."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    mask = mask.bool()
    if agg == "token-mean":
        count = denominator if denominator is not None else int(mask.sum())
        return per_token[mask].sum() / max(count, 1)
    seq_terms = []
    for s in sorted(set(seq_ids.tolist())):
        tokens = (seq_ids == s) & mask
        if not bool(tokens.any()):
            continue
        total = per_token[tokens].sum()
        seq_terms.append(total / int(tokens.sum()) if agg == "seq-mean-token-mean" else total)
    count = denominator if denominator is not None else len(seq_terms)
    return sum(seq_terms, per_token.new_zeros(())) / max(count, 1)


def group_advantages(rewards, group_ids, mode="grpo", eps=1e-6):
    """Advantages by a loop over groups: grpo (Shao et al. 2024) (r - mean) / (std + eps)
    with the unbiased std; dr_grpo (Liu et al. 2025) r - mean; batch: grpo over all rewards
    as one group. A group of one gets 0."""
    r = rewards.double().tolist()
    ids = [0] * len(r) if mode == "batch" else group_ids.tolist()
    out = [0.0] * len(r)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g]
        if len(members) < 2:
            continue
        vals = [r[i] for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            out[i] = r[i] - mean if mode == "dr_grpo" else (r[i] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    """The mixture-of-experts FFN as a loop over experts (spell_kernels.moe_experts' CPU path and
    oracle): out[t] = sum_j w[t, j] down_e @ (silu(gate_e @ h_t) * (up_e @ h_t)), e = topk_ids[t, j];
    gate_up_proj (E, 2I, H) with the gate rows first, down_proj (E, H, I). Autograd gives the backward."""
    out = torch.zeros_like(hidden)
    for expert in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(hidden[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        rows = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_proj[expert])
        out = out.index_add(0, token_idx, rows * topk_weights[token_idx, slot, None].to(rows.dtype))
    return out
