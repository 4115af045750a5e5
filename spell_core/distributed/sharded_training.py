"""The training side of many ranks: FSDP2 state, weights gathered for sampling, and the
distributed optimizer step's forward / backward.

`shard_model` applies FSDP2 (`torch.distributed.fsdp.fully_shard`) to every decoder layer and
to the whole model over all ranks of the world (the ranks of a context-parallel group hold the
same weights, so they shard them like any other ranks). Gradients are summed, not averaged:
every rank's loss is already its share of one token-mean over the whole step (`global_count`
is all-reduced), so the sum is the single-process gradient. FSDP2 runs on CPUs with gloo too
(torch >= 2.6), which is how the tests check it.

Imports run one way: trainer -> sharded_training -> distributed (the collectives); the rollout
side (data_parallel.py) uses `sampling_weights` from here and never the trainer.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from spell_core.distributed.process_groups import Topology

__all__ = ["shard_model", "is_sharded", "sampling_weights", "forward_backward"]


# --- training state ------------------------------------------------------------------------------

def shard_model(model, topology: Topology):
    """FSDP2 over all ranks: each decoder layer its own unit, embedding / final norm / head the
    root's. `forward_hidden` (what the trainer and the sampler call) gets FSDP's hooks.

    A model loaded in bf16 / fp16 is sharded as fp32 master weights (the optimizer steps them, its
    moments fp32) gathered in its half dtype for compute, gradients reduced in fp32 (FSDP2's
    MixedPrecisionPolicy): an update far below half a bf16 ulp is kept (spell_core/master_weights.py
    does the same for one process)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not topology.is_distributed:
        return model
    if is_sharded(model):
        raise ValueError("the model is already sharded (fully_shard was applied before)")
    half = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    policy = MixedPrecisionPolicy()
    if half:
        policy = MixedPrecisionPolicy(param_dtype=half.pop(), reduce_dtype=torch.float32)
        model.float()
    for layer in model.model.layers:
        fully_shard(layer, mesh=topology.world_mesh, mp_policy=policy)
    fully_shard(model, mesh=topology.world_mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "forward_hidden")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already normalised globally
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def sampling_weights(model):
    """Every rank holds the full weights inside this block (one all-gather on entry), so that
    each can run its own generation with no collective per forward. Collective: every rank
    enters and leaves together. A no-op for a model that is not sharded, and inside another
    such block (the trainer's host offload gathers first: spell_core/training/offload.py)."""
    from torch.distributed.fsdp import FSDPModule

    if getattr(model, "_spell_gathered_for_sampling", False):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    model._spell_gathered_for_sampling = True
    try:
        yield model
    finally:
        model._spell_gathered_for_sampling = False
        for unit in units:
            unit.reshard()
            # FSDP2's defaults: the root keeps its weights (the head) after forward, the layers free theirs
            unit.set_reshard_after_forward(unit is not model, recurse=False)


# --- the distributed optimizer step's forward / backward -------------------------------------------

def forward_backward(trainer, micro_batches: list, global_count: int):
    """Trainer._forward_backward on a world of ranks. FSDP2 runs collectives in every forward
    and backward, so every rank runs as many micro-batches as the busiest one: the others pad
    with a micro-batch whose advantage is 0 (an exactly zero gradient). A non-finite loss no
    longer stops the loop early (the ranks would fall out of step); its gradient makes the
    global norm non-finite and the update is skipped everywhere. Returns (loss, [stats], finite)
    summed / combined over the world."""
    device = trainer.device
    count = torch.tensor([len(micro_batches)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padding = None
    total, stats, finite = 0.0, [], True
    for i in range(int(count.item())):
        real = i < len(micro_batches)
        if real:
            mb = micro_batches[i]
        else:
            padding = padding or trainer.padding_micro_batch()
            mb = padding
        loss, mb_stats = trainer._micro_batch_loss(mb, global_count)
        value = float(loss.detach())
        finite = finite and math.isfinite(value)
        loss.backward()
        if real:
            total += value
            stats.append(mb_stats)
        elif not stats:
            stats.append({k: torch.zeros_like(v) for k, v in mb_stats.items()})  # the keys, with no tokens
    summed = torch.tensor([total, 0.0 if finite else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return float(summed[0]), [_world_stats(stats, device)], bool(summed[1] == 0)


def _world_stats(stats: list[dict], device) -> dict:
    """The policy-loss statistics of the whole step over every rank's tokens."""
    keys = sorted(k for k in stats[0] if k not in ("num_tokens", "ratio_min", "ratio_max"))
    counts = torch.stack([s["num_tokens"].double() for s in stats])
    sums = torch.stack([torch.stack([s[k].double() for k in keys]) for s in stats]) * counts[:, None]
    buffer = torch.cat([sums.sum(0), counts.sum()[None]]).to(device)
    dist.all_reduce(buffer)
    out = {k: buffer[i] / buffer[-1].clamp(min=1.0) for i, k in enumerate(keys)}
    out["num_tokens"] = buffer[-1]
    for key, op, empty in (("ratio_min", dist.ReduceOp.MIN, math.inf), ("ratio_max", dist.ReduceOp.MAX, -math.inf)):
        values = [s[key].double() for s in stats if s["num_tokens"] > 0]
        local = torch.stack(values).min() if key == "ratio_min" and values else (
            torch.stack(values).max() if values else torch.tensor(empty, dtype=torch.float64))
        local = local.reshape(1).to(device)
        dist.all_reduce(local, op=op)
        out[key] = local[0] if math.isfinite(float(local[0])) else torch.tensor(1.0, dtype=torch.float64)
    return out
