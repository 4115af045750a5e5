"""Qwen3-MoE's sparse block (transformers 5's `Qwen3MoeSparseMoeBlock`): router + experts.

The router is a bias-free linear layer (`mlp.gate.weight`, (E, H)); its logits go through a
float32 softmax over all experts, the top `num_experts_per_tok` are kept and, when
`norm_topk_prob`, renormalised to sum to one. The experts (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I), transformers 5's fused layout) run in `spell_kernels.moe_experts`.

Routing record/replay follows `spell_core.models.routing`. The owning CausalLM marks its blocks
`live` for the length of its forward: only then is a recording written and the per-expert load
counted, so a gradient-checkpoint recomputation (which runs after the forward) neither counts
twice nor records anew: in record mode it replays what the live forward recorded.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import spell_kernels
from spell_core.models.routing import Routing

__all__ = ["SparseMoeBlock", "RouterStats", "moe_fields", "is_moe_layer", "router_aux_loss", "expert_id_dtype"]


def moe_fields(raw: dict, num_hidden_layers: int, source: str) -> dict:
    """The MoE fields of a qwen3_moe config.json, with transformers' defaults, checked."""
    # the Hub's config.json says num_experts; transformers 5 writes it as num_local_experts
    if "num_experts" in raw and "num_local_experts" in raw and raw["num_experts"] != raw["num_local_experts"]:
        raise ValueError(f"{source}: num_experts ({raw['num_experts']!r}) and num_local_experts "
                         f"({raw['num_local_experts']!r}) disagree; keep one of them")
    num_experts = raw.get("num_experts", raw.get("num_local_experts", 128))
    fields = dict(num_experts=num_experts, num_experts_per_tok=raw.get("num_experts_per_tok", 8),
                  moe_intermediate_size=raw.get("moe_intermediate_size", 768),
                  decoder_sparse_step=raw.get("decoder_sparse_step", 1),
                  norm_topk_prob=raw.get("norm_topk_prob", False))
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
        value = fields[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_experts" else 1):
            least = "0" if name == "num_experts" else "1"
            raise ValueError(f"{source}: {name} must be an integer >= {least}; got {value!r}")
    if not isinstance(fields["norm_topk_prob"], bool):
        raise ValueError(f"{source}: norm_topk_prob must be true or false; got {fields['norm_topk_prob']!r}")
    if fields["num_experts"] and fields["num_experts_per_tok"] > fields["num_experts"]:
        raise ValueError(f"{source}: num_experts_per_tok ({fields['num_experts_per_tok']}) must be at most "
                         f"num_experts ({fields['num_experts']})")
    if fields["num_experts"] > 2**31 - 1:
        raise ValueError(f"{source}: num_experts {fields['num_experts']} is too large")
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in mlp_only):
        raise ValueError(f"{source}: mlp_only_layers must be a list of layer indices; got {mlp_only!r}")
    bad = [i for i in mlp_only if not 0 <= i < num_hidden_layers]
    if bad:
        raise ValueError(f"{source}: mlp_only_layers {bad} are outside 0..{num_hidden_layers - 1} "
                         f"(num_hidden_layers is {num_hidden_layers})")
    fields["mlp_only_layers"] = tuple(sorted(set(mlp_only)))
    return fields


def is_moe_layer(layer_idx: int, num_experts: int, decoder_sparse_step: int, mlp_only_layers) -> bool:
    """transformers' rule: sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return layer_idx not in mlp_only_layers and num_experts > 0 and (layer_idx + 1) % decoder_sparse_step == 0


def expert_id_dtype(num_experts: int) -> torch.dtype:
    """The narrowest dtype a recording of expert ids is stored in."""
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32


@dataclass
class RouterStats:
    """Sums over a forward's MoE layers for the load-balancing loss (O(E) memory, no host sync)."""
    tokens_per_expert: torch.Tensor  # (E,) float32: top-k assignments
    prob_sum: torch.Tensor  # (E,) float32, differentiable: router probabilities summed over tokens
    rows: int = 0


def router_aux_loss(stats: RouterStats, num_experts: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6) over every layer's tokens;
    the assignments counted are the ones used (the replayed ids under routing replay)."""
    rows = max(stats.rows, 1)
    return num_experts * torch.sum((stats.tokens_per_expert / rows) * (stats.prob_sum / rows))


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoeBlock(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, norm_topk_prob: bool):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = Router(num_experts, hidden_size)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.live = False  # set by CausalLM.forward_hidden for the length of its forward
        self.stats: RouterStats | None = None  # set by CausalLM when the aux loss is asked for
        self.expert_load: torch.Tensor | None = None  # (E,) int64 token-slots per expert since the last read

    def forward(self, x: torch.Tensor, layer_idx: int, routing: Routing | None = None) -> torch.Tensor:
        logits = F.linear(x, self.gate.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        ids = self._replayed_ids(x, layer_idx, routing)
        if ids is None:
            with torch.no_grad():  # the same autograd graph as a replay (checkpoint recompute replays)
                ids = torch.topk(probs, self.top_k, dim=-1).indices
        weights = probs.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
        if self.live:
            self._account(ids, probs, layer_idx, routing)
        return spell_kernels.moe_experts(x, self.experts.gate_up_proj, self.experts.down_proj, ids, weights)

    def _replayed_ids(self, x, layer_idx: int, routing: Routing | None) -> torch.Tensor | None:
        if routing is None or (routing.mode == "record" and self.live):
            return None
        if layer_idx not in routing.experts:
            raise ValueError(f"routing replay: no expert ids for MoE layer {layer_idx} (have layers "
                             f"{sorted(routing.experts)}); replay needs a recording of the same tokens")
        ids = routing.experts[layer_idx]
        if ids.shape != (x.shape[0], self.top_k):
            raise ValueError(f"routing replay: layer {layer_idx} has expert ids of shape {tuple(ids.shape)}, "
                             f"expected ({x.shape[0]}, {self.top_k}) = (tokens of this call, num_experts_per_tok)")
        return ids.to(device=x.device, dtype=torch.long)

    @torch.no_grad()
    def _account_load(self, ids: torch.Tensor) -> None:
        if self.expert_load is None or self.expert_load.device != ids.device:
            self.expert_load = torch.zeros(self.num_experts, dtype=torch.long, device=ids.device)
        elif self.expert_load.is_inference() and not torch.is_inference_mode_enabled():
            self.expert_load = self.expert_load.clone()  # counted by the sampler (inference mode) until now
        self.expert_load.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))

    def _account(self, ids, probs, layer_idx: int, routing: Routing | None) -> None:
        if routing is not None and routing.mode == "record":
            routing.experts[layer_idx] = ids.detach().to(expert_id_dtype(self.num_experts))
        self._account_load(ids)
        if self.stats is not None:
            with torch.no_grad():
                self.stats.tokens_per_expert += torch.zeros_like(self.stats.tokens_per_expert).index_add_(
                    0, ids.reshape(-1), torch.ones(ids.numel(), device=ids.device))
            self.stats.prob_sum = self.stats.prob_sum + probs.sum(dim=0)
            self.stats.rows += probs.shape[0]

    def read_expert_load(self) -> torch.Tensor:
        """(E,) int64 token-slots routed to each expert since the last read; resets the count."""
        load = self.expert_load
        if load is None:
            return torch.zeros(self.num_experts, dtype=torch.long, device=self.gate.weight.device)
        self.expert_load = torch.zeros_like(load)
        return load
