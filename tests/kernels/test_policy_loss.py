"""policy_loss: hand-worked PPO-clip numbers, aggregation modes, gradient accumulation, and
agreement with autograd through the reference."""
import math

import pytest
import torch

import spell_kernels as sk
from spell_kernels import reference


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("SPELL_KERNELS", request.param)
    return request.param


def _two_way(logit_gaps):
    """Vocabulary of 2 with an identity LM head: token n's logits are (gap_n, 0), so the
    log-prob of target 0 is -log(1 + e^-gap) by hand."""
    hidden = torch.tensor([[g, 0.0] for g in logit_gaps], dtype=torch.float64, requires_grad=True)
    weight = torch.eye(2, dtype=torch.float64)
    targets = torch.zeros(len(logit_gaps), dtype=torch.long)
    logp = [-math.log1p(math.exp(-g)) for g in logit_gaps]
    return hidden, weight, targets, logp


# ratio, advantage -> per-token loss and whether the gradient flows, worked by hand with
# clip_low = 0.2, clip_high = 0.28, dual_clip = 3:
#   r=1.5, A=+1: max(-1.5, -1.28) = -1.28, clipped high, no gradient
#   r=0.5, A=+1: max(-0.5, -0.8)  = -0.5,  unclipped, d/dlogp = -A r = -0.5
#   r=0.5, A=-1: max(0.5, 0.8)    =  0.8,  clipped low, no gradient
#   r=1.5, A=-1: max(1.5, 1.28)   =  1.5,  unclipped, d/dlogp = 1.5
#   r=5.0, A=-1: max(5, 1.28) = 5, dual clip min(5, 3) = 3, no gradient
#   r=1.1, A=+2: max(-2.2, -2.2)  = -2.2,  inside the clip range, d/dlogp = -2.2
CASES = [(1.5, 1.0, -1.28, 0.0), (0.5, 1.0, -0.5, -0.5), (0.5, -1.0, 0.8, 0.0),
         (1.5, -1.0, 1.5, 1.5), (5.0, -1.0, 3.0, 0.0), (1.1, 2.0, -2.2, -2.2)]


def test_hand_worked_clipping_on_each_side_and_dual_clip(kernel_path):
    gaps = [0.3, -1.0, 2.0, 0.0, 1.0, -0.5]
    hidden, weight, targets, logp = _two_way(gaps)
    ratios = [c[0] for c in CASES]
    old = torch.tensor([lp - math.log(r) for lp, r in zip(logp, ratios)], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in CASES], dtype=torch.float64)
    mask = torch.ones(6, dtype=torch.bool)
    loss, stats = sk.policy_loss(hidden, weight, targets, old, adv, mask, dual_clip=3.0)
    expected = (-1.28 - 0.5 + 0.8 + 1.5 + 3.0 - 2.2) / 6
    tol = 1e-12 if kernel_path == "torch" else 1e-6  # the Triton row kernels reduce in fp32
    assert loss.item() == pytest.approx(expected, rel=tol)
    loss.backward()
    # d loss / d hidden_n = (d loss / d logp_n) (onehot_0 - p_n), p_n(0) = sigmoid(gap)
    for n, (gap, case) in enumerate(zip(gaps, CASES)):
        g = case[3] / 6
        p0 = 1 / (1 + math.exp(-gap))
        assert hidden.grad[n].tolist() == pytest.approx([g * (1 - p0), g * (0 - (1 - p0))], abs=tol)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 6)
    assert stats["ratio_min"].item() == pytest.approx(0.5) and stats["ratio_max"].item() == pytest.approx(5.0)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 6)
    k3 = sum(r - 1 - math.log(r) for r in ratios) / 6  # Schulman's k3 estimator
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    assert stats["num_tokens"].item() == 6


def test_without_dual_clip_a_negative_advantage_is_unbounded():
    hidden, weight, targets, logp = _two_way([1.0])
    old = torch.tensor([logp[0] - math.log(5.0)], dtype=torch.float64)
    loss, stats = sk.policy_loss(hidden, weight, targets, old, torch.tensor([-1.0], dtype=torch.float64),
                                 torch.ones(1, dtype=torch.bool))
    assert loss.item() == pytest.approx(5.0) and "dual_clip_frac" not in stats


# ratio 1 (old_logprobs=None): per-token loss = -A. Sequences [0, 3) and [3, 4).
#   A = 1, 2, 3 | -4, all tokens: token-mean (-1-2-3+4)/4 = -0.5
#       seq-mean-token-mean ((-6)/3 + 4)/2 = 1.0, seq-mean-token-sum (-6 + 4)/2 = -1.0
#   token 1 masked out: token-mean (-1-3+4)/3 = 0, seq-mean-token-mean (-4/2 + 4)/2 = 1.0,
#       seq-mean-token-sum (-4 + 4)/2 = 0
@pytest.mark.parametrize("masked_out, expected", [
    ([], {"token-mean": -0.5, "seq-mean-token-mean": 1.0, "seq-mean-token-sum": -1.0}),
    ([1], {"token-mean": 0.0, "seq-mean-token-mean": 1.0, "seq-mean-token-sum": 0.0}),
])
def test_hand_worked_aggregation_modes(masked_out, expected):
    hidden, weight, targets, _ = _two_way([0.1, 0.2, 0.3, 0.4])
    adv = torch.tensor([1.0, 2.0, 3.0, -4.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    mask[masked_out] = False
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    for agg, value in expected.items():
        loss, stats = sk.policy_loss(hidden, weight, targets, None, adv, mask, agg=agg, cu_seqlens=cu)
        assert loss.item() == pytest.approx(value, abs=1e-12), agg
        assert stats["ratio_mean"].item() == 1.0


def test_a_sequence_with_no_trained_tokens_does_not_count():
    hidden, weight, targets, _ = _two_way([0.1, 0.2, 0.3])
    adv = torch.tensor([2.0, 5.0, 7.0], dtype=torch.float64)
    mask = torch.tensor([True, False, False])
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)  # sequence 1 has nothing to train
    loss, _ = sk.policy_loss(hidden, weight, targets, None, adv, mask, agg="seq-mean-token-mean", cu_seqlens=cu)
    assert loss.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("rows", [0, 3])  # no rows at all; rows that are all masked out
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_nothing_to_train_gives_a_zero_loss_that_backpropagates(kernel_path, rows, agg):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (rows,), generator=gen)
    old = torch.full((rows,), -3.0)
    cu = torch.tensor([0, rows], dtype=torch.int32)
    loss, stats = sk.policy_loss(hidden, weight, targets, old, torch.ones(rows), torch.zeros(rows, dtype=torch.bool),
                                 dual_clip=3.0, agg=agg, cu_seqlens=cu, global_count=4, return_entropy=True)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.shape == hidden.shape and not hidden.grad.any()
    assert weight.grad.shape == weight.shape and not weight.grad.any()
    assert stats["num_tokens"].item() == 0
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "entropy"):
        assert stats[key].item() == 0.0, key
    for key in ("ratio_mean", "ratio_min", "ratio_max"):  # documented: 1 when no token trains
        assert stats[key].item() == 1.0, key


def test_ratio_is_exactly_one_on_policy(kernel_path):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen) / 4
    targets = torch.randint(0, 300, (20,), generator=gen)
    adv = torch.randn(20, generator=gen)
    mask = torch.rand(20, generator=gen) > 0.3
    old = sk.fused_linear_logprob(hidden, weight, targets)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    loss, stats = sk.policy_loss(h1, weight, targets, old, adv, mask)
    assert stats["ratio_min"].item() == stats["ratio_max"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["clip_frac_low"].item() == stats["clip_frac_high"].item() == 0.0
    loss_none, _ = sk.policy_loss(h2, weight, targets, None, adv, mask)
    assert loss.item() == loss_none.item() == pytest.approx(-(adv[mask].sum() / mask.sum()).item(), abs=1e-6)
    loss.backward()
    loss_none.backward()
    assert torch.equal(h1.grad, h2.grad)


def _random_batch(seed, n=40, h=16, v=500, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype) / 3
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = -100
    with torch.no_grad():
        logp, _ = reference.linear_logprob(hidden, weight, targets)
    old = (logp + 0.4 * torch.randn(n, generator=gen, dtype=dtype)).to(dtype)
    adv = torch.randn(n, generator=gen, dtype=dtype)
    mask = torch.rand(n, generator=gen) > 0.25
    cu = torch.tensor([0, 7, 8, 20, 33, n], dtype=torch.int32)
    return hidden, weight, targets, old, adv, mask, cu


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_loss_and_gradients_match_autograd_through_reference(agg, dual_clip):
    hidden, weight, targets, old, adv, mask, cu = _random_batch(1)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = sk.policy_loss(h, w, targets, old, adv, mask, dual_clip=dual_clip, agg=agg, cu_seqlens=cu,
                             temperature=0.8)
    loss.backward()
    hr, wr = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, _ = reference.linear_logprob(hr, wr, targets, temperature=0.8)
    seq_ids = torch.repeat_interleave(torch.arange(5), (cu[1:] - cu[:-1]).long())
    ref_loss = reference.ppo_clip_loss(logp, old, adv, mask & (targets != -100), dual_clip=dual_clip, agg=agg,
                                       seq_ids=seq_ids)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-9, atol=1e-12)


def test_float32_triton_path_matches_reference(triton_path):
    hidden, weight, targets, old, adv, mask, cu = _random_batch(2, dtype=torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = sk.policy_loss(h, w, targets, old, adv, mask, agg="seq-mean-token-mean", cu_seqlens=cu,
                                 return_entropy=True)
    loss.backward()
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp, entropy = reference.linear_logprob(hr, wr, targets)
    seq_ids = torch.repeat_interleave(torch.arange(5), (cu[1:] - cu[:-1]).long())
    valid = mask & (targets != -100)
    ref_loss = reference.ppo_clip_loss(logp, old.double(), adv.double(), valid, agg="seq-mean-token-mean",
                                       seq_ids=seq_ids)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert stats["entropy"].item() == pytest.approx(entropy[valid].mean().item(), rel=1e-5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_equals_one_big_batch(agg):
    hidden, weight, targets, old, adv, mask, cu = _random_batch(3)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    big, _ = sk.policy_loss(h, w, targets, old, adv, mask, agg=agg, cu_seqlens=cu)
    big.backward()
    valid = mask & (targets != -100)
    if agg == "token-mean":
        count = int(valid.sum())
    else:
        count = sum(bool(valid[a:b].any()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()))
    hm, wm = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    total = 0.0
    for first, last in ((0, 2), (2, 3), (3, 5)):  # micro-batches of whole sequences
        a, b = int(cu[first]), int(cu[last])
        micro_cu = cu[first:last + 1] - cu[first]
        loss, _ = sk.policy_loss(hm[a:b], wm, targets[a:b], old[a:b], adv[a:b], mask[a:b], agg=agg,
                                 cu_seqlens=micro_cu, global_count=count)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(big.item(), rel=1e-12)
    torch.testing.assert_close(hm.grad, h.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(wm.grad, w.grad, rtol=1e-10, atol=1e-13)


def test_no_grad_gives_the_same_loss():
    hidden, weight, targets, old, adv, mask, _ = _random_batch(4)
    h = hidden.clone().requires_grad_(True)
    loss, _ = sk.policy_loss(h, weight, targets, old, adv, mask)
    with torch.no_grad():
        loss_ng, _ = sk.policy_loss(h, weight, targets, old, adv, mask)
    assert loss_ng.item() == loss.item() and not loss_ng.requires_grad


def test_bad_arguments_raise_clear_errors():
    hidden, weight, targets, old, adv, mask, _ = _random_batch(5)
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        sk.policy_loss(hidden, weight, targets, old, adv, mask, agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match="agg="):
        sk.policy_loss(hidden, weight, targets, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="advantages must have shape"):
        sk.policy_loss(hidden, weight, targets, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="dual_clip"):
        sk.policy_loss(hidden, weight, targets, old, adv, mask, dual_clip=0.5)


def test_a_scaled_loss_scales_the_gradients_and_a_second_backward_is_refused():
    hidden, weight, targets, old, adv, mask, _ = _random_batch(6)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    sk.policy_loss(h1, weight, targets, old, adv, mask)[0].backward()
    loss, _ = sk.policy_loss(h2, weight, targets, old, adv, mask)
    (loss * -2.5).backward(retain_graph=True)
    torch.testing.assert_close(h2.grad, -2.5 * h1.grad, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
