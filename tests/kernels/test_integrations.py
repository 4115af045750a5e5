"""The one-line patches and the Liger-style modules against independent oracles:
- transformers: add_logprob_head on small random Llama / Qwen2 / Qwen3 models against the model's own
  logits -> log_softmax (and entropy), forward and backward;
- verl: linear_cross_entropy(hidden, weight, labels, temperature, reduction) -> (log_probs, entropy),
  verl's documented contract (verl is not installable here: tested against the contract, in float64);
- TRL: the patch swaps the fused LM head that GRPOTrainer builds (see test_trl_grpo.py for a real run);
- modules: FusedLinearGRPOLoss / FusedLinearCrossEntropyLoss against TRL's GRPO loss and
  torch's cross-entropy written out here in float64;
- a missing framework names the pip extra to install."""
import copy
import subprocess
import sys

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import spell_kernels as sk
from spell_kernels.integrations import transformers as spell_tf
from spell_kernels.integrations import verl as spell_verl

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM, {}), "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
          "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_logprob_head_equals_log_softmax_of_the_models_logits(name):
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    config._attn_implementation = "eager"
    model = model_cls(config).double()
    patched = spell_tf.apply_all(copy.deepcopy(model), temperature=0.7)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0  # right padding (float64 eager attention turns fully masked rows into nan)
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # only the completion is scored
    out = patched(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    coef = torch.randn(2, 8, generator=g, dtype=torch.float64)
    (out.log_probs * coef + out.entropy * coef.flip(0)).sum().backward()

    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1] / 0.7
    lsm = torch.log_softmax(logits, -1)
    target = labels[:, 1:]
    keep = target != -100
    want_logp = lsm.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * keep
    want_ent = -(lsm.exp() * lsm).sum(-1) * keep
    (want_logp * coef + want_ent * coef.flip(0)).sum().backward()
    # patched runs spell attention, the reference eager attention, whose softmax runs in float32
    torch.testing.assert_close(out.log_probs.detach(), want_logp.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.entropy.detach(), want_ent.detach(), rtol=1e-6, atol=1e-7)
    for (pn, p), (_, q) in zip(patched.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{pn}: {m}")
    assert out.loss.item() == pytest.approx(-(want_logp.sum() / keep.sum()).item(), rel=1e-6)
    # without fused_lm_head the forward is the original one (generation unchanged)
    plain = patched(input_ids=ids, attention_mask=attention_mask)
    assert plain.logits.shape == (2, 9, 97)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_verl_linear_cross_entropy_contract(reduction):
    """verl's fused-kernel hook: log_probs, entropy = linear_cross_entropy(hidden, weight, labels,
    temperature, reduction); log_probs are log-softmax at the label (<= 0) of logits / temperature."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    logp, ent = spell_verl.linear_cross_entropy(hidden, weight, labels, 0.6, reduction)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    lsm = torch.log_softmax(h2 @ w2.T / 0.6, -1)
    want_logp = lsm.gather(-1, labels[..., None]).squeeze(-1)
    want_ent = -(lsm.exp() * lsm).sum(-1)
    if reduction != "none":
        want_logp, want_ent = (getattr(t, reduction)() for t in (want_logp, want_ent))
    assert logp.shape == want_logp.shape
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-10)
    (logp.sum() - 0.3 * ent.sum()).backward()
    (want_logp.sum() - 0.3 * want_ent.sum()).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-9, atol=1e-10)
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        spell_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())


def _trl_grpo_loss(h, w, ids, mask, adv, old, ref, beta, eps_low, eps_high, loss_type, max_len, level, is_ratio):
    """TRL GRPOTrainer._compute_loss, written out on materialised logits, float64."""
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    m = mask.double()
    old = logp.detach() if old is None else old
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef1 = torch.exp(log_ratio)
    coef2 = torch.clamp(coef1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef1 * adv[:, None], coef2 * adv[:, None])
    if is_ratio is not None:
        per_token = per_token * is_ratio
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * max_len)
    return (per_token * m).sum() / m.sum()  # dapo, num_items_in_batch = local token count


@pytest.mark.parametrize("loss_type, level, beta, with_old, with_is", [
    ("dapo", "token", 0.04, True, False), ("grpo", "token", 0.0, False, False), ("bnpo", "token", 0.1, True, True),
    ("dr_grpo", "token", 0.04, True, False), ("grpo", "sequence", 0.04, True, False)])
def test_grpo_module_equals_trls_loss(loss_type, level, beta, with_old, with_is):
    g = torch.Generator().manual_seed(4)
    batch, length, hid, vocab = 3, 6, 12, 40
    h = torch.randn(batch, length, hid, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) / 2
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (logp + 0.2 * torch.randn(batch, length, generator=g, dtype=torch.float64)) if with_old else None
    ref = logp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    is_ratio = (0.5 + torch.rand(batch, length, generator=g, dtype=torch.float64)) if with_is else None
    module = sk.FusedLinearGRPOLoss(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                    max_completion_length=8, importance_sampling_level=level)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, metrics = module(h1, w1, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                           importance_sampling_ratio=is_ratio)
    loss.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = _trl_grpo_loss(h2, w2, ids, mask, adv, old, ref, beta, 0.2, 0.28, loss_type, 8, level, is_ratio)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-12)
    assert len(metrics) == (2 if beta else 1)


def test_cross_entropy_module_takes_ligers_argument_order():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 8, generator=g, dtype=torch.float64)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 30, (7,), generator=g)
    t[2] = -100
    loss = sk.FusedLinearCrossEntropyLoss(softcap=4.0)(w, x, t)  # (lin_weight, _input, target)
    want = torch.nn.functional.cross_entropy(4.0 * torch.tanh(x @ w.T / 4.0), t, ignore_index=-100)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        sk.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
    logp = sk.FusedLinearLogprob(temperature=2.0)(x, w, t)
    want_logp = torch.log_softmax(x @ w.T / 2.0, -1).gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) * (t != -100)
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module, extra", [("transformers", "transformers"), ("trl", "trl")])
def test_a_missing_framework_names_the_extra(module, extra):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"try:\n    import spell_kernels.integrations.{module}\n"
            f"except ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"pip install 'spell-kernels[{extra}]'" in proc.stdout, proc.stdout + proc.stderr
