"""Sequence packing: padded (B, L, ...) <-> packed (T, ...), cu_seqlens, position ids, and a
token-budget partitioner that balances micro-batches.

Sequences are right-padded: sequence b occupies positions 0 .. lengths[b] - 1 of row b.
The gathers are index_select / index_copy, so they run on any device and back-propagate.
"""
import math

import numpy as np
import torch

# cost(len) = len + c * len^2. Per token and layer a dense decoder spends ~24 d^2 FLOPs in
# its linear layers; causal attention over a sequence of len tokens ~2 d len^2 in total, so
# c = 1 / (12 d). The default is for d_model = 576 (the embedded default model).
DEFAULT_QUADRATIC_WEIGHT = 1.0 / (12 * 576)


def cu_seqlens_from_lengths(lengths):
    """Cumulative sequence starts, int32 (B+1,), starting at 0 (flash-attn's varlen layout)."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or bool((lengths < 0).any()):
        raise ValueError(f"lengths must be a 1-D list of non-negative integers, got {lengths.tolist()}")
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    return cu


def position_ids_from_cu_seqlens(cu_seqlens):
    """Position of each packed token inside its own sequence, int64 (T,): 0, 1, .. per sequence."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def _flat_token_index(lengths, row_len):
    """Index of every real token in the flattened (B * row_len) padded layout."""
    cu = cu_seqlens_from_lengths(lengths).long()
    positions = position_ids_from_cu_seqlens(cu)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), cu[1:] - cu[:-1],
                                   output_size=positions.shape[0])
    return rows * row_len + positions


def pack(padded, lengths):
    """(B, L, ...) right-padded -> (T, ...) with T = sum(lengths), sequences back to back."""
    lengths = torch.as_tensor(lengths, device=padded.device)
    if padded.dim() < 2 or lengths.shape != (padded.shape[0],):
        raise ValueError(f"padded must be (B, L, ...) with one length per row: got padded "
                         f"{tuple(padded.shape)}, lengths {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.max()) > padded.shape[1]:
        raise ValueError(f"a length ({int(lengths.max())}) exceeds the padded length L = {padded.shape[1]}")
    index = _flat_token_index(lengths, padded.shape[1])
    return padded.flatten(0, 1).index_select(0, index)


def unpack(packed, cu_seqlens, max_len=None, pad_value=0):
    """(T, ...) packed -> (B, max_len, ...) right-padded with pad_value. max_len defaults to
    the longest sequence."""
    cu = cu_seqlens.long().to(packed.device)
    lengths = cu[1:] - cu[:-1]
    if int(cu[-1]) != packed.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but packed has {packed.shape[0]} tokens")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    if longest > max_len:
        raise ValueError(f"a sequence of {longest} tokens does not fit max_len = {max_len}")
    batch = lengths.shape[0]
    out = packed.new_full((batch * max_len,) + tuple(packed.shape[1:]), pad_value)
    out = out.index_copy(0, _flat_token_index(lengths, max_len), packed)
    return out.view((batch, max_len) + tuple(packed.shape[1:]))


def partition_by_token_budget(lengths, budget, quadratic_weight=DEFAULT_QUADRATIC_WEIGHT, min_microbatches=1):
    """Split sequences into micro-batches of at most `budget` tokens each, balanced by cost.

    lengths: token count per sequence (list or 1-D tensor). Returns a list of micro-batches,
    each a sorted list of sequence indices. Uses the fewest micro-batches that a greedy
    placement finds (at least min_microbatches, e.g. to give every data-parallel rank the
    same count; some may then be empty), then moves and swaps sequences between
    micro-batches while that brings their costs closer, cost(len) = len + quadratic_weight
    * len^2 (attention's share; see DEFAULT_QUADRATIC_WEIGHT). Deterministic.
    """
    lengths = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if not budget >= 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"sequence {i} has a negative length ({length})")
        if length > budget:
            raise ValueError(f"sequence {i} has {length} tokens, more than the token budget of {budget} per "
                             f"micro-batch: raise the budget or shorten that sequence before packing")
    if not lengths:
        return [[] for _ in range(min_microbatches)] if min_microbatches > 1 else []
    tokens = np.array(lengths, dtype=np.int64)
    cost = tokens + quadratic_weight * tokens.astype(np.float64) ** 2
    n_bins = max(min_microbatches, math.ceil(tokens.sum() / budget))
    while True:
        bins = _greedy(tokens, cost, budget, n_bins)
        if bins is not None:
            break
        n_bins += 1
    _rebalance(bins, tokens, cost, budget)
    return sorted((sorted(b) for b in bins), key=lambda b: (not b, b[0] if b else 0))


def _greedy(tokens, cost, budget, n_bins):
    """Longest-processing-time placement (each sequence, by falling cost, into the cheapest
    micro-batch with room); if the budget stops it, first-fit-decreasing by tokens. None if
    neither fits everything into n_bins."""
    by_cost = sorted(range(len(tokens)), key=lambda i: (-cost[i], i))
    bins, bin_tokens, bin_cost = [[] for _ in range(n_bins)], [0] * n_bins, [0.0] * n_bins
    for i in by_cost:
        fits = [b for b in range(n_bins) if bin_tokens[b] + tokens[i] <= budget]
        if not fits:
            break
        b = min(fits, key=lambda b: (bin_cost[b], b))
        bins[b].append(i)
        bin_tokens[b] += tokens[i]
        bin_cost[b] += cost[i]
    else:
        return bins
    bins, bin_tokens = [[] for _ in range(n_bins)], [0] * n_bins
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        b = next((b for b in range(n_bins) if bin_tokens[b] + tokens[i] <= budget), None)
        if b is None:
            return None
        bins[b].append(i)
        bin_tokens[b] += tokens[i]
    return bins


def _rebalance(bins, tokens, cost, budget, max_rounds=2000):
    """Local search: take the costliest micro-batch (then the cheapest) and the single move
    or swap with another micro-batch, widest cost gap first, that best halves their gap
    within the budget. Each accepted step lowers the sum of squared costs, so it ends."""
    bin_cost = [float(cost[b].sum()) if b else 0.0 for b in bins]
    bin_tokens = [int(tokens[b].sum()) if b else 0 for b in bins]
    tol = 1e-9 * max(sum(bin_cost), 1.0)
    for _ in range(max_rounds):
        order = sorted(range(len(bins)), key=lambda b: (bin_cost[b], b))  # cheapest first
        pairs = [(order[-1], lo) for lo in order[:-1]] + [(hi, order[0]) for hi in reversed(order[1:-1])]
        for hi, lo in pairs:
            gap = bin_cost[hi] - bin_cost[lo]
            if gap <= tol:
                continue
            step = _best_exchange(bins[hi], bins[lo], tokens, cost, gap, tol,
                                  budget - bin_tokens[hi], budget - bin_tokens[lo])
            if step is None:
                continue
            give, take = step
            moved = [give] if take is None else [give, take]
            d_cost = cost[give] - (cost[take] if take is not None else 0.0)
            d_tokens = int(tokens[give]) - (int(tokens[take]) if take is not None else 0)
            bins[hi] = [i for i in bins[hi] if i not in moved] + ([take] if take is not None else [])
            bins[lo] = [i for i in bins[lo] if i not in moved] + [give]
            bin_cost[hi] -= d_cost
            bin_cost[lo] += d_cost
            bin_tokens[hi] -= d_tokens
            bin_tokens[lo] += d_tokens
            break
        else:
            return


def _best_exchange(hi_items, lo_items, tokens, cost, gap, tol, hi_room, lo_room):
    """(give, take): move `give` from the costlier micro-batch to the cheaper one and `take`
    (or None: a plain move) back, shifting cost d = cost[give] - cost[take] with 0 < d < gap
    and d as close to gap / 2 as possible; None if no exchange narrows the gap."""
    if not hi_items:
        return None
    give = np.array(hi_items)
    take = np.array(lo_items + [-1])  # -1: take nothing back
    take_cost = np.where(take >= 0, cost[take], 0.0)
    take_tokens = np.where(take >= 0, tokens[take], 0)
    shift = cost[give][:, None] - take_cost[None, :]
    token_shift = tokens[give][:, None] - take_tokens[None, :]
    ok = (shift > tol) & (shift < gap - tol) & (token_shift <= lo_room) & (-token_shift <= hi_room)
    if not ok.any():
        return None
    badness = np.where(ok, np.abs(shift - gap / 2), np.inf)
    g, t = np.unravel_index(int(np.argmin(badness)), badness.shape)  # first minimum: deterministic
    return int(give[g]), (int(take[t]) if take[t] >= 0 else None)
