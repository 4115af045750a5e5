"""Group-relative advantages and their broadcast to tokens.

  group_advantages(rewards (S,), group_ids (S,), mode="grpo", eps=1e-6) -> (S,)
  broadcast_to_tokens(advantages (B,), cu_seqlens=None, mask=None, *, seq_ids=None) -> per token

A batch holds a few thousand rewards at most, so segment reductions in PyTorch
(index_add_ / scatter_reduce) are one launch each on any device; a Triton kernel would
save microseconds and add a second code path to keep right.
"""
import torch

MODES = ("grpo", "dr_grpo", "batch")


def group_advantages(rewards, group_ids=None, mode="grpo", eps=1e-6):
    """Advantages of S samples from their rewards.

    grpo (Shao et al. 2024): (r - mean_g) / (std_g + eps) within each group g, std the
    unbiased (n - 1) standard deviation; dr_grpo (Liu et al. 2025): r - mean_g; batch:
    grpo over all S rewards as one group (group_ids ignored; for SPELL's questioner call
    it on the samples of one task type, or use grpo with the task type as group id).
    Group ids are any integers in any order; a group of one, or one whose rewards are all
    equal, gets exactly 0. Returns rewards' floating dtype (float32 for integer rewards);
    the arithmetic runs in float64.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per sample), got shape {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.double()
    if mode == "batch":
        inverse = torch.zeros(r.shape, dtype=torch.long, device=r.device)
        n_groups = 1
    else:
        if group_ids is None or group_ids.shape != rewards.shape:
            raise ValueError(f"mode={mode!r} needs group_ids of shape {tuple(rewards.shape)}, got "
                             f"{None if group_ids is None else tuple(group_ids.shape)}")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        n_groups = int(inverse.max()) + 1 if r.numel() else 0
    if r.numel() == 0:
        return r.to(out_dtype)
    zeros = r.new_zeros(n_groups)
    counts = zeros.index_add(0, inverse, torch.ones_like(r))
    mean = zeros.index_add(0, inverse, r) / counts
    centred = r - mean[inverse]
    if mode == "dr_grpo":
        adv = centred
    else:
        var = zeros.index_add(0, inverse, centred * centred) / (counts - 1).clamp(min=1)
        adv = centred / (var.sqrt()[inverse] + eps)
    # equal rewards (groups of one included): exactly 0, not rounding noise of the mean
    hi = zeros.scatter_reduce(0, inverse, r, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, inverse, r, "amin", include_self=False)
    return torch.where((hi == lo)[inverse], 0.0, adv).to(out_dtype)


def broadcast_to_tokens(advantages, cu_seqlens=None, mask=None, *, seq_ids=None):
    """Give every token its sequence's advantage.

    Packed layout: cu_seqlens (B+1,) or seq_ids (T,) (sequence index of each token) ->
    (T,). Padded layout: neither, mask (B, L) -> (B, L). mask (same shape as the result)
    zeroes tokens that do not train, e.g. prompt tokens and padding.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D (one per sequence), got shape {tuple(advantages.shape)}")
    if cu_seqlens is not None and seq_ids is not None:
        raise ValueError("pass cu_seqlens or seq_ids, not both")
    if cu_seqlens is not None:
        if cu_seqlens.shape != (advantages.shape[0] + 1,):
            raise ValueError(f"cu_seqlens must have shape ({advantages.shape[0] + 1},) for "
                             f"{advantages.shape[0]} sequences, got {tuple(cu_seqlens.shape)}")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        per_token = torch.repeat_interleave(advantages, lengths.to(advantages.device))
    elif seq_ids is not None:
        per_token = advantages[seq_ids.long()]
    else:
        if mask is None or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
            raise ValueError("without cu_seqlens or seq_ids, pass the padded (B, L) mask, "
                             f"B = {advantages.shape[0]}")
        per_token = advantages[:, None].expand(mask.shape)
    if mask is None:
        return per_token.clone()
    if mask.shape != per_token.shape:
        raise ValueError(f"mask must have shape {tuple(per_token.shape)}, got {tuple(mask.shape)}")
    return torch.where(mask.bool(), per_token, 0.0)
