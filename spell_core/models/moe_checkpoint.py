"""Qwen3-MoE expert tensors on disk: the Hub's per-expert layout <-> transformers 5's fused one.

The model holds each MoE layer's experts fused (`mlp.experts.gate_up_proj` (E, 2I, H) with the
gate rows first, `mlp.experts.down_proj` (E, H, I)). Checkpoints on the Hub store them per
expert (`mlp.experts.{e}.gate_proj.weight` (I, H), `up_proj.weight` (I, H), `down_proj.weight`
(H, I)); transformers 5 reads both and writes the per-expert layout. We read both, layer by
layer whichever the checkpoint holds, and write the per-expert layout.
"""
import re

import torch

__all__ = ["names_on_disk", "fuse_experts", "split_experts"]

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def _per_expert(prefix: str, kind: str, shape) -> dict[str, tuple]:
    """The per-expert tensor names (and shapes) one fused tensor is stored as."""
    num_experts = shape[0]
    if kind == "gate_up_proj":
        inter, hidden = shape[1] // 2, shape[2]
        return {f"{prefix}.{e}.{proj}.weight": (inter, hidden)
                for e in range(num_experts) for proj in ("gate_proj", "up_proj")}
    return {f"{prefix}.{e}.down_proj.weight": tuple(shape[1:]) for e in range(num_experts)}


def names_on_disk(expected: dict[str, torch.Size], stored: set[str]) -> dict[str, tuple]:
    """`expected` (the model's tensor names -> shapes) with every fused expert tensor the
    checkpoint does not hold replaced by the per-expert tensors it holds instead."""
    on_disk = {}
    for name, shape in expected.items():
        match = _FUSED.match(name)
        if match is None or name in stored:
            on_disk[name] = tuple(shape)
        else:
            on_disk.update(_per_expert(match["prefix"], match["kind"], shape))
    return on_disk


def fuse_experts(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Stack per-expert tensors of `state` into the fused ones `expected` names, in place, one
    layer at a time; each expert's tensors are dropped as they are copied, so the peak is the
    checkpoint plus one layer's experts, never two copies of the model."""
    for name, shape in expected.items():
        match = _FUSED.match(name)
        if match is None or name in state:
            continue
        prefix = match["prefix"]
        first = state[next(iter(_per_expert(prefix, match["kind"], shape)))]
        fused = torch.empty(tuple(shape), dtype=first.dtype, device=first.device)
        inter = shape[1] // 2
        for e in range(shape[0]):
            if match["kind"] == "gate_up_proj":
                fused[e, :inter].copy_(state.pop(f"{prefix}.{e}.gate_proj.weight"))
                fused[e, inter:].copy_(state.pop(f"{prefix}.{e}.up_proj.weight"))
            else:
                fused[e].copy_(state.pop(f"{prefix}.{e}.down_proj.weight"))
        state[name] = fused
    return state


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every fused expert tensor replaced by per-expert views (no copies), in order."""
    out = {}
    for name, tensor in state.items():
        match = _FUSED.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix = match["prefix"]
        if match["kind"] == "gate_up_proj":
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, inter:]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
    return out
