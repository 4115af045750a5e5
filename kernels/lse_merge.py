"""Merge of partial attention results by their log-sum-exp (used by shared-prefix and ring
attention). PyTorch version; a Triton kernel may be added behind the same function."""
import torch
import torch.nn.functional as F


def merge_attn_states(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets into the attention over both.

    out/out_b (T, H, D), lse/lse_b (H, T) (flash-attn's varlen layout). Returns (out, lse)
    in float32, in the overflow-safe form: out -= sigmoid(lse_b - lse) * (out - out_b);
    lse -= logsigmoid(lse - lse_b). A side with lse = -inf (no keys) contributes nothing.
    """
    out, out_b = out.float(), out_b.float()
    lse, lse_b = lse.float(), lse_b.float()
    both_empty = torch.isneginf(lse) & torch.isneginf(lse_b)
    diff = torch.where(both_empty, torch.zeros_like(lse), lse_b - lse)  # -inf-(-inf) is nan
    weight_b = torch.sigmoid(diff).transpose(0, 1).unsqueeze(-1)  # (T, H, 1)
    merged_out = out - weight_b * (out - out_b)
    # lse - logsigmoid(lse - lse_b), taken from the larger side so that -inf on one side is exact
    hi, lo = torch.maximum(lse, lse_b), torch.minimum(lse, lse_b)
    gap = torch.where(both_empty, torch.zeros_like(lse), lo - hi)
    merged_lse = hi - F.logsigmoid(-gap)
    return merged_out, merged_lse
