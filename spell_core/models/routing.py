"""Which experts each token went to: recorded by the sampler, replayed by the trainer (issue 22).

A mixture-of-experts layer picks top-k experts per token from its router logits. The sampler
and the trainer run the same weights but different kernels and batch shapes, so near-ties can
pick different experts for the same token, and the trainer's log-probs then drift from the
sampler's (the routing mismatch that collapses MoE RL). With routing replay the trainer uses
the sampler's expert ids while the gate weights still come from the live router logits, so the
router keeps learning.

Contract between the model and its callers: `forward_hidden(..., routing=Routing(...))`.
- mode "record": every MoE layer i stores its chosen ids (T, k) in `experts[i]` (uint8 when
  num_experts <= 256, else int16/int32), T = the call's packed tokens, in the call's order.
- mode "replay": every MoE layer i uses `experts[i]` (T, k) as its ids; its weights are the
  router's softmax (fp32, over all experts) gathered at those ids, renormalised when the
  config says norm_topk_prob.
Dense layers (mlp_only_layers, decoder_sparse_step) have no entry.
"""
from dataclasses import dataclass, field

import torch

__all__ = ["Routing"]


@dataclass
class Routing:
    mode: str  # "record" or "replay"
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> (T, k) expert ids

    def __post_init__(self):
        if self.mode not in ("record", "replay"):
            raise ValueError(f"Routing mode must be 'record' or 'replay', got {self.mode!r}")
