"""Context parallel training: each rank of a CP group holds a zigzag shard of every sequence.

A packed micro-batch of plain sequences is padded (every sequence to a multiple of 2 x CP
tokens, pads last so causal attention ignores them) and cut zigzag: rank r of R keeps chunks r
and 2R-1-r of each sequence (`spell_kernels.zigzag_shard`). Position ids stay global, so RoPE
is the single-process one. The model runs on the local shard with `RingAttention` at its
attention seam (K/V travel around the CP group, `spell_kernels.ring_flash_attn_varlen_func`),
and each rank scores the loss rows whose predicting hidden state it holds. Every rank's loss
is its share of the one token-mean over the step (weights 1 / global count), so the CP group's
losses add up to the single-process loss; the ring's backward hands each rank the gradient of
the whole loss with respect to its K/V, so the ranks' parameter gradients add up to the
single-process gradient (FSDP2 sums them, see sharded_training.py).

Shared-prefix groups [prompt, resp_1 ... resp_G] keep their packing: every segment (the prompt,
each response) is cut zigzag like a sequence, so the prompt is forwarded and back-propagated
once, sharded, and each rank holds (prompt + sum of responses) / CP tokens. Attention is
`spell_kernels.ring_shared_prefix_attn_func` (`RingSharedPrefixAttention`): the responses'
queries see their own segment causally and, through the same K/V ring, every real key of the
prompt's shards, merged by log-sum-exp (spell_kernels/ring_shared_prefix.py).
An MoE model's replayed expert ids (trainer.MicroBatch.routing) are sharded like the tokens.
Dynamic-NTK RoPE is refused (its frequencies depend on the sequence length a shard does not see).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

import spell_kernels
from spell_core.models.routed_tokens import as_replay
from spell_kernels.ring_attn import zigzag_cu_seqlens, zigzag_pad, zigzag_shard
from spell_kernels.ring_shared_prefix import RingSharedPrefixPlan

__all__ = ["RingAttention", "RingSharedPrefixAttention", "ContextShard", "shard_micro_batch", "micro_batch_loss"]


class RingAttention:
    """Attention backend `attn(layer_idx, q, k, v)` for a model forward over a zigzag shard:
    causal attention of every local query against its whole sequence, across the CP group."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, group=None, softmax_scale=None):
        self.cu_seqlens, self.max_seqlen, self.group, self.softmax_scale = cu_seqlens, max_seqlen, group, softmax_scale

    def __call__(self, layer_idx: int, q, k, v):
        return spell_kernels.ring_flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.max_seqlen,
                                                         softmax_scale=self.softmax_scale, causal=True,
                                                         group=self.group)


class RingSharedPrefixAttention:
    """Attention backend for a zigzag shard of a micro-batch with shared-prefix groups."""

    def __init__(self, plan: RingSharedPrefixPlan, group=None, softmax_scale=None):
        self.plan, self.group, self.softmax_scale = plan, group, softmax_scale

    def __call__(self, layer_idx: int, q, k, v):
        return spell_kernels.ring_shared_prefix_attn_func(q, k, v, self.plan, softmax_scale=self.softmax_scale,
                                                          group=self.group)


@dataclass
class ContextShard:
    """One rank's part of a micro-batch."""
    input_ids: torch.Tensor  # (T_local,) zigzag shard of the padded batch
    position_ids: torch.Tensor  # (T_local,) global positions within each sequence
    cu_seqlens: torch.Tensor  # (B+1,) int32, the local shard's
    max_seqlen: int
    hidden_rows: torch.Tensor  # (n,) local hidden rows this rank scores
    loss_rows: torch.Tensor  # (n,) which of the micro-batch's loss rows (pred_rows order) they are
    plan: RingSharedPrefixPlan | None = None  # for a micro-batch with shared-prefix groups
    routing: torch.Tensor | None = None  # (T_local, L, k) the replayed expert ids of input_ids (MoE)


def shard_micro_batch(mb, rank: int, world_size: int) -> ContextShard:
    """Rank `rank`'s zigzag shard of a micro-batch (trainer.MicroBatch): every segment (plain
    sequence, prompt, response) cut zigzag on its own."""
    layout, device = mb.layout, mb.input_ids.device
    cu = layout.cu_seqlens
    total = mb.input_ids.numel()
    ids, cu_padded = zigzag_pad(mb.input_ids, cu, world_size)
    positions, _ = zigzag_pad(layout.position_ids, cu, world_size)
    original, _ = zigzag_pad(torch.arange(total, device=device), cu, world_size, value=-1)
    held = zigzag_shard(torch.arange(int(cu_padded[-1]), device=device), cu_padded, rank, world_size)
    cu_local, max_local = zigzag_cu_seqlens(cu_padded, world_size)
    # local row of every original token held here (-1: held by another rank, or padding)
    local_row = torch.full((total,), -1, dtype=torch.long, device=device)
    held_original = original[held]
    real = held_original >= 0
    local_row[held_original[real]] = torch.nonzero(real).flatten()
    rows = local_row[mb.pred_rows]
    mine = rows >= 0
    plan = None
    if mb.has_groups:
        plan = RingSharedPrefixPlan.build(cu.diff().tolist(), layout.parent.tolist(), rank, world_size, device)
    routing = None
    if mb.routing is not None:  # padding rows (-1) take row 0's ids: their outputs reach no loss row
        routing = mb.routing[held_original.clamp(min=0)]
    return ContextShard(ids[held], positions[held], cu_local.to(device), max_local, rows[mine],
                        torch.nonzero(mine).flatten(), plan, routing)


def micro_batch_loss(trainer, mb, global_count: int):
    """(loss, stats) of this rank's share of micro-batch `mb` (not yet backpropagated): the
    Trainer's single-process loss, split across the CP group of `trainer.topology`."""
    topo, opts, model = trainer.topology, trainer.options, trainer.model
    if model.config.rope["rope_type"] == "dynamic":
        raise ValueError("context parallelism does not support dynamic-NTK RoPE (its frequencies depend on the "
                         "whole sequence's length); use --cp 1, or a checkpoint with static RoPE scaling (yarn)")
    shard = shard_micro_batch(mb, topo.cp_rank, topo.cp)
    if shard.plan is not None:
        attn = RingSharedPrefixAttention(shard.plan, topo.cp_group)
    else:
        attn = RingAttention(shard.cu_seqlens, shard.max_seqlen, topo.cp_group)
    context = torch.autocast(trainer.device.type, dtype=torch.bfloat16) if trainer.autocast else nullcontext()
    replay = {} if shard.routing is None else {"routing": as_replay(shard.routing, trainer.moe_layers)}
    with context:
        hidden = model.forward_hidden(shard.input_ids, shard.cu_seqlens, shard.position_ids, attn=attn, **replay)
    weight = model.lm_head_weight
    rows = shard.loss_rows
    targets, old, advantages = mb.targets[rows], mb.old_logprobs[rows], _token_weighted_advantages(mb, opts.agg)[rows]
    mask = torch.ones_like(targets, dtype=torch.bool)
    # A rank may hold no loss row: policy_loss then returns a zero still connected to the graph, so
    # this rank's backward joins the ring's collectives like every other rank's. Every aggregation
    # is token-mean with weights folded into the advantages (see _token_weighted_advantages).
    return spell_kernels.policy_loss(
        hidden[shard.hidden_rows].to(weight.dtype), weight, targets, old if opts.use_sampler_logprobs else None,
        advantages, mask, clip_low=opts.clip_low, clip_high=opts.clip_high, dual_clip=opts.dual_clip, agg="token-mean",
        temperature=opts.temperature, return_entropy=opts.entropy, global_count=global_count)


def _token_weighted_advantages(mb, agg: str) -> torch.Tensor:
    """Advantages that make token-mean over `global_count` equal `agg`. A sequence's tokens are
    spread over the ranks, so per-sequence means cannot be taken on one; but the PPO-clip loss
    is positively homogeneous in the advantage (loss(cA) = c loss(A) for c > 0, clipping
    included), so seq-mean-token-mean = token weights 1 / (sequences x its length) = token-mean
    over the sequences' count with A / length. seq-mean-token-sum needs no change."""
    if agg != "seq-mean-token-mean":
        return mb.advantages
    lengths = mb.resp_cu_seqlens.diff().long()
    per_row = torch.repeat_interleave(lengths, lengths, output_size=mb.advantages.numel())
    return mb.advantages / per_row.to(mb.advantages.dtype)
