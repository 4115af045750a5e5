"""Packing gathers (round trips, against loops) and the token-budget partitioner (budget,
balance against a brute-force optimum, errors, determinism)."""
import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spell_kernels as sk
from spell_kernels.packing import DEFAULT_QUADRATIC_WEIGHT


def test_cu_seqlens_and_position_ids_against_loops():
    lengths = [3, 0, 1, 4]
    cu = sk.cu_seqlens_from_lengths(lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 4, 8]
    assert sk.position_ids_from_cu_seqlens(cu).tolist() == [p for n in lengths for p in range(n)]
    assert sk.cu_seqlens_from_lengths(torch.tensor([], dtype=torch.long)).tolist() == [0]
    with pytest.raises(ValueError, match="non-negative"):
        sk.cu_seqlens_from_lengths([2, -1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=6), st.integers(0, 2), st.integers(0, 2),
       st.sampled_from([torch.float32, torch.int64]))
def test_pack_unpack_round_trips(lengths, extra_len, n_trailing, dtype):
    max_len = max(lengths) + extra_len
    shape = (len(lengths), max_len) + (3, 2)[:n_trailing]
    padded = (torch.arange(torch.Size(shape).numel()) + 1).view(shape).to(dtype)
    real = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    padded[~real] = 0
    packed = sk.pack(padded, lengths)
    assert torch.equal(packed, torch.cat([padded[b, :n] for b, n in enumerate(lengths)]))  # loop oracle
    cu = sk.cu_seqlens_from_lengths(lengths)
    assert torch.equal(sk.unpack(packed, cu, max_len), padded)
    assert torch.equal(sk.pack(sk.unpack(packed, cu), lengths), packed)
    filled = sk.unpack(packed, cu, max_len, pad_value=-7)
    assert torch.all(filled[~real] == -7)


def test_pack_and_unpack_backpropagate():
    padded = torch.randn(2, 3, 4, requires_grad=True)
    packed = sk.pack(padded, [1, 3])
    packed.sum().backward()
    assert padded.grad[:, :, 0].tolist() == [[1, 0, 0], [1, 1, 1]]
    flat = torch.randn(4, 2, requires_grad=True)
    (sk.unpack(flat, sk.cu_seqlens_from_lengths([1, 3]), 5) * 2).sum().backward()
    assert torch.all(flat.grad == 2)


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match="exceeds the padded length"):
        sk.pack(torch.zeros(2, 3), [1, 4])
    with pytest.raises(ValueError, match="does not fit max_len"):
        sk.unpack(torch.zeros(5), sk.cu_seqlens_from_lengths([1, 4]), 3)
    with pytest.raises(ValueError, match="packed has 4 tokens"):
        sk.unpack(torch.zeros(4), sk.cu_seqlens_from_lengths([1, 4]), 4)


def _cost(length):
    return length + DEFAULT_QUADRATIC_WEIGHT * length * length


def _brute_force(lengths, budget):
    """Fewest micro-batches, and the smallest possible largest cost with that many."""
    n = len(lengths)
    for k in range(1, n + 1):
        best = None
        for assign in itertools.product(range(k), repeat=n):
            if assign[0] != 0:
                continue  # bins are interchangeable
            tokens, costs = [0] * k, [0.0] * k
            for i, b in enumerate(assign):
                tokens[b] += lengths[i]
                costs[b] += _cost(lengths[i])
            if max(tokens) <= budget and (best is None or max(costs) < best):
                best = max(costs)
        if best is not None:
            return k, best


def _check_partition(parts, lengths, budget):
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= budget for p in parts)


@pytest.mark.parametrize("seed", range(60))
def test_partition_against_brute_force(seed):
    rnd = random.Random(seed)
    budget = rnd.choice([1000, 4096, 8192])
    lengths = [rnd.randint(0, budget) for _ in range(rnd.randint(1, 6))]
    parts = sk.partition_by_token_budget(lengths, budget)
    _check_partition(parts, lengths, budget)
    k, best = _brute_force(lengths, budget)
    assert len(parts) == k
    assert max(sum(_cost(lengths[i]) for i in p) for p in parts) <= 1.05 * best + 1e-9


def test_partition_balances_when_lengths_allow():
    rnd = random.Random(0)
    lengths = [rnd.randint(50, 4000) for _ in range(512)]
    budget = 65536
    parts = sk.partition_by_token_budget(lengths, budget)
    _check_partition(parts, lengths, budget)
    assert len(parts) == -(-sum(lengths) // budget)
    costs = [sum(_cost(lengths[i]) for i in p) for p in parts]
    assert max(costs) <= 1.02 * min(costs)
    assert parts == sk.partition_by_token_budget(list(lengths), budget)  # deterministic


def test_partition_min_microbatches_and_quadratic_weight():
    lengths = [1000, 1000, 10, 10, 10, 10]
    parts = sk.partition_by_token_budget(lengths, 5000, quadratic_weight=0.0, min_microbatches=2)
    _check_partition(parts, lengths, 5000)
    assert sorted(sum(lengths[i] for i in p) for p in parts) == [1020, 1020]
    parts = sk.partition_by_token_budget([5, 5], 100, min_microbatches=3)
    assert len(parts) == 3 and sorted(map(len, parts)) == [0, 1, 1]
    assert sk.partition_by_token_budget([], 100) == []


def test_partition_rejects_a_sequence_over_the_budget():
    with pytest.raises(ValueError, match=r"sequence 2 has 9000 tokens, more than the token budget of 8192"):
        sk.partition_by_token_budget([10, 20, 9000], 8192)
