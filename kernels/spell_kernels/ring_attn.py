"""Ring attention (context parallel) over a torch.distributed process group, zigzag sharded.

Every rank of a group of R ranks holds a shard of every packed sequence: the sequence is cut
into 2R equal chunks and rank r holds chunks r and 2R-1-r, in that order. Each sequence's
global length must therefore be a multiple of 2R (`zigzag_pad` pads it; with causal attention
trailing pad tokens change no real token's output). `cu_seqlens` and `max_seqlen` passed to
`ring_flash_attn_varlen_func` describe the local shard: each sequence's global length / R.

K/V travel once around the ring (torch.distributed.batch_isend_irecv), each step's transfer
overlapped with the attention of the block already held; block results are merged by
log-sum-exp in fp32 (fp64 for fp64 inputs). The backward sends K/V around again and passes the
dK/dV accumulators (same precision) around a second ring, so that each rank ends with the
gradients of its own K/V.

With causal attention the zigzag layout balances the work: at step s rank r holds the K/V of
rank src = r - s (mod R) and computes
  s = 0      the diagonal block, causal (its local causal mask is the global one);
  src < r    all local queries against the first half of the keys (chunk src): chunk
             2R-1-src lies after both query chunks;
  src > r    the second half of the queries (chunk 2R-1-r) against all keys: chunk r
             lies before both key chunks.
Block attention runs through spell_kernels.flash_attn's varlen_forward / varlen_backward.

The sharding helpers (zigzag_pad, zigzag_unpad, zigzag_cu_seqlens, zigzag_shard,
zigzag_unshard) work on packed tensors whose first dimension is the token.
"""
import math

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .flash_attn import varlen_backward, varlen_forward
from .lse_merge import merge_attn_states

_KV_TAGS = (0, 1)
_GRAD_TAGS = (2, 3)  # distinct from the K/V ring's: both rings are in flight at once in backward


class _Ring:
    """Sends tensors to the next rank of the group while receiving the previous rank's."""

    def __init__(self, group, rank, world_size, tags):
        self.group = group
        self.next_rank = dist.get_global_rank(group, (rank + 1) % world_size)
        self.prev_rank = dist.get_global_rank(group, (rank - 1) % world_size)
        self.tags = tags
        self._works, self._in_flight, self._received = [], (), ()

    def start(self, *tensors):
        self._in_flight = tuple(t.contiguous() for t in tensors)  # kept alive until wait()
        self._received = tuple(torch.empty_like(t) for t in self._in_flight)
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, tag)
               for t, tag in zip(self._in_flight, self.tags)]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag)
                for t, tag in zip(self._received, self.tags)]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self, label):
        with record_function(label):
            for work in self._works:
                work.wait()
        received = self._received
        self._works, self._in_flight, self._received = [], (), ()
        return received


class _ZigzagHalves:
    """Front and back halves (chunk r and chunk 2R-1-r) of every local sequence.

    `front`/`back` index dimension 0 of packed tensors: slices for one sequence (views, no
    copy), index tensors otherwise. Built without a host-device synchronisation."""

    def __init__(self, cu_seqlens, max_seqlen, total):
        self.cu_half = cu_seqlens // 2
        self.max_half = max_seqlen // 2
        if cu_seqlens.numel() == 2:
            self.front, self.back = slice(0, total // 2), slice(total // 2, total)
            return
        half_lengths = (self.cu_half[1:] - self.cu_half[:-1]).long()
        device = cu_seqlens.device
        seq = torch.repeat_interleave(torch.arange(half_lengths.numel(), device=device), half_lengths,
                                      output_size=total // 2)
        self.front = cu_seqlens.long()[seq] + torch.arange(total // 2, device=device) - self.cu_half.long()[seq]
        self.back = self.front + half_lengths[seq]


def _group_rank_and_size(group):
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1  # no process group: a ring of one
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("ring_flash_attn_varlen_func: this process is not a member of `group`")
    return group, rank, dist.get_world_size(group)


def _ring_forward(q, k, v, cu_seqlens, max_seqlen, halves, scale, causal, group, rank, world_size):
    if world_size == 1:
        return varlen_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale, causal)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    ring = _Ring(group, rank, world_size, _KV_TAGS)
    q_back = q[halves.back] if causal else None
    for step in range(world_size):
        if step + 1 < world_size:
            ring.start(k, v)
        src = (rank - step) % world_size
        with record_function("ring_attn::block_forward"):
            back_rows_only = False
            if step == 0 or not causal:
                out_b, lse_b = varlen_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                              scale, causal)
            elif src < rank:
                out_b, lse_b = varlen_forward(q, k[halves.front], v[halves.front], cu_seqlens, halves.cu_half,
                                              max_seqlen, halves.max_half, scale, False)
            else:
                out_b, lse_b = varlen_forward(q_back, k, v, halves.cu_half, cu_seqlens, halves.max_half,
                                              max_seqlen, scale, False)
                back_rows_only = True
            if step == 0:
                out, lse = out_b.to(acc_dtype), lse_b.to(acc_dtype)
            elif back_rows_only:
                back = halves.back
                out_m, lse_m = merge_attn_states(out[back], lse[:, back], out_b, lse_b)
                out[back], lse[:, back] = out_m.to(acc_dtype), lse_m.to(acc_dtype)
            else:
                out, lse = (t.to(acc_dtype) for t in merge_attn_states(out, lse, out_b, lse_b))
        if step + 1 < world_size:
            k, v = ring.wait("ring_attn::wait_kv")
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, halves, scale, causal, group, rank,
                   world_size):
    if world_size == 1:
        return varlen_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale,
                               causal)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    kv_ring = _Ring(group, rank, world_size, _KV_TAGS)
    grad_ring = _Ring(group, rank, world_size, _GRAD_TAGS)
    if causal:
        back = halves.back
        dout_back, q_back, out_back, lse_back = dout[back], q[back], out[back], lse[:, back]
    for step in range(world_size):
        if step + 1 < world_size:
            kv_ring.start(k, v)
        src = (rank - step) % world_size
        with record_function("ring_attn::block_backward"):
            if step == 0 or not causal:
                dq_b, dk_b, dv_b = varlen_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen,
                                                   max_seqlen, scale, causal)
                q_rows, kv_rows = slice(None), slice(None)
            elif src < rank:
                front = halves.front
                dq_b, dk_b, dv_b = varlen_backward(dout, q, k[front], v[front], out, lse, cu_seqlens,
                                                   halves.cu_half, max_seqlen, halves.max_half, scale, False)
                q_rows, kv_rows = slice(None), front
            else:
                dq_b, dk_b, dv_b = varlen_backward(dout_back, q_back, k, v, out_back, lse_back, halves.cu_half,
                                                   cu_seqlens, halves.max_half, max_seqlen, scale, False)
                q_rows, kv_rows = halves.back, slice(None)
            if step == 0:
                dq = dq_b.to(acc_dtype)
            else:
                dq[q_rows] += dq_b
        if step == 0:  # the accumulators of this rank's K/V start here and go round the ring
            dk, dv = dk_b.to(acc_dtype), dv_b.to(acc_dtype)
        else:  # the accumulators of the K/V now held, filled by the ranks that held them before
            dk, dv = grad_ring.wait("ring_attn::wait_grad")
            dk[kv_rows] += dk_b
            dv[kv_rows] += dv_b
        if step + 1 < world_size:
            k, v = kv_ring.wait("ring_attn::wait_kv")
        grad_ring.start(dk, dv)
    dk, dv = grad_ring.wait("ring_attn::wait_grad")  # after a full turn: the gradients of this rank's K/V
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingFlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, group, rank, world_size):
        halves = _ZigzagHalves(cu_seqlens, max_seqlen, q.shape[0]) if world_size > 1 else None
        out, lse = _ring_forward(q, k, v, cu_seqlens, max_seqlen, halves, softmax_scale, causal, group, rank,
                                 world_size)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.halves, ctx.max_seqlen, ctx.softmax_scale, ctx.causal = halves, max_seqlen, softmax_scale, causal
        ctx.group, ctx.rank, ctx.world_size = group, rank, world_size
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.halves,
                                    ctx.softmax_scale, ctx.causal, ctx.group, ctx.rank, ctx.world_size)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, world_size):
    name = "ring_flash_attn_varlen_func"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: q, k, v must be packed (total_tokens, heads, head_dim); "
                         f"got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{name}: q, k, v must hold the same tokens (self-attention over one packed "
                         f"batch); got {q.shape[0]}, {k.shape[0]}, {v.shape[0]} tokens")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: k and v need the same number of heads, dividing q's; got q {q.shape[1]}, "
                         f"k {k.shape[1]}, v {v.shape[1]} heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{name}: q and k need the same head_dim; got {q.shape[2]} and {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"{name}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise TypeError(f"{name}: cu_seqlens must be a 1-D int32 tensor of length batch+1; got "
                        f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name}: cu_seqlens must be on q's device ({q.device}); got {cu_seqlens.device}")
    if cu_seqlens.device.type == "cpu":  # on a GPU these checks would cost a host-device sync
        _check_lengths(cu_seqlens.tolist(), q.shape[0], max_seqlen, world_size)


def _check_lengths(cu, total, max_seqlen, world_size):
    name = "ring_flash_attn_varlen_func"
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lengths) < 0:
        raise ValueError(f"{name}: cu_seqlens must rise from 0 to the number of local tokens ({total}); "
                         f"got {cu[:4]}{'...' if len(cu) > 4 else ''}{cu[-1:]}")
    odd = [i for i, n in enumerate(lengths) if n % 2]
    if odd and world_size > 1:
        raise ValueError(f"{name}: local sequence {odd[0]} has odd length {lengths[odd[0]]}; every sequence's "
                         "global length must be a multiple of 2 x world_size (pad with zigzag_pad) and "
                         "cu_seqlens must describe the local zigzag shard (zigzag_cu_seqlens)")
    if max_seqlen < max(lengths):
        raise ValueError(f"{name}: max_seqlen ({max_seqlen}) is below the longest local sequence ({max(lengths)})")


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=True, group=None):
    """Attention over sequences sharded zigzag across the ranks of `group`.

    q (total_local, Hq, D), k/v (total_local, Hkv, D) with Hq a multiple of Hkv (GQA): this
    rank's zigzag shard of a packed batch (see the module docstring and `zigzag_shard`).
    cu_seqlens int32 (batch+1,) on q's device and max_seqlen describe the local shard
    (`zigzag_cu_seqlens`). group=None uses the default process group; without an
    initialised one the call is plain varlen attention (a ring of one). Returns this rank's
    shard of the output, (total_local, Hq, D) in q's dtype; differentiable in q, k, v.
    Every rank of the group must call it with the same sequences and shapes. The values of
    cu_seqlens are checked on CPU only (on a GPU the check would synchronise).
    """
    group, rank, world_size = _group_rank_and_size(group)
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, world_size)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    return RingFlashAttnVarlenFunc.apply(q, k, v, cu_seqlens, int(max_seqlen), scale, bool(causal), group, rank,
                                         world_size)


# ---- zigzag sharding helpers --------------------------------------------------------------

def _lengths(cu_seqlens):
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def _check_divisible(cu_seqlens, world_size):
    lengths = _lengths(cu_seqlens)
    bad = torch.nonzero(lengths % (2 * world_size)).flatten().tolist()
    if bad:
        raise ValueError(f"sequence {bad[0]} has length {int(lengths[bad[0]])}, not a multiple of "
                         f"2 x world_size = {2 * world_size}; pad the batch first with zigzag_pad")


def _zigzag_token_index(cu_seqlens, rank, world_size):
    """Positions in the global packed batch of rank `rank`'s zigzag shard, in local order."""
    lengths = _lengths(cu_seqlens)
    chunk = lengths // (2 * world_size)
    local_lengths = 2 * chunk
    total = int(local_lengths.sum())
    device = cu_seqlens.device
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), local_lengths, output_size=total)
    local_starts = torch.cumsum(local_lengths, 0) - local_lengths
    pos = torch.arange(total, device=device) - local_starts[seq]  # position within the local shard
    c = chunk[seq]
    offset = torch.where(pos < c, rank * c + pos, (2 * world_size - 1 - rank) * c + (pos - c))
    return cu_seqlens[:-1].long()[seq] + offset


def zigzag_cu_seqlens(cu_seqlens_global, world_size):
    """(cu_seqlens, max_seqlen) of every rank's local shard: each global length / world_size."""
    _check_divisible(cu_seqlens_global, world_size)
    cu_local = (cu_seqlens_global // world_size).to(torch.int32)
    return cu_local, int(_lengths(cu_local).max()) if cu_local.numel() > 1 else 0


def zigzag_shard(x_packed, cu_seqlens_global, rank, world_size):
    """Rank `rank`'s zigzag shard of a packed batch: chunks rank and 2R-1-rank of every sequence.

    x_packed (total_tokens, ...) with every sequence's length a multiple of 2 x world_size.
    """
    _check_divisible(cu_seqlens_global, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    index = _zigzag_token_index(cu_seqlens_global.to(x_packed.device), rank, world_size)
    return x_packed.index_select(0, index)


def zigzag_unshard(x_local, cu_seqlens_global, group=None):
    """The whole packed batch from every rank's zigzag shard (all_gather over `group`).

    Every rank gets the full (total_tokens, ...) tensor. Not differentiable."""
    group, rank, world_size = _group_rank_and_size(group)
    _check_divisible(cu_seqlens_global, world_size)
    shards = [torch.empty_like(x_local) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(shards, x_local.contiguous(), group=group)
    else:
        shards = [x_local]
    cu = cu_seqlens_global.to(x_local.device)
    index = torch.cat([_zigzag_token_index(cu, r, world_size) for r in range(world_size)])
    out = x_local.new_empty((int(cu[-1]),) + tuple(x_local.shape[1:]))
    return out.index_copy_(0, index, torch.cat(shards))


def zigzag_pad(x_packed, cu_seqlens, world_size, value=0):
    """Pad every sequence at its end to a multiple of 2 x world_size tokens.

    Returns (x_padded, cu_seqlens_padded). With causal attention the pad tokens (last in
    their sequence) change no real token's output; mask them out of losses. With
    non-causal attention they would be attended to: use lengths that need no padding."""
    multiple = 2 * world_size
    lengths = _lengths(cu_seqlens)
    padded = (lengths + multiple - 1) // multiple * multiple
    cu_padded = torch.zeros_like(cu_seqlens)
    cu_padded[1:] = torch.cumsum(padded, 0).to(cu_seqlens.dtype)
    total = int(cu_padded[-1])
    x_padded = x_packed.new_full((total,) + tuple(x_packed.shape[1:]), value)
    index = _real_token_index(cu_seqlens, cu_padded).to(x_packed.device)
    return x_padded.index_copy_(0, index, x_packed), cu_padded


def zigzag_unpad(x_padded, cu_seqlens_padded, cu_seqlens):
    """Inverse of zigzag_pad: drop the pad tokens, back to the layout of `cu_seqlens`."""
    index = _real_token_index(cu_seqlens, cu_seqlens_padded).to(x_padded.device)
    return x_padded.index_select(0, index)


def _real_token_index(cu_seqlens, cu_padded):
    lengths = _lengths(cu_seqlens)
    total = int(lengths.sum())
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                  output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return cu_padded[:-1].long()[seq] + pos
