"""fused_linear_logprob against the float64 reference (materialised logits), on both the
PyTorch path and the Triton kernels (interpreted on CPU)."""
import math

import pytest
import torch

import spell_kernels as sk
from spell_kernels import logprob, reference


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("SPELL_KERNELS", request.param)
    if request.param == "triton":
        monkeypatch.setattr(logprob, "_BLOCK_V", 128)  # several vocab blocks on small vocabularies
    return request.param


def _inputs(n, h, v, scale=1.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * scale
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h)
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden.to(dtype), weight.to(dtype), targets


def _oracle(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """float64 reference on the same (rounded) inputs, and the same reference in fp32: the
    error PyTorch itself makes in fp32 sets the tolerance (flash-attn's test style)."""
    exact = reference.linear_logprob(hidden.double(), weight.double(), targets, temperature, ignore_index)
    fp32 = reference.linear_logprob(hidden.float(), weight.float(), targets, temperature, ignore_index)
    return exact, fp32


def _assert_within(out, exact, fp32, k=3.0, atol=1e-6):
    err = (out.double() - exact).abs().max().item()
    base = (fp32.double() - exact).abs().max().item()
    assert err <= k * base + atol, f"error {err:.3g} vs PyTorch fp32 error {base:.3g}"


def _grads(fn, hidden, weight, g_logp, g_entropy):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, entropy = fn(h, w)
    ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    return h.grad, w.grad


def _assert_rel(got, want, rtol):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_forward_matches_float64_reference(kernel_path, temperature):
    hidden, weight, targets = _inputs(13, 24, 1000, scale=2.0)
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, temperature, return_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (13,)
    (ref_logp, ref_ent), (f32_logp, f32_ent) = _oracle(hidden, weight, targets, temperature)
    _assert_within(logp, ref_logp, f32_logp)
    _assert_within(entropy, ref_ent, f32_ent)
    assert torch.equal(sk.fused_linear_logprob(hidden, weight, targets, temperature), logp)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_match_autograd_through_reference(kernel_path, temperature):
    hidden, weight, targets = _inputs(11, 16, 700, scale=1.5, seed=1)
    gen = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(11, generator=gen), torch.randn(11, generator=gen)
    got = _grads(lambda h, w: sk.fused_linear_logprob(h, w, targets, temperature, return_entropy=True),
                 hidden, weight, g_logp, g_ent)
    want = _grads(lambda h, w: reference.linear_logprob(h, w, targets, temperature),
                  hidden.double(), weight.double(), g_logp.double(), g_ent.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        _assert_rel(a, b, 1e-5)


def test_gradient_of_one_output_alone(kernel_path):
    hidden, weight, targets = _inputs(7, 8, 300, seed=3)
    g = torch.randn(7, generator=torch.Generator().manual_seed(4))
    for use in ("logp", "entropy"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        logp, entropy = sk.fused_linear_logprob(h, w, targets, return_entropy=True)
        ((logp if use == "logp" else entropy) * g).sum().backward()
        hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
        r_logp, r_ent = reference.linear_logprob(hd, wd, targets)
        ((r_logp if use == "logp" else r_ent) * g.double()).sum().backward()
        _assert_rel(h.grad, hd.grad, 1e-5)
        _assert_rel(w.grad, wd.grad, 1e-5)


def test_many_chunks_with_a_remainder(kernel_path, monkeypatch):
    hidden, weight, targets = _inputs(23, 16, 500, seed=5)
    g = torch.randn(23, generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(logprob, "_CPU_CHUNK_BYTES", 500 * 4 * 5)  # 5 rows per chunk: 5+5+5+5+3
    got = _grads(lambda h, w: sk.fused_linear_logprob(h, w, targets, 0.9, return_entropy=True),
                 hidden, weight, g, -g)
    want = _grads(lambda h, w: reference.linear_logprob(h, w, targets, 0.9), hidden.double(), weight.double(),
                  g.double(), -g.double())
    for a, b in zip(got, want):
        _assert_rel(a, b, 1e-5)


def test_float64_inputs_are_exact_on_torch_path(torch_path):
    hidden, weight, targets = _inputs(9, 12, 257, seed=7, dtype=torch.float64)
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, 0.8, return_entropy=True)
    ref_logp, ref_ent = reference.linear_logprob(hidden, weight, targets, 0.8)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, ref_ent, rtol=1e-12, atol=1e-12)
    g = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = _grads(lambda h, w: sk.fused_linear_logprob(h, w, targets, 0.8, return_entropy=True),
                 hidden, weight, g, g * 0.5)
    want = _grads(lambda h, w: reference.linear_logprob(h, w, targets, 0.8), hidden, weight, g, g * 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_targets_give_zero_and_no_gradient(kernel_path, ignore_index):
    hidden, weight, targets = _inputs(10, 8, 200, seed=9)
    ignored = torch.tensor([0, 4, 9])
    targets[ignored] = ignore_index
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, entropy = sk.fused_linear_logprob(h, w, targets, return_entropy=True, ignore_index=ignore_index)
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(h.grad[ignored] == 0)
    kept = torch.tensor([i for i in range(10) if i not in ignored.tolist()])
    wd = weight.double().requires_grad_(True)
    r_logp, r_ent = reference.linear_logprob(hidden[kept].double(), wd, targets[kept])
    (r_logp.sum() + r_ent.sum()).backward()
    _assert_rel(w.grad, wd.grad, 1e-5)


def test_single_token_and_leading_dims(kernel_path):
    hidden, weight, targets = _inputs(6, 8, 130, seed=10)
    one = sk.fused_linear_logprob(hidden[:1], weight, targets[:1])
    assert one.shape == (1,)
    _assert_within(one, *(o[0][:1] for o in _oracle(hidden[:1], weight, targets[:1])))
    batched = sk.fused_linear_logprob(hidden.view(2, 3, 8), weight, targets.view(2, 3))
    assert batched.shape == (2, 3)
    _assert_within(batched.reshape(-1), *(o[0] for o in _oracle(hidden, weight, targets)))


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_huge_logits_stay_finite_and_bounded(kernel_path, scale):
    hidden, weight, targets = _inputs(8, 16, 400, scale=scale, seed=11)
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all() and (entropy >= 0).all() and (entropy <= math.log(400)).all()
    (ref_logp, ref_ent), (f32_logp, f32_ent) = _oracle(hidden, weight, targets)
    _assert_within(logp, ref_logp, f32_logp, atol=1e-5 * scale)
    _assert_within(entropy, ref_ent, f32_ent, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = sk.fused_linear_logprob(h, w, targets, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_bounds_on_random_and_flat_logits(kernel_path):
    hidden, weight, targets = _inputs(12, 8, 333, scale=3.0, seed=12)
    hidden[0] = 0.0  # uniform distribution: entropy exactly log V
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, return_entropy=True)
    assert (logp <= 0).all() and (entropy >= 0).all() and (entropy <= math.log(333)).all()
    assert entropy[0].item() == pytest.approx(math.log(333), rel=1e-6)
    assert logp[0].item() == pytest.approx(-math.log(333), rel=1e-6)


@pytest.mark.parametrize("vocab", [32001, 49152])
def test_vocab_not_a_multiple_of_the_block_triton(triton_path, vocab):
    hidden, weight, targets = _inputs(3, 8, vocab, scale=4.0, seed=13)
    targets[0] = vocab - 1  # a target in the last, partial block
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, return_entropy=True)
    (ref_logp, ref_ent), (f32_logp, f32_ent) = _oracle(hidden, weight, targets)
    _assert_within(logp, ref_logp, f32_logp)
    _assert_within(entropy, ref_ent, f32_ent)


@pytest.mark.parametrize("vocab", [151936, 128256])
def test_large_odd_vocab_torch(torch_path, vocab):
    hidden, weight, targets = _inputs(4, 8, vocab, scale=4.0, seed=14)
    targets[1] = vocab - 1
    logp, entropy = sk.fused_linear_logprob(hidden, weight, targets, return_entropy=True)
    (ref_logp, ref_ent), (f32_logp, f32_ent) = _oracle(hidden, weight, targets)
    _assert_within(logp, ref_logp, f32_logp)
    _assert_within(entropy, ref_ent, f32_ent)


def test_default_model_shapes_on_cpu_path(torch_path, monkeypatch):
    """H = 576, V = 49152 (SmolLM2-135M), a few hundred tokens, several chunks."""
    n, h, v = 200, 576, 49152
    monkeypatch.setattr(logprob, "_CPU_CHUNK_BYTES", 96 * v * 4)  # chunks of 96, 96, 8 rows
    hidden, weight, targets = _inputs(n, h, v, scale=1.0, seed=15)
    weight = weight * 4.0  # peaked distributions, as a trained head gives
    targets[::7] = -100
    gen = torch.Generator().manual_seed(16)
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    hw = hidden.clone().requires_grad_(True)
    ww = weight.clone().requires_grad_(True)
    logp, entropy = sk.fused_linear_logprob(hw, ww, targets, 0.7, return_entropy=True)
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    r_logp, r_ent = reference.linear_logprob(hd, wd, targets, 0.7)
    ((r_logp * g_logp.double()).sum() + (r_ent * g_ent.double()).sum()).backward()
    with torch.no_grad():
        f_logp, f_ent = reference.linear_logprob(hidden, weight, targets, 0.7)
    _assert_within(logp, r_logp.detach(), f_logp)
    _assert_within(entropy, r_ent.detach(), f_ent)
    _assert_rel(hw.grad, hd.grad, 1e-5)
    _assert_rel(ww.grad, wd.grad, 1e-5)


def test_bfloat16_inputs_torch_path(torch_path):
    hidden, weight, targets = _inputs(16, 32, 1000, scale=2.0, seed=17, dtype=torch.bfloat16)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, entropy = sk.fused_linear_logprob(h, w, targets, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    exact = reference.linear_logprob(hidden.double(), weight.double(), targets)
    # PyTorch's own bf16 pipeline (bf16 logits) as the yardstick
    logits = hidden @ weight.T
    naive_logp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
    _assert_within(logp, exact[0], naive_logp, k=1.0)
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    r_logp, r_ent = reference.linear_logprob(hd, wd, targets)
    (r_logp.sum() + r_ent.sum()).backward()
    _assert_rel(w.grad, wd.grad, 1e-2)  # bf16 output rounding: 2^-8
    _assert_rel(h.grad, hd.grad, 1e-2)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets = _inputs(4, 8, 50)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        sk.fused_linear_logprob(hidden, weight, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="share H"):
        sk.fused_linear_logprob(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="leading shape"):
        sk.fused_linear_logprob(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        sk.fused_linear_logprob(hidden, weight, targets, temperature=0.0)


def test_dispatch_picks_the_requested_path(monkeypatch):
    hidden, weight, _ = _inputs(2, 4, 10)
    for mode, want in (("triton", True), ("torch", False)):
        monkeypatch.setenv("SPELL_KERNELS", mode)
        assert logprob._Chunks(hidden, weight, 1.0).triton_rows is want
