"""The MoE kernels' launches exactly as moe_experts makes them on a GPU, recorded on CPU for an
ahead-of-time sm_90 build (aot_launch.py): a forward and backward at a Qwen3-30B-A3B layer
shape with the GPU tile tables. The tensors are allocated but never touched (pages stay
virtual): the launches lend only their dtype, alignment, strides and sizes.

    launches = moe_launches(torch.bfloat16)     # [(label, launch)], one per kernel launch
    results = compile_launches_for_hopper([l for _, l in launches])
"""
import contextlib

import torch

from spell_kernels import moe, moe_routing
from tests.kernels.aot_launch import record_launches

# Qwen3-30B-A3B: hidden 2048, moe_intermediate_size 768, 128 experts, 8 per token
SHAPE = dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8)
KERNELS = {moe: ["_gate_up_swiglu_kernel", "_grouped_matmul_kernel", "_expert_weight_grad_kernel",
                 "_combine_kernel", "_routing_weight_grad_kernel"],
           moe_routing: ["_block_counts_kernel", "_place_pairs_kernel"]}


@contextlib.contextmanager
def _gpu_tables():
    """The GPU tile tables and routing block sizes, though the tensors are on CPU."""
    saved = moe._config, moe.block_m, moe_routing._block_pairs
    moe._config = lambda kind, device, dtype: moe.gpu_config(kind, dtype)
    moe.block_m = lambda device: moe.GPU_BLOCK_M
    moe_routing._block_pairs = lambda device: moe_routing.GPU_BLOCK_PAIRS
    try:
        yield
    finally:
        moe._config, moe.block_m, moe_routing._block_pairs = saved


def moe_launches(dtype, shape=None):
    """[(label, launch)] of one forward + backward of moe_experts (SPELL_KERNELS=triton must be set)."""
    s = dict(SHAPE, **(shape or {}))
    t, h, i, e, k = s["tokens"], s["hidden"], s["inter"], s["experts"], s["top_k"]
    hidden = torch.empty(t, h, dtype=dtype).requires_grad_(True)
    gate_up = torch.empty(e, 2 * i, h, dtype=dtype).requires_grad_(True)
    down = torch.empty(e, h, i, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(t, k).requires_grad_(True)  # the router's fp32 weights
    with _gpu_tables(), contextlib.ExitStack() as stack:
        recorded = [stack.enter_context(record_launches(module, names)) for module, names in KERNELS.items()]
        out = moe.moe_experts(hidden, gate_up, down, ids, weights)
        out.backward(torch.empty_like(out))
    launches = recorded[0] + recorded[1]
    labels = {"_grouped_matmul_kernel": iter(["down", "d act + SwiGLU bwd", "d hidden rows"]),
              "_expert_weight_grad_kernel": iter(["d down_proj", "d gate_up_proj"]),
              "_combine_kernel": iter(["combine", "combine d hidden"])}
    out = []
    for launch in launches:
        name = launch["kernel"]
        label = f"{name} ({next(labels[name])})" if name in labels else name
        out.append((f"{label} {str(dtype)[6:]}", launch))
    return out
