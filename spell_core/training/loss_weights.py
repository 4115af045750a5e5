"""How much each response token of a step weighs in the loss (`--loss-agg`; docs/fidelity.md).

The loss is sum_t w_t loss_t over every response token of the step, one optimizer step:
  token-mean            w_t = 1 / (all response tokens of the step)
  seq-mean-token-mean   w_t = 1 / (trajectories × tokens of t's response)
  released              the released trainer's micro-batches, rebuilt here whatever our own
                        --micro-batch-tokens: the step's sequences (prompt + response, each
                        its own row: verl packs no shared prefix) split into
                        k = min(B, ceil(total tokens / 32000)) micro-batches balanced by tokens
                        (longest first into the lightest; verl uses Karmarkar-Karp), each
                        micro-batch a token-mean scaled by its share of the sequences:
                        w_t = (sequences in t's micro-batch / B) / (response tokens in it).
With 16k-token documents a released micro-batch holds one to three long sequences, so the
weighting is close to a per-sequence mean, while many short verifier sequences share one
micro-batch; on small runs (CPU defaults) every sequence fits one micro-batch and it is the
token-mean. Each mode's weights sum to 1.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "released")
RELEASED_MAX_TOKEN_LEN = 32000  # the released scripts' ppo_max_token_len_per_gpu


def released_micro_batches(lengths: Sequence[int], max_token_len: int = RELEASED_MAX_TOKEN_LEN) -> list[list[int]]:
    """Indices of the sequences in each of the released trainer's micro-batches."""
    if not lengths:
        return []
    k = min(len(lengths), math.ceil(sum(lengths) / max_token_len))
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return [sorted(b) for b in bins if b]


def trajectory_token_weights(prompt_lengths: Sequence[int], response_lengths: Sequence[int], mode: str,
                             max_token_len: int = RELEASED_MAX_TOKEN_LEN) -> list[float]:
    """w_t of every token of each trajectory's response (one number per trajectory)."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"--loss-agg {mode!r}: expected one of {', '.join(LOSS_AGG_MODES)}")
    trained = [i for i, r in enumerate(response_lengths) if r > 0]
    weights = [0.0] * len(response_lengths)
    if not trained:
        return weights
    if mode == "token-mean":
        total = sum(response_lengths[i] for i in trained)
        return [1.0 / total if r > 0 else 0.0 for r in response_lengths]
    if mode == "seq-mean-token-mean":
        return [1.0 / (len(trained) * r) if r > 0 else 0.0 for r in response_lengths]
    lengths = [prompt_lengths[i] + response_lengths[i] for i in trained]
    for part in released_micro_batches(lengths, max_token_len):
        members = [trained[j] for j in part]
        tokens = sum(response_lengths[i] for i in members)
        for i in members:
            weights[i] = (len(members) / len(trained)) / tokens
    return weights


def role_shares(roles: Sequence[str], response_lengths: Sequence[int], weights: Sequence[float]) -> dict[str, float]:
    """Each role's share of the summed token weight (its share of the gradient's scale)."""
    shares: dict[str, float] = {}
    for role, r, w in zip(roles, response_lengths, weights):
        shares[role] = shares.get(role, 0.0) + r * w
    total = sum(shares.values()) or 1.0
    return {role: v / total for role, v in shares.items()}
