"""Routing metadata of the MoE grouped GEMMs, built on the device without a host sync.

The T x k (token, slot) pairs are numbered p = t * k + j. `moe_routing(topk_ids, n_experts, block_m)`
returns a `MoeRouting`:
  sorted_pairs (P,) int32   pair ids sorted by expert, stably (within an expert, in pair order)
  inverse      (P,) int32   position of pair p in sorted_pairs (sorted_pairs[inverse[p]] == p)
  expert_start, expert_end (E,) int32   each expert's row range in the sorted order
  tile_start, tile_end (E,) int32       each expert's range of block_m-row tiles
  max_tiles    int          an upper bound of the tile count from the shapes alone:
                            sum_e ceil(c_e / block_m) <= ceil(P / block_m) + E
A grouped-GEMM program number below max_tiles finds its expert on the device (`expert_tile`);
past the last tile it finds expert E and does nothing. So launch grids depend on shapes only,
and a CUDA graph can capture the whole MoE layer.

The sort is a counting sort: one Triton program per block of pairs counts its experts
(`_block_counts_kernel`), a cumulative sum over blocks gives each block its first slot per
expert, and a second pass places each pair at expert start + earlier blocks' count + its rank
among equal ids earlier in its block (`_place_pairs_kernel`). No atomics: the result is the
same on every run. On CPU without Triton the same arrays come from torch.sort(stable=True).
"""
from dataclasses import dataclass

import torch

from ._dispatch import use_triton
from ._triton import tl, triton

GPU_BLOCK_PAIRS = 128  # pairs per program of the two counting-sort passes
INTERPRET_BLOCK_PAIRS = 32


@dataclass
class MoeRouting:
    sorted_pairs: torch.Tensor
    inverse: torch.Tensor
    expert_start: torch.Tensor
    expert_end: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    block_m: int
    max_tiles: int
    top_k: int


@triton.jit
def _block_counts_kernel(ids_ptr, counts_ptr, n_pairs, n_experts,
                         E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """counts[b, e] = how many pairs of block b go to expert e."""
    block = tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=n_experts)  # padding: bin E, not stored
    experts = tl.arange(0, E_PAD)
    hits = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + block.to(tl.int64) * n_experts + experts, tl.sum(hits, axis=0), mask=experts < n_experts)


@triton.jit
def _place_pairs_kernel(ids_ptr, block_first_ptr, sorted_ptr, inverse_ptr, n_pairs, n_experts,
                        BLOCK: tl.constexpr):
    """Pair p of block b goes to block_first[b, id] + (pairs before p in the block with the same id)."""
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = block * BLOCK + local
    mask = offs < n_pairs
    ids = tl.load(ids_ptr + offs, mask=mask, other=n_experts)
    earlier = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    first = tl.load(block_first_ptr + block.to(tl.int64) * n_experts + ids, mask=mask, other=0)
    pos = first + rank
    tl.store(sorted_ptr + pos, offs, mask=mask)
    tl.store(inverse_ptr + offs, pos, mask=mask)


@triton.jit
def expert_tile(tile, tile_start_ptr, tile_end_ptr, expert_start_ptr, expert_end_ptr, n_experts,
                E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, row end) of grouped-GEMM tile `tile`; expert == n_experts past the last tile."""
    experts = tl.arange(0, E_PAD)
    ends = tl.load(tile_end_ptr + experts, mask=experts < n_experts, other=2147483647)
    expert = tl.sum((ends <= tile).to(tl.int32), axis=0)
    safe = tl.minimum(expert, n_experts - 1)
    first_tile = tl.load(tile_start_ptr + safe)
    row = tl.load(expert_start_ptr + safe) + (tile - first_tile) * BLOCK_M
    return expert, row, tl.load(expert_end_ptr + safe)


def _block_pairs(device):
    return INTERPRET_BLOCK_PAIRS if device.type == "cpu" else GPU_BLOCK_PAIRS


def _sort_triton(flat, n_experts):
    n_pairs = flat.numel()
    block = _block_pairs(flat.device)
    n_blocks = triton.cdiv(n_pairs, block)
    counts = torch.empty(n_blocks, n_experts, dtype=torch.int32, device=flat.device)
    _block_counts_kernel[(n_blocks,)](flat, counts, n_pairs, n_experts,
                                      E_PAD=triton.next_power_of_2(n_experts + 1), BLOCK=block)
    per_expert = counts.sum(0, dtype=torch.int32)
    expert_start = (per_expert.cumsum(0, dtype=torch.int32) - per_expert)
    block_first = counts.cumsum(0, dtype=torch.int32) - counts + expert_start[None, :]
    sorted_pairs = torch.empty(n_pairs, dtype=torch.int32, device=flat.device)
    inverse = torch.empty_like(sorted_pairs)
    _place_pairs_kernel[(n_blocks,)](flat, block_first.contiguous(), sorted_pairs, inverse, n_pairs, n_experts,
                                     BLOCK=block)
    return sorted_pairs, inverse, per_expert


def _sort_torch(flat, n_experts):
    order = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(flat.numel(), device=flat.device)
    per_expert = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    per_expert.index_add_(0, flat.long(), torch.ones_like(flat))
    return order.to(torch.int32), inverse.to(torch.int32), per_expert


def moe_routing(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> MoeRouting:
    """The routing metadata of topk_ids (T, k) over n_experts experts, for block_m-row tiles."""
    flat = topk_ids.reshape(-1).to(torch.int32).contiguous()
    if flat.numel() and use_triton(flat):
        sorted_pairs, inverse, per_expert = _sort_triton(flat, n_experts)
    else:
        sorted_pairs, inverse, per_expert = _sort_torch(flat, n_experts)
    expert_end = per_expert.cumsum(0, dtype=torch.int32)
    tiles = (per_expert + (block_m - 1)) // block_m
    tile_end = tiles.cumsum(0, dtype=torch.int32)
    return MoeRouting(sorted_pairs, inverse, expert_end - per_expert, expert_end, tile_end - tiles, tile_end,
                      block_m, triton.cdiv(flat.numel(), block_m) + n_experts, topk_ids.shape[-1])
