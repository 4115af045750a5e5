"""PPO-clip policy loss computed straight from the last hidden states and the LM head.

  policy_loss(hidden (N,H), weight (V,H), targets (N,), old_logprobs (N,) or None,
              advantages (N,), mask (N,), clip_low=0.2, clip_high=0.28, dual_clip=None,
              agg="token-mean", temperature=1.0, return_entropy=False, cu_seqlens=None,
              global_count=None, ignore_index=-100) -> (loss 0-d fp32, stats dict)

Per token, with r = exp(clamp(logp - old_logp, +-20)) and advantage A:
  loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))        (PPO, DAPO's clip-higher)
  and for A < 0 with dual_clip = c > 1: loss_t = min(loss_t, -A c)     (dual clip)
d loss_t / d logp = -A r where the unclipped term is the active one, else 0. Every
aggregation mode is a weighted token sum, loss = sum_t w_t loss_t:
  token-mean            w_t = 1 / (tokens)
  seq-mean-token-mean   w_t = 1 / (tokens of t's sequence * sequences)
  seq-mean-token-sum    w_t = 1 / (sequences)
counting only masked-in tokens (and sequences that have any). Because this per-token
gradient is known as soon as a chunk's log-probs are, the backward runs inside the forward
chunk loop (as in Liger's fused linear cross-entropy): the logits are formed once, not
twice, and backward() only scales the stored gradients.
"""
import math

import torch

from .logprob import linear_logprob_chunks, validate_logprob_inputs

LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp: one stale token cannot overflow the loss
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _ppo_terms(logp, old_logp, advantages, clip_low, clip_high, dual_clip):
    """Per-token (loss, d loss / d logp, ratio, clipped, dual_clipped)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = clipped_term > unclipped  # A > 0 and r > 1 + clip_high, or A < 0 and r < 1 - clip_low
    loss = torch.maximum(unclipped, clipped_term)
    frozen = clipped | (log_ratio.abs() > LOG_RATIO_CLAMP)
    if dual_clip is not None:
        dual_term = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss > dual_term)
        loss = torch.where(dual_clipped, dual_term, loss)
        frozen = frozen | dual_clipped
    else:
        dual_clipped = torch.zeros_like(clipped)
    return loss, torch.where(frozen, 0.0, unclipped), ratio, clipped, dual_clipped


def _token_weights(valid, agg, cu_seqlens, global_count, dtype):
    """w_t such that the aggregated loss is sum_t w_t loss_t (see the module docstring)."""
    valid = valid.to(dtype)
    if agg == "token-mean":
        count = valid.sum() if global_count is None else valid.new_tensor(float(global_count))
        return valid / count.clamp(min=1.0)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(valid.device)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=valid.device), lengths)
    tokens_per_seq = valid.new_zeros(len(lengths)).index_add_(0, seq_ids, valid)
    if global_count is None:
        count = (tokens_per_seq > 0).sum().to(dtype)
    else:
        count = valid.new_tensor(float(global_count))
    weights = valid / count.clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        weights = weights / tokens_per_seq.clamp(min=1.0)[seq_ids]
    return weights


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logprobs, advantages, token_weights, clip_low, clip_high,
                dual_clip, temperature, with_entropy, ignore_index, compute_grads):
        def grad_fn(start, end, logp, entropy):
            old = logp if old_logprobs is None else old_logprobs[start:end]
            d_logp = _ppo_terms(logp, old, advantages[start:end], clip_low, clip_high, dual_clip)[1]
            return token_weights[start:end] * d_logp, None

        _, logp, entropy, d_hidden, d_weight = linear_logprob_chunks(
            hidden, weight, targets, temperature, ignore_index, with_entropy,
            grad_fn=grad_fn if compute_grads else None,
            need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1])
        old = logp if old_logprobs is None else old_logprobs
        per_token = _ppo_terms(logp, old, advantages, clip_low, clip_high, dual_clip)[0]
        loss = (token_weights * per_token).sum()
        ctx.grads = (d_hidden, d_weight)  # not saved tensors: backward hands them on without a copy
        if entropy is None:
            entropy = logp.new_zeros(0)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_entropy):
        if ctx.grads is None:
            raise RuntimeError("policy_loss computes its gradients during the forward pass and hands them "
                               "over once: backward through it a second time (retain_graph) is not supported")
        grads, ctx.grads = ctx.grads, None
        if bool(g_loss != 1.0):  # loss.backward() passes 1: hand the buffers on, no scaled copies
            grads = tuple(None if g is None else g * g_loss.to(g.dtype) for g in grads)
        return grads + (None,) * 11


def _validate(n, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, cu_seqlens, global_count):
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like targets, got {tuple(t.shape)}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r}: expected one of {', '.join(AGG_MODES)}")
    if agg != "token-mean":
        if cu_seqlens is None:
            raise ValueError(f"agg={agg!r} needs cu_seqlens (B+1,) to know where each sequence starts")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
            raise ValueError(f"cu_seqlens must run from 0 to the number of tokens ({n}), "
                             f"got {cu_seqlens.tolist()[:4]}...{int(cu_seqlens[-1])}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (it bounds -A * ratio for A < 0), got {dual_clip}")
    if global_count is not None and not global_count > 0:
        raise ValueError(f"global_count must be > 0, got {global_count}")


def policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28,
                dual_clip=None, agg="token-mean", temperature=1.0, return_entropy=False, cu_seqlens=None,
                global_count=None, ignore_index=-100):
    """PPO-clip loss of a packed batch of N tokens; returns (loss, stats).

    hidden (N, H), weight (V, H): last hidden states and LM head; targets (N,) the sampled
    ids (ignore_index counts as masked out); old_logprobs (N,) the sampler's log-probs, or
    None for strictly on-policy training (then old = current log-probs, detached, so the
    ratio is exactly 1 and no second forward pass is needed); advantages (N,) per token
    (see broadcast_to_tokens); mask (N,) true on tokens that train (the responses).
    agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum"; the seq-mean modes
    take cu_seqlens (B+1,) of the packed sequences.

    Gradient accumulation: pass global_count = the number of masked-in tokens (token-mean)
    or of sequences with any masked-in token (seq-mean modes) over all micro-batches of
    the optimizer step. Each micro-batch's loss is then its share of one mean over the
    whole step, and the summed gradients equal those of a single big batch.

    stats: 0-d detached fp32 tensors (they cost no host sync; .item() them when logging), over this
    call's masked-in tokens: clip_frac_low (A < 0 and r < 1 - clip_low), clip_frac_high
    (A > 0 and r > 1 + clip_high), dual_clip_frac (with dual_clip), approx_kl (the k3
    estimator of KL(pi_old || pi): mean of r - 1 - log r, >= 0), ratio_mean, ratio_min,
    ratio_max, num_tokens, and entropy (mean, with return_entropy=True).

    No masked-in token (N = 0 included): the loss is 0, still connected to hidden and weight
    (backward gives zero gradients); num_tokens is 0, the means are 0 and ratio_mean, ratio_min
    and ratio_max are 1 (the ratio of a policy that has not moved). When combining calls, weight
    the means by num_tokens and skip calls with num_tokens 0 in min/max.
    """
    validate_logprob_inputs(hidden, weight, targets, temperature, ignore_index)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be packed as (N, H), got shape {tuple(hidden.shape)}")
    n = hidden.shape[0]
    _validate(n, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, cu_seqlens, global_count)
    valid = mask.bool() & (targets != ignore_index)
    stat_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    advantages = advantages.to(stat_dtype)
    old = None if old_logprobs is None else old_logprobs.detach().to(stat_dtype)
    token_weights = _token_weights(valid, agg, cu_seqlens, global_count, stat_dtype)
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, logp, entropy = _FusedPolicyLoss.apply(
        hidden, weight, targets, old, advantages, token_weights, float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(temperature), bool(return_entropy),
        int(ignore_index), compute_grads)
    return loss, _stats(logp, logp if old is None else old, advantages, valid, entropy if return_entropy else None,
                        clip_low, clip_high, dual_clip)


@torch.no_grad()
def _stats(logp, old, advantages, valid, entropy, clip_low, clip_high, dual_clip):
    _, _, ratio, clipped, dual_clipped = _ppo_terms(logp, old, advantages, clip_low, clip_high, dual_clip)
    count = valid.sum().float()

    def mean(x):
        return (x.float() * valid).sum() / count.clamp(min=1.0)

    def extreme(reduce, empty):  # over the masked-in tokens; an appended `empty` keeps zero rows reducible
        values = torch.cat([torch.where(valid, ratio, empty), ratio.new_full((1,), empty)])
        return torch.where(count > 0, reduce(values), 1.0)

    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    stats = {
        "clip_frac_low": mean(clipped & (advantages < 0)),
        "clip_frac_high": mean(clipped & (advantages > 0)),
        "approx_kl": mean(ratio - 1.0 - log_ratio),
        "ratio_mean": torch.where(count > 0, mean(ratio), 1.0),
        "ratio_min": extreme(torch.min, math.inf),
        "ratio_max": extreme(torch.max, -math.inf),
        "num_tokens": count,
    }
    if dual_clip is not None:
        stats["dual_clip_frac"] = mean(dual_clipped)
    if entropy is not None:
        stats["entropy"] = mean(entropy)
    return {k: v.float().detach() for k, v in stats.items()}
