"""Mixture-of-experts FFN: route each token to its top-k experts, SwiGLU, weighted combine.

    out = moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)

hidden (T, H); gate_up_proj (E, 2I, H) (gate rows first, then up: transformers 5's fused
layout); down_proj (E, H, I); topk_ids (T, k) integer expert ids; topk_weights (T, k).
out[t] = sum_j topk_weights[t, j] * down_proj[e] @ (silu(gate_e @ h_t) * (up_e @ h_t)), e = topk_ids[t, j].
Differentiable in hidden, both weights and topk_weights.

This file holds the CPU path (a loop over experts, also the oracle) until the Triton grouped
GEMM lands (issue 22).
"""
import torch
import torch.nn.functional as F

__all__ = ["moe_experts"]


def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    num_experts = gate_up_proj.shape[0]
    for expert in range(num_experts):
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        rows = F.linear(F.silu(gate) * up, down_proj[expert])
        out = out.index_add(0, token_idx, rows * topk_weights[token_idx, slot, None].to(rows.dtype))
    return out
