"""Merge of partial attention results by their log-sum-exp (shared-prefix, decode and ring
attention). Triton kernel for CUDA tensors, PyTorch for CPU tensors; both differentiable."""
import math

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from ._triton import tl, triton


@triton.jit
def _merge_kernel(
    Out, Lse, OutB, LseB, MergedOut, MergedLse,
    num_rows, num_heads, head_dim,
    stride_ot, stride_oh, stride_lh, stride_lt,
    stride_bt, stride_bh, stride_blh, stride_blt,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(T * H, BLOCK_R),): each row is one (token t, head h) pair, r = t * H + h."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    t = (rows // num_heads).to(tl.int64)  # 64-bit offsets: row x stride may pass 2^31 (rows stay
    h = (rows % num_heads).to(tl.int64)  # int32 for the division, checked by the launcher)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs_d < head_dim)[None, :]

    lse_a = tl.load(Lse + h * stride_lh + t * stride_lt, mask=row_mask, other=float("-inf")).to(tl.float32)
    lse_b = tl.load(LseB + h * stride_blh + t * stride_blt, mask=row_mask, other=float("-inf")).to(tl.float32)
    empty_a = lse_a == float("-inf")
    empty_b = lse_b == float("-inf")
    # an empty side (no keys) contributes exactly nothing: its buffer is never read, whatever it holds
    out_a = tl.load(Out + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                    mask=mask & ~empty_a[:, None], other=0.0)
    out_b = tl.load(OutB + t[:, None] * stride_bt + h[:, None] * stride_bh + offs_d[None, :],
                    mask=mask & ~empty_b[:, None], other=0.0)
    out_a = out_a.to(tl.float32)
    out_b = out_b.to(tl.float32)

    both_empty = empty_a & empty_b
    lse_a = tl.where(both_empty, 0.0, lse_a)  # -inf - (-inf) would be nan
    lse_b = tl.where(both_empty, 0.0, lse_b)
    diff = lse_b - lse_a
    weight_b = 1.0 / (1.0 + tl.exp(-diff))  # sigmoid; exact 0 / 1 at diff = -inf / +inf
    merged = out_a - weight_b[:, None] * (out_a - out_b)  # both empty: 0 - w (0 - 0) = 0

    # hi - logsigmoid(-gap) = hi + log1p(exp(gap)), gap <= 0; log1p without libdevice:
    # log1p(x) = log(u) * x / (u - 1) with u = 1 + x, exact enough where u rounds
    hi = tl.maximum(lse_a, lse_b)
    gap = tl.minimum(lse_a, lse_b) - hi
    x = tl.exp(gap)
    u = 1.0 + x
    log1p_x = tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))
    merged_lse = tl.where(both_empty, float("-inf"), hi + log1p_x)

    tl.store(MergedOut + t[:, None] * (num_heads * head_dim) + h[:, None] * head_dim + offs_d[None, :], merged,
             mask=mask)
    tl.store(MergedLse + h * (num_rows // num_heads) + t, merged_lse, mask=row_mask)


def _merge_torch(out, lse, out_b, lse_b):
    dtype = torch.promote_types(torch.promote_types(out.dtype, out_b.dtype), torch.float32)
    lse, lse_b = lse.to(dtype), lse_b.to(dtype)
    empty, empty_b = torch.isneginf(lse), torch.isneginf(lse_b)
    # an empty side contributes exactly nothing, whatever its buffer holds (nan, inf)
    out = out.to(dtype).masked_fill(empty.T.unsqueeze(-1), 0.0)
    out_b = out_b.to(dtype).masked_fill(empty_b.T.unsqueeze(-1), 0.0)
    both_empty = empty & empty_b
    zero = torch.zeros((), dtype=dtype, device=lse.device)
    diff = torch.where(both_empty, zero, lse_b - lse)  # -inf-(-inf) is nan
    weight_b = torch.sigmoid(diff).transpose(0, 1).unsqueeze(-1)  # (T, H, 1)
    merged_out = out - weight_b * (out - out_b)  # both empty: 0
    # lse - logsigmoid(lse - lse_b), taken from the larger side so that -inf on one side is exact
    hi = torch.where(both_empty, zero, torch.maximum(lse, lse_b))  # both empty: no gradient to either side
    gap = torch.where(both_empty, zero, torch.minimum(lse, lse_b) - hi)
    merged_lse = torch.where(both_empty, -math.inf, hi - F.logsigmoid(-gap))
    return merged_out, merged_lse


MAX_TRITON_ROWS = 2**31 - 1 - 4096  # room for the last block's row indices in int32


def _merge_triton(out, lse, out_b, lse_b):
    t, h, d = out.shape
    if out.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError("merge_attn_states needs out/out_b with a contiguous last (head_dim) dimension")
    if t * h > MAX_TRITON_ROWS:  # row indices stay int32 in the kernel: it divides them by the head count
        raise ValueError(f"merge_attn_states on the GPU takes at most {MAX_TRITON_ROWS} (token, head) rows; got "
                         f"{t} x {h} = {t * h}: merge the tokens in slices")
    merged = torch.empty((t, h, d), dtype=torch.float32, device=out.device)
    merged_lse = torch.empty((h, t), dtype=torch.float32, device=out.device)
    if t * h == 0:
        return merged, merged_lse
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(64, 4096 // block_d))
    _merge_kernel[(triton.cdiv(t * h, block_r),)](
        out, lse, out_b, lse_b, merged, merged_lse, t * h, h, d,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        out_b.stride(0), out_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return merged, merged_lse


class _MergeAttnStates(torch.autograd.Function):
    """Triton forward; the backward is a few elementwise ops. With w = exp(lse_x - lse):
    d out_x = w * d out, d lse_x = w * (d lse + sum_d(d out * (out_x - out)))."""

    @staticmethod
    def forward(ctx, out, lse, out_b, lse_b):
        merged, merged_lse = _merge_triton(out, lse, out_b, lse_b)
        ctx.save_for_backward(out, lse, out_b, lse_b, merged, merged_lse)
        return merged, merged_lse

    @staticmethod
    def backward(ctx, d_merged, d_merged_lse):
        out, lse, out_b, lse_b, merged, merged_lse = ctx.saved_tensors
        grads = []
        for part, part_lse in ((out, lse), (out_b, lse_b)):
            empty = torch.isneginf(part_lse.float())
            w = torch.where(empty, 0.0, torch.exp(part_lse.float() - merged_lse))  # (H, T)
            d_out = w.T.unsqueeze(-1) * d_merged if d_merged is not None else torch.zeros_like(merged)
            d_lse = w * (d_merged_lse if d_merged_lse is not None else 0.0)
            if d_merged is not None:  # an empty side's buffer is never read (0 * nan would be nan)
                part_f = part.float().masked_fill(empty.T.unsqueeze(-1), 0.0)
                d_lse = d_lse + w * (d_merged * (part_f - merged)).sum(-1).T
            grads += [d_out.to(part.dtype), d_lse.to(part_lse.dtype)]
        return tuple(grads)


def merge_attn_states(out, lse, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets into the attention over both.

    out/out_b (T, H, D), lse/lse_b (H, T) (flash-attn's varlen layout). Returns (out, lse)
    in float32 (float64 for float64 inputs on the PyTorch path), in the overflow-safe form:
    out -= sigmoid(lse_b - lse) * (out - out_b); lse -= logsigmoid(lse - lse_b). A side with
    lse = -inf (no keys) contributes exactly nothing, whatever its out buffer holds (nan, inf
    included), and gets zero gradients; a row where both sides have lse = -inf gives out = 0,
    lse = -inf (flash-attn's combine). Differentiable.
    """
    if out.shape != out_b.shape or out.dim() != 3:
        raise ValueError(f"out and out_b must both be (T, H, D); got {tuple(out.shape)} and {tuple(out_b.shape)}")
    expected = (out.shape[1], out.shape[0])
    if lse.shape != expected or lse_b.shape != expected:
        raise ValueError(f"lse and lse_b must be (H, T) = {expected}; got {tuple(lse.shape)} and {tuple(lse_b.shape)}")
    if use_triton(out, lse, out_b, lse_b):
        return _MergeAttnStates.apply(out, lse, out_b, lse_b)
    return _merge_torch(out, lse, out_b, lse_b)
