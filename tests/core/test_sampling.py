"""Token selection (spell_core.sampling.token_selection) against hand-built distributions and transformers'
logits warpers: which tokens top-k / top-p keep, greedy, the log-probs reported, seeded
draws, and a chi-square test of the empirical frequencies."""
import hashlib
import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from spell_core.sampling.token_selection import check_sampling_params, draw_uniforms, make_generators, sample_seed, \
    select_tokens, temperature_scale, token_logprobs, truncation_mask

# chi-square critical values at significance 0.001 (tables of the chi-square distribution)
CHI2_CRITICAL_0_001 = {2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def kept(mask_row) -> set[int]:
    return set(torch.nonzero(mask_row).flatten().tolist())


def hf_kept(logits, top_k=0, top_p=1.0) -> list[set[int]]:
    """Tokens left finite by transformers' warpers (top-k, then top-p), per row."""
    scores = logits.clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return [kept(torch.isfinite(row)) for row in scores]


def test_top_k_keeps_the_k_largest_and_ties_at_the_boundary():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0, 0.0],
                           [2.0, -1.0, 2.0, 0.5, 2.0, 3.0]])  # ties: 2.0 three times at rank 2-4
    mask = truncation_mask(logits, top_k=3, top_p=1.0)
    assert kept(mask[0]) == {1, 3, 4}
    assert kept(mask[1]) == {0, 2, 4, 5}  # all tokens tied with the k-th are kept
    assert [kept(m) for m in mask] == hf_kept(logits, top_k=3)
    assert truncation_mask(logits, top_k=0, top_p=1.0) is None
    assert truncation_mask(logits, top_k=6, top_p=1.0) is None  # k >= vocab: nothing removed


@pytest.mark.parametrize("top_p, expected", [(0.45, {2}), (0.55, {2, 0}), (0.75, {2, 0}), (0.81, {2, 0, 3}),
                                             (0.99, {2, 0, 3, 1}), (1.0, None)])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, expected):
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15]], dtype=torch.float64)  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log().float()
    mask = truncation_mask(logits, top_k=0, top_p=top_p)
    if expected is None:
        assert mask is None
        return
    assert kept(mask[0]) == expected
    assert [kept(mask[0])] == hf_kept(logits, top_p=top_p)


def reference_top_p(logits_row, top_p) -> set[int]:
    """float64 oracle: most likely tokens first, keep each while the mass before it is < top_p.
    Asserts that no token sits within 1e-6 of the boundary, where rounding could decide."""
    p = torch.softmax(logits_row.double(), -1)
    order = torch.argsort(p, descending=True)
    mass_before = torch.cumsum(p[order], 0) - p[order]
    assert (mass_before - top_p).abs().min() > 1e-6, "ambiguous case: pick another seed"
    return set(order[mass_before < top_p].tolist())


def test_top_p_on_a_large_flat_vocabulary():
    """Thousands of tokens needed to reach top_p: exercises the widening candidate search."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5000, generator=g) * 0.05
    logits[1, 17] = 12.0  # one dominant token: a single survivor
    for top_p in (0.3, 0.9):
        mask = truncation_mask(logits, top_k=0, top_p=top_p)
        assert [kept(m) for m in mask] == [reference_top_p(row, top_p) for row in logits]
    assert kept(truncation_mask(logits, 0, 0.9)[1]) == {17}
    assert len(kept(truncation_mask(logits, 0, 0.9)[0])) > 4000


def test_top_k_then_top_p_renormalises_over_the_top_k():
    # top-2 of (0.4, 0.35, 0.25) renormalised: 0.533, 0.467; top_p 0.5 keeps the first only,
    # while top_p 0.5 on the full distribution would keep two (0.4 < 0.5)
    logits = torch.tensor([[0.35, 0.4, 0.25]]).log()
    assert kept(truncation_mask(logits, 0, 0.5)[0]) == {0, 1}
    assert kept(truncation_mask(logits, 2, 0.5)[0]) == {1}
    assert [kept(truncation_mask(logits, 2, 0.5)[0])] == hf_kept(logits, top_k=2, top_p=0.5)


def test_sampled_tokens_stay_in_the_kept_set_and_cover_it():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0, 0.0]]).expand(400, 6)
    uniforms = (torch.arange(400, dtype=torch.float64) + 0.5) / 400  # a grid over [0, 1)
    tokens, _ = select_tokens(logits, 3, 1.0, uniforms)
    assert set(tokens.tolist()) == {1, 3, 4}
    tokens, _ = select_tokens(logits, 0, 0.8, uniforms)
    assert set(tokens.tolist()) == hf_kept(logits[:1], top_p=0.8)[0]


def test_greedy_takes_the_argmax_and_reports_temperature_one_logprobs():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 3.5, -2.0]])
    assert temperature_scale(0.0) == 1.0 and temperature_scale(0.5) == 2.0
    tokens, logprobs = select_tokens(logits * temperature_scale(0.0), 0, 1.0, None)
    assert tokens.tolist() == [1, 2]
    expected = torch.log_softmax(logits.double(), -1)[[0, 1], [1, 2]]
    assert torch.allclose(logprobs.double(), expected, atol=1e-6)
    assert logprobs.dtype == torch.float32


def test_logprobs_are_of_the_untruncated_distribution_at_the_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=g) * 2
    uniforms = torch.rand(5, generator=g, dtype=torch.float64)
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 8, 0.9)]:
        tokens, logprobs = select_tokens(logits * temperature_scale(temperature), top_k, top_p, uniforms)
        expected = torch.log_softmax(logits.double() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
        assert (logprobs.double() - expected).abs().max() <= 1e-5


def test_token_logprobs_is_the_log_softmax_at_the_token():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 300, generator=g) * 8
    tokens = torch.tensor([0, 17, 299, 150])
    expected = torch.log_softmax(z.double(), -1)[torch.arange(4), tokens]
    assert torch.allclose(token_logprobs(z, tokens).double(), expected, rtol=1e-6, atol=1e-6)  # fp32 rounding


def test_inverse_cdf_draw_picks_the_token_whose_interval_holds_the_uniform():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # cumulative 0.1 0.3 0.6 1.0
    logits = probs.log().float()[None].expand(6, 4)
    uniforms = torch.tensor([0.0, 0.05, 0.15, 0.35, 0.65, 0.999], dtype=torch.float64)
    tokens, _ = select_tokens(logits, 0, 1.0, uniforms)
    assert tokens.tolist() == [0, 0, 1, 2, 3, 3]


def test_a_token_of_probability_zero_is_never_drawn():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(200, 4)
    uniforms = torch.linspace(0, 1 - 1e-12, 200, dtype=torch.float64)
    tokens, _ = select_tokens(logits, 0, 1.0, uniforms)
    assert set(tokens.tolist()) == {0, 2}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8)])
def test_empirical_frequencies_match_the_target_distribution(temperature, top_k, top_p):
    logits = torch.tensor([0.5, -1.0, 1.2, 0.0, 2.0, -0.3])
    # target by hand: temperature, keep the top-k / top-p set, renormalise (float64)
    p = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones(6, dtype=torch.bool)
    order = torch.argsort(p, descending=True)
    if top_k:
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1:
        mass_before = torch.cumsum(p[order], 0) - p[order]
        keep[order[mass_before >= top_p]] = False
    target = torch.where(keep, p, 0.0)
    target = target / target.sum()

    draws = 20000
    generators = make_generators([sample_seed(123, 0, j) for j in range(4)])
    uniforms = torch.cat([draw_uniforms(generators) for _ in range(draws // 4)])
    tokens, _ = select_tokens((logits / temperature)[None].expand(draws, 6), top_k, top_p, uniforms)
    counts = torch.bincount(tokens, minlength=6).double()
    assert torch.all(counts[~keep] == 0)
    stat = chi_square(counts[keep], target[keep])
    df = int(keep.sum()) - 1
    assert stat < CHI2_CRITICAL_0_001[df], f"chi-square {stat:.2f} with {df} degrees of freedom"


def test_chi_square_check_can_fail():
    """The statistic and critical value reject a visibly wrong distribution."""
    counts = torch.tensor([5000.0, 5000.0, 5000.0, 5000.0])
    assert chi_square(counts, torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)) > CHI2_CRITICAL_0_001[3]


def test_sample_seed_is_the_documented_hash():
    digest = hashlib.sha256(b"spell-sampler:7:2:5").digest()
    assert sample_seed(7, 2, 5) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert len({sample_seed(7, i, j) for i in range(4) for j in range(4)}) == 16


def test_draws_depend_only_on_the_seed():
    a = draw_uniforms(make_generators([11, 12, 13]))
    b = torch.cat([draw_uniforms(make_generators([s])) for s in (11, 12, 13)])
    assert torch.equal(a, b)
    assert a.dtype == torch.float64 and bool(((a >= 0) & (a < 1)).all())
    assert not math.isclose(float(a[0]), float(a[1]))


@pytest.mark.parametrize("temperature, top_p, top_k, message", [
    (-0.1, 1.0, 0, "temperature must be a finite number >= 0"),
    (float("inf"), 1.0, 0, "temperature"),
    (1.0, 0.0, 0, r"top_p must be in \(0, 1\]"),
    (1.0, 1.5, 0, "top_p"),
    (1.0, 1.0, -1, "top_k must be an int >= 0"),
    (1.0, 1.0, 2.5, "top_k"),
])
def test_bad_sampling_parameters_are_refused(temperature, top_p, top_k, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_params(temperature, top_p, top_k)
