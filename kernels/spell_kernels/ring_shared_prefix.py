"""Shared-prefix groups under ring attention: the prompt of a group [prompt, resp_1 ... resp_G]
is sharded across the context-parallel group and forwarded / back-propagated once.

Every segment of a packed batch (prompt, response, plain sequence) is cut zigzag across the R
ranks of `group` like a sequence of `ring_flash_attn_varlen_func` (padded at its end to a
multiple of 2R, rank r keeps chunks r and 2R-1-r). Attention of a local query row is then the
log-sum-exp merge of two parts:

  self    causal attention within its own segment: the zigzag ring of ring_attn.py, unchanged;
  prefix  for a response row, attention without a mask to every real key of its parent prompt,
          whose shards arrive with the same K/V ring (one pass, no extra transfer).

Both parts run on the K/V block received at each ring step; the prefix part gathers the
responses' query rows of every group into one varlen segment per group (they are contiguous
in the local shard) against the prompt rows of the rank that sent the block, minus that rank's
pad rows (the prompt's pads lie at its end, which the causal self part never sees but the
unmasked prefix part would). The backward passes K/V around again with the dK/dV accumulators
on a second ring, as ring_attn does, each block adding its self and prefix shares.

Work and memory per rank: (prompt + sum of responses) / R tokens, and the prefix part costs
sum(responses) x prompt / R score entries per rank: the single-process shared-prefix cost, split.

    plan = RingSharedPrefixPlan.build(segment_lengths, parent, rank, world_size)
    out = ring_shared_prefix_attn_func(q, k, v, plan, group=group)  # q/k/v: this rank's shard

`segment_lengths` are the global (unpadded) lengths, `parent` (-1 or the prompt's index) as
in `SharedPrefixLayout`; a group's responses must follow their prompt directly.
"""
import math
from dataclasses import dataclass

import torch

from .flash_attn import varlen_backward, varlen_forward
from .lse_merge import merge_attn_states
from .ring_attn import _GRAD_TAGS, _KV_TAGS, _group_rank_and_size, _Ring, _ZigzagHalves

__all__ = ["RingSharedPrefixPlan", "ring_shared_prefix_attn_func"]


def _cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0).to(torch.int32)
    return cu.to(device)


@dataclass
class RingSharedPrefixPlan:
    """Where every part of one rank's zigzag shard lies (built once per micro-batch, used by
    every layer). Rows are local rows of this rank's shard."""
    rank: int
    world_size: int
    cu_seqlens: torch.Tensor  # (S+1,) int32: every segment's local (padded / R) rows
    max_seqlen: int
    padded_lengths: list  # global length of every segment after zigzag padding
    resp_rows: torch.Tensor  # (N,) long: local rows of the responses of every group, group by group
    cu_resp: torch.Tensor  # (G+1,) int32: each group's share of resp_rows
    max_resp: int
    prefix_rows: list  # per source rank: (M_src,) long, the real prompt rows of that rank's shard
    cu_prefix: list  # per source rank: (G+1,) int32
    max_prefix: list  # per source rank

    @classmethod
    def build(cls, segment_lengths, parent, rank: int, world_size: int, device=None):
        lengths = [int(n) for n in segment_lengths]
        parent = [int(p) for p in parent]
        if len(lengths) != len(parent):
            raise ValueError(f"{len(lengths)} segment lengths but {len(parent)} parents")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        multiple = 2 * world_size
        padded = [-(-n // multiple) * multiple for n in lengths]
        local = [n // world_size for n in padded]
        cu_local = [0]
        for n in local:
            cu_local.append(cu_local[-1] + n)
        groups = _groups(parent)
        resp_rows, resp_counts = [], []
        for prompt, children in groups:
            lo, hi = cu_local[children[0]], cu_local[children[-1] + 1]
            resp_rows.append(torch.arange(lo, hi))
            resp_counts.append(hi - lo)
        prefix_rows, cu_prefix, max_prefix = [], [], []
        for src in range(world_size):
            rows, counts = [], []
            for prompt, _ in groups:
                real = _real_local_rows(lengths[prompt], padded[prompt], src, world_size)
                rows.append(real + cu_local[prompt])
                counts.append(int(real.numel()))
            prefix_rows.append(_cat_long(rows).to(device))
            cu_prefix.append(_cu(counts, device))
            max_prefix.append(max(counts, default=0))
        return cls(rank, world_size, _cu(local, device), max(local, default=0), padded, _cat_long(resp_rows).to(device),
                   _cu(resp_counts, device), max(resp_counts, default=0), prefix_rows, cu_prefix, max_prefix)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def has_groups(self) -> bool:
        return self.cu_resp.numel() > 1


def _groups(parent):
    """[(prompt segment, [its responses' segments])], checking that responses follow their prompt."""
    groups, s = [], 0
    while s < len(parent):
        if parent[s] >= 0:
            raise ValueError(f"segment {s} (parent {parent[s]}) does not follow its prompt: pack every group as "
                             "[prompt, resp_1, ..., resp_G] with nothing in between")
        children = []
        while s + 1 + len(children) < len(parent) and parent[s + 1 + len(children)] == s:
            children.append(s + 1 + len(children))
        if children:
            groups.append((s, children))
        s += 1 + len(children)
    return groups


def _real_local_rows(length, padded, rank, world_size):
    """Local rows (within the segment) of rank `rank`'s zigzag shard that hold real tokens:
    chunk `rank` then chunk 2R-1-rank; the pads are the global positions >= length."""
    chunk = padded // (2 * world_size)
    out = []
    for half, index in enumerate((rank, 2 * world_size - 1 - rank)):
        real = max(0, min(chunk, length - index * chunk))
        out.append(torch.arange(real) + half * chunk)
    return torch.cat(out)


def _cat_long(parts):
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def _self_block_forward(q, k, v, q_back, plan, halves, scale, step, src):
    """The zigzag causal block of ring_attn: (out, lse, query rows it covers or None = all)."""
    cu, max_len = plan.cu_seqlens, plan.max_seqlen
    if step == 0:
        out, lse = varlen_forward(q, k, v, cu, cu, max_len, max_len, scale, True)
        return out, lse, None
    if src < plan.rank:
        out, lse = varlen_forward(q, k[halves.front], v[halves.front], cu, halves.cu_half, max_len, halves.max_half,
                                  scale, False)
        return out, lse, None
    out, lse = varlen_forward(q_back, k, v, halves.cu_half, cu, halves.max_half, max_len, scale, False)
    return out, lse, halves.back


def _forward(q, k, v, plan, scale, group):
    rank, world_size = plan.rank, plan.world_size
    acc = torch.promote_types(q.dtype, torch.float32)
    halves = _ZigzagHalves(plan.cu_seqlens, plan.max_seqlen, q.shape[0]) if world_size > 1 else None
    ring = _Ring(group, rank, world_size, _KV_TAGS) if world_size > 1 else None
    q_back = q[halves.back] if halves is not None else None
    q_resp = q[plan.resp_rows]
    out = lse = out_x = lse_x = None
    for step in range(world_size):
        if step + 1 < world_size:
            ring.start(k, v)
        src = (rank - step) % world_size
        out_b, lse_b, rows = _self_block_forward(q, k, v, q_back, plan, halves, scale, step, src)
        if out is None:
            out, lse = out_b.to(acc), lse_b.to(acc)
        elif rows is None:
            out, lse = (t.to(acc) for t in merge_attn_states(out, lse, out_b, lse_b))
        else:
            merged, merged_lse = merge_attn_states(out[rows], lse[:, rows], out_b, lse_b)
            out[rows], lse[:, rows] = merged.to(acc), merged_lse.to(acc)
        if plan.has_groups:
            keys = plan.prefix_rows[src]
            ox, lx = varlen_forward(q_resp, k[keys], v[keys], plan.cu_resp, plan.cu_prefix[src], plan.max_resp,
                                    plan.max_prefix[src], scale, False)
            if out_x is None:
                out_x, lse_x = ox.to(acc), lx.to(acc)
            else:
                out_x, lse_x = (t.to(acc) for t in merge_attn_states(out_x, lse_x, ox, lx))
        if step + 1 < world_size:
            k, v = ring.wait("ring_shared_prefix::wait_kv")
    if plan.has_groups:
        rows = plan.resp_rows
        merged, merged_lse = merge_attn_states(out[rows], lse[:, rows], out_x, lse_x)
        out[rows], lse[:, rows] = merged.to(acc), merged_lse.to(acc)
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, plan, scale, group):
    rank, world_size = plan.rank, plan.world_size
    acc = torch.promote_types(q.dtype, torch.float32)
    halves = _ZigzagHalves(plan.cu_seqlens, plan.max_seqlen, q.shape[0]) if world_size > 1 else None
    kv_ring = _Ring(group, rank, world_size, _KV_TAGS) if world_size > 1 else None
    grad_ring = _Ring(group, rank, world_size, _GRAD_TAGS) if world_size > 1 else None
    cu, max_len = plan.cu_seqlens, plan.max_seqlen
    if halves is not None:
        back = halves.back
        dout_back, q_back, out_back, lse_back = dout[back], q[back], out[back], lse[:, back]
    resp = plan.resp_rows
    dout_r, q_r, out_r, lse_r = dout[resp], q[resp], out[resp], lse[:, resp]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    for step in range(world_size):
        if step + 1 < world_size:
            kv_ring.start(k, v)
        src = (rank - step) % world_size
        dk_b = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv_b = torch.zeros(v.shape, dtype=acc, device=v.device)
        if step == 0:
            gq, gk, gv = varlen_backward(dout, q, k, v, out, lse, cu, cu, max_len, max_len, scale, True)
            dq += gq
            dk_b += gk
            dv_b += gv
        elif src < rank:
            front = halves.front
            gq, gk, gv = varlen_backward(dout, q, k[front], v[front], out, lse, cu, halves.cu_half, max_len,
                                         halves.max_half, scale, False)
            dq += gq
            dk_b[front] += gk
            dv_b[front] += gv
        else:
            gq, gk, gv = varlen_backward(dout_back, q_back, k, v, out_back, lse_back, halves.cu_half, cu,
                                         halves.max_half, max_len, scale, False)
            dq[back] += gq
            dk_b += gk
            dv_b += gv
        if plan.has_groups:
            keys = plan.prefix_rows[src]
            gq, gk, gv = varlen_backward(dout_r, q_r, k[keys], v[keys], out_r, lse_r, plan.cu_resp,
                                         plan.cu_prefix[src], plan.max_resp, plan.max_prefix[src], scale, False)
            dq[resp] += gq
            dk_b[keys] += gk
            dv_b[keys] += gv
        if step == 0:  # the accumulators of this rank's K/V start here and go round the ring
            dk, dv = dk_b, dv_b
        else:  # the accumulators of the K/V now held, filled by the ranks that held them before
            dk, dv = grad_ring.wait("ring_shared_prefix::wait_grad")
            dk += dk_b
            dv += dv_b
        if step + 1 < world_size:
            k, v = kv_ring.wait("ring_shared_prefix::wait_kv")
        if world_size > 1:
            grad_ring.start(dk, dv)
    if world_size > 1:
        dk, dv = grad_ring.wait("ring_shared_prefix::wait_grad")  # after a full turn: this rank's K/V's
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingSharedPrefixAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, softmax_scale, group):
        out, lse = _forward(q, k, v, plan, softmax_scale, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.softmax_scale, ctx.group = plan, softmax_scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, ctx.plan, ctx.softmax_scale, ctx.group)
        return dq, dk, dv, None, None, None


def ring_shared_prefix_attn_func(q, k, v, plan: RingSharedPrefixPlan, softmax_scale=None, group=None):
    """Attention over shared-prefix groups (and plain sequences) sharded zigzag across `group`.

    q (T_local, Hq, D), k/v (T_local, Hkv, D): this rank's shard, every segment cut as
    `zigzag_shard` cuts a sequence (`plan.cu_seqlens` describes it). Returns this rank's
    shard of the output, (T_local, Hq, D) in q's dtype; differentiable in q, k, v. Every rank
    of the group calls it with its own plan of the same batch (plan.rank = its rank)."""
    group, rank, world_size = _group_rank_and_size(group)
    if (plan.rank, plan.world_size) != (rank, world_size):
        raise ValueError(f"the plan is rank {plan.rank} of {plan.world_size}, but this process is rank {rank} of "
                         f"{world_size} in the group: build it with RingSharedPrefixPlan.build(..., rank, world_size)")
    if not (q.dim() == k.dim() == v.dim() == 3) or not (q.shape[0] == k.shape[0] == v.shape[0] == plan.num_tokens):
        raise ValueError(f"ring_shared_prefix_attn_func: q, k, v must be packed (T, heads, head_dim) with the plan's "
                         f"{plan.num_tokens} local tokens; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    return RingSharedPrefixAttnFunc.apply(q, k, v, plan, scale, group)
