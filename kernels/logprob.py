"""Fused linear log-prob. PLACEHOLDER until the chunked/Triton op lands: materialises the
logits (fine for small tests only). Stable name and signature:
  fused_linear_logprob(hidden (N,H), weight (V,H), targets (N,), temperature=1.0,
                       return_entropy=False, ignore_index=-100) -> logprobs (N,) fp32
                       [, entropy (N,) fp32]
"""
import torch


def fused_linear_logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    logits = (hidden.float() @ weight.float().T) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(1, safe[:, None].long()).squeeze(1) * valid
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy
