"""policy_loss's TRL/verl pieces (KL to a reference, sequence-level ratio, rollout importance cap,
aggregation modes and TRL loss_type names, soft-cap and logit scale) against a float64 oracle
written here: the loss as TRL and verl write it, on padded (B, T) tensors with materialised
logits and autograd, independently of spell_kernels' packed, chunked, hand-differentiated path."""
import math

import pytest
import torch

import spell_kernels as sk

LENS = [5, 3, 7, 4]  # four packed sequences
V, H = 37, 12


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("SPELL_KERNELS", request.param)
    return request.param


def _batch(seed=0, per_sequence_advantage=False):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENS)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    targets = torch.randint(0, V, (n,), generator=g)
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    old = logp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)  # ratios spread over the clip range
    ref = logp + 0.6 * torch.randn(n, generator=g, dtype=torch.float64)
    rollout = old + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)  # some weights above the cap
    if per_sequence_advantage:
        adv = torch.repeat_interleave(torch.randn(len(LENS), generator=g, dtype=torch.float64), torch.tensor(LENS))
    else:
        adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.25
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    for s in range(len(LENS)):  # every sequence trains at least one token (TRL and verl count every row)
        mask[cu[s]] = True
    return dict(hidden=hidden, weight=weight, targets=targets, old=old, ref=ref, rollout=rollout, adv=adv, mask=mask,
                cu=cu)


def _padded(x, fill=0.0):
    out = x.new_full((len(LENS), max(LENS)), fill)
    start = 0
    for i, length in enumerate(LENS):
        out[i, :length] = x[start:start + length]
        start += length
    return out


def _oracle(b, agg, clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3", ratio_level="token",
            rollout_cap=None, temperature=1.0, softcap=None, logit_scale=1.0, old=True, max_len=None):
    """(loss, d hidden, d weight) the way TRL's GRPOTrainer._compute_loss and verl's core_algos write it."""
    hidden = b["hidden"].clone().requires_grad_(True)
    weight = b["weight"].clone().requires_grad_(True)
    y = logit_scale * hidden @ weight.T
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    logp = _padded(torch.log_softmax(y / temperature, -1).gather(1, b["targets"][:, None]).squeeze(1))
    old_lp = _padded(b["old"]) if old else logp.detach()
    m = _padded(b["mask"].double())
    adv = _padded(b["adv"])
    log_ratio = logp - old_lp
    if ratio_level == "sequence":  # GSPO-token (verl's gspo): sg[s_i] * pi_t / sg[pi_t]
        seq = ((log_ratio * m).sum(-1) / m.sum(-1)).unsqueeze(-1)
        log_ratio = logp - logp.detach() + seq.detach()
    ratio = torch.exp(log_ratio)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if rollout_cap is not None:  # TRL: importance_sampling_ratio = exp(old - sampling).clamp(max=cap)
        per_token = per_token * torch.exp(old_lp - _padded(b["rollout"])).clamp(max=rollout_cap)
    if kl_coef:
        x = logp - _padded(b["ref"])
        kl = {"k1": x, "k2": x ** 2 / 2, "k3": torch.exp(-x) - (-x) - 1}[kl_estimator]
        per_token = per_token + kl_coef * kl
    max_len = max_len or m.shape[-1]
    masked = per_token * m
    loss = {
        "token-mean": lambda: masked.sum() / m.sum(),                                  # verl; TRL bnpo
        "bnpo": lambda: masked.sum() / m.sum().clamp(min=1.0),
        "dapo": lambda: masked.sum() / m.sum(),                                        # num_items_in_batch
        "seq-mean-token-mean": lambda: (masked.sum(-1) / m.sum(-1)).mean(),
        "grpo": lambda: ((masked.sum(-1)) / m.sum(-1).clamp(min=1.0)).mean(),
        "seq-mean-token-sum": lambda: masked.sum(-1).mean(),
        "seq-mean-token-sum-norm": lambda: masked.sum(-1).sum() / max_len,            # verl
        "dr_grpo": lambda: masked.sum() / (masked.size(0) * max_len),                  # TRL
    }[agg]()
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _ours(b, agg, old=True, **kw):
    hidden = b["hidden"].clone().requires_grad_(True)
    weight = b["weight"].clone().requires_grad_(True)
    if agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        kw.setdefault("norm_length", max(LENS))
    if agg == "dapo":
        kw.setdefault("global_count", int(b["mask"].sum()))
    loss, stats = sk.policy_loss(hidden, weight, b["targets"], b["old"] if old else None, b["adv"], b["mask"],
                                 agg=agg, cu_seqlens=b["cu"], **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, stats


def _assert_match(ours, oracle, tol):
    for name, a, e in zip(("loss", "d hidden", "d weight"), ours, oracle):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
        "grpo", "bnpo", "dapo", "dr_grpo"]


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_modes_and_trl_loss_types(agg):
    b = _batch(1)
    ours = _ours(b, agg)
    _assert_match(ours[:3], _oracle(b, agg), 1e-10)


def test_norm_length_is_the_divisor_not_the_batch_length():
    b = _batch(2)
    a = _ours(b, "seq-mean-token-sum-norm", norm_length=4096)
    _assert_match(a[:3], _oracle(b, "seq-mean-token-sum-norm", max_len=4096), 1e-10)
    d = _ours(b, "dr_grpo", norm_length=1024)
    _assert_match(d[:3], _oracle(b, "dr_grpo", max_len=1024), 1e-10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("old", [True, False])
def test_kl_to_a_reference(estimator, old):
    b = _batch(3)
    ours = _ours(b, "grpo", old=old, ref_logprobs=b["ref"], kl_coef=0.3, kl_estimator=estimator)
    _assert_match(ours[:3], _oracle(b, "grpo", kl_coef=0.3, kl_estimator=estimator, old=old), 1e-10)
    # the logged mean KL, by hand from the same formula
    logp = torch.log_softmax(b["hidden"] @ b["weight"].T, -1).gather(1, b["targets"][:, None]).squeeze(1)
    x = (logp - b["ref"])[b["mask"]]
    want = {"k1": x, "k2": x ** 2 / 2, "k3": torch.exp(-x) + x - 1}[estimator].mean()
    assert ours[3]["kl"].item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sequence_level_ratio_gspo(agg):
    b = _batch(4)
    kw = dict(clip_low=0.05, clip_high=0.06)  # tight, so some sequences clip
    ours = _ours(b, agg, ratio_level="sequence", **kw)
    _assert_match(ours[:3], _oracle(b, agg, ratio_level="sequence", **kw), 1e-10)


def test_sequence_level_gradient_equals_trls_differentiable_sequence_ratio():
    """TRL's importance_sampling_level="sequence" keeps the sequence ratio differentiable
    (log w_i = mean_t log r_t, broadcast over the sequence): with one advantage per sequence
    and loss_type grpo its gradient equals GSPO-token's."""
    b = _batch(5, per_sequence_advantage=True)
    ours = _ours(b, "grpo", ratio_level="sequence", clip_low=0.05, clip_high=0.06)
    hidden = b["hidden"].clone().requires_grad_(True)
    weight = b["weight"].clone().requires_grad_(True)
    logp = _padded(torch.log_softmax(hidden @ weight.T, -1).gather(1, b["targets"][:, None]).squeeze(1))
    m, adv = _padded(b["mask"].double()), _padded(b["adv"])
    log_w = (((logp - _padded(b["old"])) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    w = torch.exp(log_w)
    per_token = -torch.min(w * adv, torch.clamp(w, 1 - 0.05, 1 + 0.06) * adv)
    loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    loss.backward()
    _assert_match(ours[:3], (loss.detach(), hidden.grad, weight.grad), 1e-10)


@pytest.mark.parametrize("old", [True, False])
def test_rollout_importance_ratio_cap(old):
    b = _batch(6)
    ours = _ours(b, "dapo", old=old, rollout_logprobs=b["rollout"], rollout_is_cap=1.5)
    _assert_match(ours[:3], _oracle(b, "dapo", rollout_cap=1.5, old=old), 1e-10)
    logp = torch.log_softmax(b["hidden"] @ b["weight"].T, -1).gather(1, b["targets"][:, None]).squeeze(1)
    w = torch.exp((b["old"] if old else logp) - b["rollout"]).clamp(max=1.5)[b["mask"]]
    assert (w == 1.5).any() and (w < 1.5).any()  # the cap is active on some tokens, not all
    assert ours[3]["is_weight_mean"].item() == pytest.approx(w.mean().item(), rel=1e-6)


def test_softcap_logit_scale_and_temperature_in_the_loss(kernel_path):
    b = _batch(7)
    kw = dict(softcap=2.5, logit_scale=1.7, temperature=0.8)
    ours = _ours(b, "token-mean", ref_logprobs=b["ref"], kl_coef=0.05, **kw)
    tol = 1e-10 if kernel_path == "torch" else 1e-5  # the Triton row kernels reduce in fp32
    _assert_match(ours[:3], _oracle(b, "token-mean", kl_coef=0.05, **kw), tol)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_logprob_softcap_and_scale(kernel_path, softcap, monkeypatch):
    from spell_kernels import logprob
    monkeypatch.setattr(logprob, "_CPU_CHUNK_BYTES", 7 * V * 8)  # several chunks with a remainder
    b = _batch(8)
    hidden = b["hidden"].clone().requires_grad_(True)
    weight = b["weight"].clone().requires_grad_(True)
    logp, ent = sk.fused_linear_logprob(hidden, weight, b["targets"], 0.7, True, softcap=softcap, logit_scale=0.6)
    (logp * b["adv"] + ent * b["old"]).sum().backward()
    h64 = b["hidden"].clone().requires_grad_(True)
    w64 = b["weight"].clone().requires_grad_(True)
    y = 0.6 * h64 @ w64.T
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    lsm = torch.log_softmax(y / 0.7, -1)
    ref_logp = lsm.gather(1, b["targets"][:, None]).squeeze(1)
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    (ref_logp * b["adv"] + ref_ent * b["old"]).sum().backward()
    tol = 1e-10 if kernel_path == "torch" else 1e-5
    for a, e in ((logp, ref_logp), (ent, ref_ent), (hidden.grad, h64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(a.double(), e.detach(), rtol=tol, atol=tol)


def test_bad_new_arguments_raise_clear_errors():
    b = _batch(9)
    args = (b["hidden"], b["weight"], b["targets"], b["old"], b["adv"], b["mask"])
    with pytest.raises(ValueError, match="norm_length"):
        sk.policy_loss(*args, agg="dr_grpo", cu_seqlens=b["cu"])
    with pytest.raises(ValueError, match="kl_estimator"):
        sk.policy_loss(*args, ref_logprobs=b["ref"], kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        sk.policy_loss(*args, kl_coef=0.1)
    with pytest.raises(ValueError, match="rollout_is_cap"):
        sk.policy_loss(*args, rollout_logprobs=b["rollout"])
    with pytest.raises(ValueError, match="ratio_level='sequence' needs cu_seqlens"):
        sk.policy_loss(*args, ratio_level="sequence")
    with pytest.raises(ValueError, match="loss_type"):
        sk.policy_loss(*args, agg="cispo")
    with pytest.raises(ValueError, match="softcap"):
        sk.policy_loss(*args, softcap=0.0)
    assert math.isfinite(sk.policy_loss(*args, agg="bnpo")[0].item())
