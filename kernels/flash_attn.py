"""Varlen flash attention. PLACEHOLDER until the Triton kernel lands: the public function
runs the reference (differentiable through autograd) so the engine can be built on it.

Stable names other modules rely on:
  flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale=None, causal=False, return_lse=False)
  varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, causal) -> (out, lse (Hq, total_q) fp32)
  varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal) -> (dq, dk, dv)
      flash-style: P = exp(scale*qk^T - lse), D = rowsum(dout*out); out/lse may come from
      attention over a superset of the keys (ring attention), giving this block's share.
"""
import torch

from . import reference


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    out, lse = reference.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, lse.float()


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return reference.attention_varlen_backward_from_lse(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                        softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, return_lse=False):
    out, lse = reference.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return (out, lse.float()) if return_lse else out
