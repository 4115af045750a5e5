"""group_advantages against a loop over groups of the published formulas, and the token
broadcast against a loop over sequences."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spell_kernels as sk
from spell_kernels import reference


def test_hand_worked_grpo_and_dr_grpo():
    # one group: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ids = torch.tensor([5, 5, 5, 5])
    adv = sk.group_advantages(rewards, ids, "grpo", eps=1e-6)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv.tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)
    assert sk.group_advantages(rewards, ids, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5]


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "batch"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_over_groups(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (12,), generator=gen).tolist()  # includes groups of one
    ids = torch.tensor([g * 7 - 20 for g, n in enumerate(sizes) for _ in range(n)])  # non-contiguous ids
    perm = torch.randperm(len(ids), generator=gen)
    ids = ids[perm]  # interleaved, unsorted
    rewards = torch.randn(len(ids), generator=gen)
    got = sk.group_advantages(rewards, ids, mode)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference.group_advantages(rewards, ids, mode), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.0, 0.5, 1.0, -1.0])), min_size=1, max_size=30),
       st.sampled_from(["grpo", "dr_grpo"]), st.randoms(use_true_random=False))
def test_shuffling_samples_shuffles_advantages(samples, mode, rnd):
    ids = torch.tensor([s[0] for s in samples])
    rewards = torch.tensor([s[1] for s in samples])
    perm = list(range(len(samples)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    base = sk.group_advantages(rewards, ids, mode)
    assert torch.equal(sk.group_advantages(rewards[perm], ids[perm], mode), base[perm])
    torch.testing.assert_close(base.double(), reference.group_advantages(rewards, ids, mode), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "batch"])
def test_singletons_and_equal_rewards_give_exact_zero(mode):
    rewards = torch.tensor([0.1, 0.1, 0.1, 3.0, 0.7, 0.7])
    ids = torch.tensor([1, 1, 1, 2, 3, 3])  # equal rewards, a singleton, an equal pair
    adv = sk.group_advantages(rewards, ids, mode)
    assert not torch.isnan(adv).any()
    if mode == "batch":
        assert adv.abs().sum() > 0
        assert torch.all(sk.group_advantages(torch.full((5,), 0.3), None, "batch") == 0)
        assert torch.all(sk.group_advantages(torch.tensor([2.0]), None, "batch") == 0)
    else:
        assert torch.all(adv == 0)


def test_integer_rewards_and_empty_input():
    adv = sk.group_advantages(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), "dr_grpo")
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert sk.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode="):
        sk.group_advantages(torch.ones(3), torch.zeros(3), "ppo")
    with pytest.raises(ValueError, match="needs group_ids"):
        sk.group_advantages(torch.ones(3), None, "grpo")


def test_broadcast_to_tokens_packed_and_padded():
    adv = torch.tensor([0.5, -1.0, 2.0])
    lengths = [2, 0, 3]
    cu = sk.cu_seqlens_from_lengths(lengths)
    mask = torch.tensor([False, True, True, True, False])  # first token a prompt, last padding-like
    expected = []
    for a, n in zip(adv.tolist(), lengths):
        expected += [a] * n
    expected = torch.tensor(expected) * mask
    assert torch.equal(sk.broadcast_to_tokens(adv, cu, mask), expected)
    seq_ids = torch.tensor([0, 0, 2, 2, 2])
    assert torch.equal(sk.broadcast_to_tokens(adv, mask=mask, seq_ids=seq_ids), expected)
    assert torch.equal(sk.broadcast_to_tokens(adv, cu), torch.tensor([0.5, 0.5, 2.0, 2.0, 2.0]))
    padded_mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert torch.equal(sk.broadcast_to_tokens(adv, mask=padded_mask),
                       torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="cu_seqlens must have shape"):
        sk.broadcast_to_tokens(adv, cu[:-1])
