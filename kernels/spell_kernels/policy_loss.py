"""PPO-clip policy loss computed straight from the last hidden states and the LM head, with
the pieces TRL's and verl's GRPO losses are made of.

  policy_loss(hidden (N,H), weight (V,H), targets (N,), old_logprobs (N,) or None,
              advantages (N,), mask (N,), clip_low=0.2, clip_high=0.28, dual_clip=None,
              agg="token-mean", temperature=1.0, return_entropy=False, cu_seqlens=None,
              global_count=None, ignore_index=-100, *, ref_logprobs=None, kl_coef=0.0,
              kl_estimator="k3", ratio_level="token", rollout_logprobs=None, rollout_is_cap=None,
              norm_length=None, softcap=None, logit_scale=1.0, check=None) -> (loss 0-d, stats dict)

Per token, with log-ratio d = logp - old_logp (ratio_level="token") or, for "sequence" (GSPO),
d = the mean of logp - old_logp over the token's sequence, r = exp(clamp(d, +-20)) and advantage A:
  ppo_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))         (PPO, DAPO's clip-higher)
  and for A < 0 with dual_clip = c > 1: ppo_t = min(ppo_t, -A c)       (dual clip)
  loss_t = w_t ppo_t + kl_coef kl_t
w_t = min(exp(old_logp - rollout_logp), rollout_is_cap), a constant: the truncated importance
weight between the trained policy and the sampler that produced the rollout (TRL's
vllm_importance_sampling_cap, verl's rollout importance sampling); 1 without rollout_logprobs.
kl_t estimates KL(pi || pi_ref) from x = logp - ref_logp (Schulman's estimators):
  k1 = x,   k2 = x^2 / 2,   k3 = exp(-x) - 1 + x  (TRL's per_token_kl, verl's low_var_kl)
d ppo_t / d logp = -A r where the unclipped term is the active one, else 0. For the sequence
level this is GSPO-token's gradient (r's sequence part held constant): with one advantage per
sequence and an aggregation that weighs a sequence's tokens alike it equals GSPO's (and TRL's
importance_sampling_level="sequence").

Every aggregation mode is a weighted token sum, loss = sum_t a_t loss_t, over masked-in tokens:
  token-mean              a_t = 1 / tokens                             (TRL bnpo; dapo with global_count)
  seq-mean-token-mean     a_t = 1 / (tokens of t's sequence * sequences) (TRL grpo)
  seq-mean-token-sum      a_t = 1 / sequences
  seq-mean-token-sum-norm a_t = 1 / norm_length                        (verl; Dr. GRPO)
  dr_grpo                 a_t = 1 / (sequences * norm_length)           (TRL's dr_grpo: norm_length =
                                                                         max_completion_length)
(sequences: those with any masked-in token, except dr_grpo, which counts all of cu_seqlens' as
TRL counts its batch rows). TRL's loss_type names grpo, bnpo, dapo and dr_grpo are accepted as agg.
When the gradient per token is known as soon as a chunk's log-probs are (token-level ratio), the
backward runs inside the forward chunk loop (as in Liger's fused linear cross-entropy): the
logits are formed once, not twice, and backward() only scales the stored gradients. The
sequence-level ratio needs every log-prob of a sequence first: the logits are then formed twice.
The chunk loop is the custom op torch.ops.spell_kernels.policy_loss (fake implementation
registered), so torch.compile traces a call without a graph break.
"""
import math

import torch

from .logprob import (linear_logprob_backward, linear_logprob_chunks, should_check, stat_dtype,
                      validate_logprob_inputs)

LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp: one stale token cannot overflow the loss
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dr_grpo")
TRL_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "dr_grpo"}
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


def _ppo_terms(log_ratio, advantages, clip_low, clip_high, dual_clip):
    """Per-token (loss, d loss / d logp, ratio, clipped, dual_clipped)."""
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


def kl_terms(logp, ref_logp, estimator):
    """Per-token (kl, d kl / d logp) of KL(pi || pi_ref) from x = logp - ref_logp."""
    x = logp - ref_logp
    if estimator == "k1":
        return x, torch.ones_like(x)
    if estimator == "k2":
        return 0.5 * x * x, x
    xc = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    e = torch.exp(-xc)
    return e - 1.0 + xc, torch.where(x.abs() > LOG_RATIO_CLAMP, 0.0, 1.0 - e)


def rollout_is_weight(old_logp, rollout_logp, cap):
    """min(pi_old / pi_rollout, cap) per token, a constant (no gradient)."""
    log_w = (old_logp - rollout_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_w).clamp(max=cap)


def _token_loss_and_grad(logp, log_ratio, advantages, ref, is_weight, clip_low, clip_high, dual_clip, kl_coef,
                         kl_estimator):
    loss, grad = _ppo_terms(log_ratio, advantages, clip_low, clip_high, dual_clip)[:2]
    if is_weight is not None:
        loss, grad = loss * is_weight, grad * is_weight
    if ref is not None and kl_coef:
        kl, d_kl = kl_terms(logp, ref, kl_estimator)
        loss, grad = loss + kl_coef * kl, grad + kl_coef * d_kl
    return loss, grad


def _seq_ids(cu_seqlens, n, device):
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=n)


def _token_weights(valid, agg, cu_seqlens, global_count, norm_length, dtype):
    """a_t such that the aggregated loss is sum_t a_t loss_t (see the module docstring)."""
    valid = valid.to(dtype)
    if agg == "token-mean":
        count = valid.sum() if global_count is None else valid.new_tensor(float(global_count))
        return valid / count.clamp(min=1.0)
    if agg == "seq-mean-token-sum-norm":
        return valid / float(norm_length)
    num_seqs = cu_seqlens.numel() - 1
    if agg == "dr_grpo":
        count = num_seqs if global_count is None else global_count
        return valid / (float(count) * float(norm_length))
    seq_ids = _seq_ids(cu_seqlens, valid.shape[0], valid.device)
    tokens_per_seq = valid.new_zeros(num_seqs).index_add_(0, seq_ids, valid)
    if global_count is None:
        count = (tokens_per_seq > 0).sum().to(dtype)
    else:
        count = valid.new_tensor(float(global_count))
    weights = valid / count.clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        weights = weights / tokens_per_seq.clamp(min=1.0)[seq_ids]
    return weights


def _sequence_log_ratio(logp, old, valid, seq_ids, num_seqs):
    """Per token: the mean of logp - old over the masked-in tokens of its sequence."""
    diff = torch.where(valid, logp - old, 0.0)
    total = diff.new_zeros(num_seqs).index_add_(0, seq_ids, diff)
    count = diff.new_zeros(num_seqs).index_add_(0, seq_ids, valid.to(diff.dtype))
    return (total / count.clamp(min=1.0))[seq_ids]


# --- the op -----------------------------------------------------------------------------

@torch.library.custom_op("spell_kernels::policy_loss", mutates_args=())
def _policy_loss_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old: torch.Tensor | None,
                    advantages: torch.Tensor, token_weights: torch.Tensor, ref: torch.Tensor | None,
                    rollout: torch.Tensor | None, valid: torch.Tensor, seq_ids: torch.Tensor | None, num_seqs: int,
                    clip_low: float, clip_high: float, dual_clip: float | None, kl_coef: float, kl_estimator: str,
                    rollout_is_cap: float, temperature: float, logit_scale: float, softcap: float | None,
                    with_entropy: bool, ignore_index: int, need_hidden_grad: bool, need_weight_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp, entropy or (0,), d_hidden or (0,), d_weight or (0,)): the gradients of the
    loss, formed during the forward pass (for a loss gradient of 1)."""
    terms = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                 kl_estimator=kl_estimator)
    compute_grads = need_hidden_grad or need_weight_grad

    def chunk_terms(start, end, logp, log_ratio=None):
        old_c = logp if old is None else old[start:end]
        if log_ratio is None:
            log_ratio = logp - old_c
        if rollout is None:
            is_w = None
        elif rollout_is_cap < 0:  # `rollout` holds precomputed importance weights (importance_weights=)
            is_w = rollout[start:end]
        else:
            is_w = rollout_is_weight(old_c, rollout[start:end], rollout_is_cap)
        ref_c = None if ref is None else ref[start:end]
        return _token_loss_and_grad(logp, log_ratio, advantages[start:end], ref_c, is_w, **terms)

    n = hidden.shape[0]
    if seq_ids is None:  # token-level ratio: gradients inside the forward chunk loop
        def grad_fn(start, end, logp, entropy):
            return token_weights[start:end] * chunk_terms(start, end, logp)[1], None

        _, logp, entropy, d_hidden, d_weight = linear_logprob_chunks(
            hidden, weight, targets, temperature, ignore_index, with_entropy,
            grad_fn=grad_fn if compute_grads else None, need_hidden_grad=need_hidden_grad,
            need_weight_grad=need_weight_grad, logit_scale=logit_scale, softcap=softcap)
        per_token = chunk_terms(0, n, logp)[0]
    else:  # sequence-level ratio: all log-probs first, then the backward pass over the logits again
        lse, logp, entropy, _, _ = linear_logprob_chunks(hidden, weight, targets, temperature, ignore_index,
                                                         with_entropy, logit_scale=logit_scale, softcap=softcap)
        log_ratio = _sequence_log_ratio(logp, logp if old is None else old, valid, seq_ids, num_seqs)
        per_token, d_logp = chunk_terms(0, n, logp, log_ratio)
        d_hidden = d_weight = None
        if compute_grads:
            d_hidden, d_weight = linear_logprob_backward(
                hidden, weight, targets, lse, None, token_weights * d_logp, None, temperature, ignore_index,
                need_hidden_grad, need_weight_grad, logit_scale, softcap)
    loss = (token_weights * per_token).sum()
    return (loss, logp, logp.new_empty(0) if entropy is None else entropy,
            hidden.new_empty(0) if d_hidden is None else d_hidden,
            weight.new_empty(0) if d_weight is None else d_weight)


@_policy_loss_op.register_fake
def _(hidden, weight, targets, old, advantages, token_weights, ref, rollout, valid, seq_ids, num_seqs, clip_low,
      clip_high, dual_clip, kl_coef, kl_estimator, rollout_is_cap, temperature, logit_scale, softcap, with_entropy,
      ignore_index, need_hidden_grad, need_weight_grad):
    n, dt = hidden.shape[0], stat_dtype(hidden, weight)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n if with_entropy else 0, dtype=dt),
            torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, _, _, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.needs = (inputs[-2], inputs[-1])
    ctx.used = False


def _backward(ctx, g_loss, *_unused):
    if ctx.used:
        raise RuntimeError("policy_loss computes its gradients during the forward pass and hands them "
                           "over once: backward through it a second time (retain_graph) is not supported")
    ctx.used = True
    d_hidden, d_weight = ctx.saved_tensors
    # no host sync on g_loss: scale in place (the buffers are ours), or out of place when traced
    if torch.compiler.is_compiling():
        grads = [g * g_loss.to(g.dtype) if need else None for g, need in zip((d_hidden, d_weight), ctx.needs)]
    else:
        grads = [g.mul_(g_loss.to(g.dtype)) if need else None for g, need in zip((d_hidden, d_weight), ctx.needs)]
    return (*grads,) + (None,) * 22


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --- the function -----------------------------------------------------------------------

def _resolve_agg(agg):
    if agg in TRL_LOSS_TYPES:
        return TRL_LOSS_TYPES[agg]
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r}: expected one of {', '.join(AGG_MODES)} "
                         f"(or TRL's loss_type {', '.join(TRL_LOSS_TYPES)})")
    return agg


def _validate(n, tensors, agg, cu_seqlens, global_count, norm_length, clip_low, clip_high, dual_clip, kl_coef,
              kl_estimator, ratio_level, rollout_logprobs, rollout_is_cap, check):
    for name, t in tensors.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like targets, got {tuple(t.shape)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level={ratio_level!r}: expected one of {', '.join(RATIO_LEVELS)}")
    if agg != "token-mean" or ratio_level == "sequence":
        need = f"agg={agg!r}" if agg != "token-mean" else "ratio_level='sequence'"
        if agg not in ("seq-mean-token-sum-norm",) or ratio_level == "sequence":
            if cu_seqlens is None:
                raise ValueError(f"{need} needs cu_seqlens (B+1,) to know where each sequence starts")
            if cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
            if should_check(check, cu_seqlens) and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n):
                raise ValueError(f"cu_seqlens must run from 0 to the number of tokens ({n}), "
                                 f"got {cu_seqlens.tolist()[:4]}...{int(cu_seqlens[-1])}")
    if agg in ("seq-mean-token-sum-norm", "dr_grpo") and not (norm_length is not None and norm_length > 0):
        raise ValueError(f"agg={agg!r} divides by a constant length: pass norm_length > 0 (verl: the padded "
                         f"response length; TRL dr_grpo: max_completion_length), got {norm_length}")
    if agg == "seq-mean-token-sum-norm" and global_count is not None:
        raise ValueError("agg='seq-mean-token-sum-norm' weighs every token by 1/norm_length whatever the batch: "
                         "sum the micro-batches' losses and leave global_count=None")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (it bounds -A * ratio for A < 0), got {dual_clip}")
    if global_count is not None and not global_count > 0:
        raise ValueError(f"global_count must be > 0, got {global_count}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)} "
                         "(verl's low_var_kl is k3, its mse k2, its kl k1)")
    if kl_coef and tensors["ref_logprobs"] is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (N,), the reference policy's log-probs")
    if rollout_logprobs is not None and not (rollout_is_cap is not None and rollout_is_cap > 0):
        raise ValueError(f"rollout_logprobs needs rollout_is_cap > 0, the bound on the truncated importance "
                         f"weight (TRL's vllm_importance_sampling_cap, e.g. 2.0); got {rollout_is_cap}")


def policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28,
                dual_clip=None, agg="token-mean", temperature=1.0, return_entropy=False, cu_seqlens=None,
                global_count=None, ignore_index=-100, *, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
                ratio_level="token", rollout_logprobs=None, rollout_is_cap=None, norm_length=None, softcap=None,
                logit_scale=1.0, importance_weights=None, check=None):
    """PPO-clip loss of a packed batch of N tokens; returns (loss, stats). See the module docstring
    for the formulas.

    hidden (N, H), weight (V, H): last hidden states and LM head; targets (N,) the sampled
    ids (ignore_index counts as masked out); old_logprobs (N,) the log-probs of the policy that
    the ratio is taken against, or None for strictly on-policy training (then old = current
    log-probs, detached, so the ratio is exactly 1 and no second forward pass is needed);
    advantages (N,) per token (see broadcast_to_tokens); mask (N,) true on tokens that train.
    agg: an aggregation mode or TRL loss_type (module docstring); the seq-mean modes, dr_grpo and
    ratio_level="sequence" take cu_seqlens (B+1,) of the packed sequences; seq-mean-token-sum-norm
    and dr_grpo take norm_length.
    ref_logprobs (N,), kl_coef, kl_estimator ("k1", "k2", "k3"): add kl_coef * KL(pi || pi_ref).
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO).
    rollout_logprobs (N,) with rollout_is_cap: weight each token's PPO term by the truncated
    importance ratio min(pi_old / pi_rollout, cap) (the sampler differs from the trainer).
    importance_weights (N,): the same weights already computed (TRL's importance_sampling_ratio);
    not together with rollout_logprobs.
    softcap, logit_scale: as fused_linear_logprob (the model's own logit transform).
    check: validate tensor contents (host syncs on GPU); None = only on CPU tensors.

    Gradient accumulation: pass global_count = the number of masked-in tokens (token-mean, dapo),
    of sequences with any masked-in token (seq-mean modes) or of all sequences (dr_grpo) over all
    micro-batches of the optimizer step. Each micro-batch's loss is then its share of one mean
    over the whole step, and the summed gradients equal those of a single big batch.

    stats: 0-d detached fp32 tensors (they cost no host sync; .item() them when logging), over this
    call's masked-in tokens: clip_frac_low (A < 0 and r < 1 - clip_low), clip_frac_high
    (A > 0 and r > 1 + clip_high), dual_clip_frac (with dual_clip), approx_kl (the k3
    estimator of KL(pi_old || pi): mean of r - 1 - log r, >= 0), ratio_mean, ratio_min,
    ratio_max, num_tokens, entropy (mean, with return_entropy=True), kl (mean kl_t, with
    ref_logprobs) and is_weight_mean (with rollout_logprobs).

    No masked-in token (N = 0 included): the loss is 0, still connected to hidden and weight
    (backward gives zero gradients); num_tokens is 0, the means are 0 and ratio_mean, ratio_min
    and ratio_max are 1 (the ratio of a policy that has not moved). When combining calls, weight
    the means by num_tokens and skip calls with num_tokens 0 in min/max.
    """
    validate_logprob_inputs(hidden, weight, targets, temperature, ignore_index, check, softcap, logit_scale)
    if importance_weights is not None and rollout_logprobs is not None:
        raise ValueError("pass rollout_logprobs (with rollout_is_cap) or importance_weights, not both")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be packed as (N, H), got shape {tuple(hidden.shape)}")
    n = hidden.shape[0]
    agg = _resolve_agg(agg)
    _validate(n, {"old_logprobs": old_logprobs, "advantages": advantages, "mask": mask, "ref_logprobs": ref_logprobs,
                  "rollout_logprobs": rollout_logprobs, "importance_weights": importance_weights}, agg, cu_seqlens, global_count, norm_length, clip_low,
              clip_high, dual_clip, kl_coef, kl_estimator, ratio_level, rollout_logprobs, rollout_is_cap, check)
    valid = mask.bool() & (targets != ignore_index)
    dt = stat_dtype(hidden, weight)
    advantages = advantages.to(dt)

    def const(t):
        return None if t is None else t.detach().to(dt)

    old, ref, rollout = const(old_logprobs), const(ref_logprobs), const(rollout_logprobs)
    is_cap = float(rollout_is_cap or 0.0)
    if importance_weights is not None:
        rollout, is_cap = const(importance_weights), -1.0
    if not kl_coef:
        ref = None
    token_weights = _token_weights(valid, agg, cu_seqlens, global_count, norm_length, dt)
    seq_ids = _seq_ids(cu_seqlens, n, hidden.device) if ratio_level == "sequence" else None
    num_seqs = 0 if seq_ids is None else cu_seqlens.numel() - 1
    grad_on = torch.is_grad_enabled()
    loss, logp, entropy, _, _ = _policy_loss_op(
        hidden, weight, targets, old, advantages, token_weights, ref, rollout, valid, seq_ids, num_seqs,
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip), float(kl_coef),
        kl_estimator, is_cap, float(temperature), float(logit_scale),
        None if softcap is None else float(softcap), bool(return_entropy), int(ignore_index),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    logp = logp.detach()
    old_or_logp = logp if old is None else old
    log_ratio = logp - old_or_logp
    if seq_ids is not None:
        log_ratio = _sequence_log_ratio(logp, old_or_logp, valid, seq_ids, num_seqs)
    stats = _stats(log_ratio, advantages, valid, entropy if return_entropy else None, clip_low, clip_high, dual_clip)
    with torch.no_grad():
        count = valid.sum().float().clamp(min=1.0)
        if ref is not None:
            stats["kl"] = ((kl_terms(logp, ref, kl_estimator)[0] * valid).sum() / count).float()
        if rollout is not None:
            w = rollout if is_cap < 0 else rollout_is_weight(old_or_logp, rollout, is_cap)
            stats["is_weight_mean"] = ((w * valid).sum() / count).float()
    return loss, stats


@torch.no_grad()
def _stats(log_ratio, advantages, valid, entropy, clip_low, clip_high, dual_clip):
    _, _, ratio, clipped, dual_clipped = _ppo_terms(log_ratio, advantages, clip_low, clip_high, dual_clip)
    count = valid.sum().float()

    def mean(x):
        return (x.float() * valid).sum() / count.clamp(min=1.0)

    def extreme(reduce, empty):  # over the masked-in tokens; an appended `empty` keeps zero rows reducible
        values = torch.cat([torch.where(valid, ratio, empty), ratio.new_full((1,), empty)])
        return torch.where(count > 0, reduce(values), 1.0)

    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
