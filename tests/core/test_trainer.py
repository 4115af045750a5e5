"""The trainer against a float64 oracle written here: each trajectory run on its own through
transformers' model (eager attention), log-softmax at the sampling temperature, the PPO clip
formula by hand, token-mean over all trajectories, autograd; AdamW = torch.optim.AdamW on
those gradients after clipping them by hand. Whatever the packing (shared prefix or plain,
one micro-batch or many, groups split across micro-batches), the step must equal it."""
import copy

import pytest
import torch
import transformers

from spell_core.selfplay.batch import Trajectory
from spell_core.models.model import CausalLM
from spell_core.training.trainer import Trainer, TrainerOptions, TrainingOutOfMemoryError, plan_micro_batches
from tests.core.tiny_models import ours_from_hf, perturbed_hf_model

VOCAB = 61
TEMPERATURE = 0.7
ARCHS = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=2)),
    "qwen2_tied": (transformers.Qwen2Config, dict(hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                                  num_key_value_heads=2, tie_word_embeddings=True)),
}


def tiny_models(arch="llama", dtype=torch.float64, seed=0):
    """(transformers model, our CausalLM) with the same random weights, perturbed off their init."""
    config_cls, kwargs = ARCHS[arch]
    hf = perturbed_hf_model(config_cls(vocab_size=VOCAB, num_hidden_layers=2, **kwargs), seed,
                            attn_implementation="eager")
    return hf.to(dtype), ours_from_hf(hf).to(dtype)


def reference_logprobs(model, t: Trajectory, temperature=TEMPERATURE):
    """log p(response token | everything before it), float64, from the logits of the whole
    sequence [prompt + response] alone, through transformers (or our model, plain forward)."""
    ids = torch.tensor(t.prompt_ids + t.response_ids)
    logits = (model(ids) if isinstance(model, CausalLM) else model(input_ids=ids[None]).logits[0]).double()
    p, r = len(t.prompt_ids), len(t.response_ids)
    logp = torch.log_softmax(logits[p - 1:p - 1 + r] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]


def synthetic_batch(hf, seed=1, advantage_scale=1.0):
    """A responder group (G=4), a verifier group (3), two questioner singletons and one empty
    response; old log-probs = the reference's plus noise, so ratios clip on both sides."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    spec = [("responder", 13, [5, 1, 7, 3]), ("verifier", 9, [2, 6, 4]), ("questioner", 11, [8]),
            ("questioner", 5, [1]), ("questioner", 4, [0])]
    trajectories = []
    for role, prompt_len, response_lens in spec:
        prompt = tokens(prompt_len)
        for r in response_lens:
            response = tokens(r)
            t = Trajectory(role, prompt, response, [0.0] * r, advantage_scale * float(torch.randn(1, generator=g)))
            if r:
                with torch.no_grad():
                    logp = reference_logprobs(hf, t)
                t.old_logprobs = (logp + 0.4 * torch.randn(r, generator=g, dtype=torch.float64)).tolist()
            trajectories.append(t)
    return trajectories


def reference_step(model, trajectories, clip_low=0.2, clip_high=0.2, dual_clip=3.0, on_policy=False,
                   agg="token-mean"):
    """(loss, gradients by parameter name, ratios) of SPEC's objective, by hand in float64."""
    model.zero_grad(set_to_none=True)
    losses, ratios = [], []
    for t in trajectories:
        if not t.response_ids:
            continue
        logp = reference_logprobs(model, t)
        old = logp.detach() if on_policy else torch.tensor(t.old_logprobs, dtype=torch.float64)
        ratio = torch.exp(logp - old)
        a = t.advantage
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
        if dual_clip is not None and a < 0:  # dual clip: the loss of a negative advantage is at most -A c
            loss = torch.minimum(loss, torch.full_like(loss, -a * dual_clip))
        losses.append(loss)
        ratios.append(ratio.detach())
    if agg == "token-mean":
        loss = torch.cat(losses).mean()
    else:  # seq-mean-token-mean
        loss = torch.stack([x.mean() for x in losses]).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads, torch.cat(ratios)


def assert_grads_close(ours, ref_grads, rtol):
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    assert set(ours_grads) == set(ref_grads)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = float((ours_grads[name] - ref).abs().max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


@pytest.mark.parametrize("arch,shared_prefix,budget,agg,checkpointing", [
    ("llama", True, 1000, "token-mean", False),  # one micro-batch
    ("llama", True, 24, "token-mean", False),  # several; the responder group split into pieces
    ("llama", False, 1000, "token-mean", False),
    ("llama", False, 24, "token-mean", False),
    ("qwen2_tied", True, 24, "token-mean", False),
    ("llama", True, 24, "seq-mean-token-mean", False),
    ("llama", True, 24, "token-mean", True),
])
def test_gradients_equal_float64_reference(arch, shared_prefix, budget, agg, checkpointing):
    hf, ours = tiny_models(arch)
    trajectories = synthetic_batch(hf)
    ref_loss, ref_grads, ref_ratios = reference_step(hf, trajectories, agg=agg)
    trainer = Trainer(ours, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=budget,
                                           shared_prefix=shared_prefix, agg=agg,
                                           gradient_checkpointing=checkpointing))
    metrics = trainer.accumulate_gradients(trajectories)

    assert not metrics["skipped"]
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-12)
    assert_grads_close(ours, ref_grads, rtol=1e-6)  # RoPE angles are fp32 (as in transformers) even in float64
    assert metrics["tokens_trained"] == 37 and metrics["tokens_responder"] == 16 and metrics["tokens_verifier"] == 12
    if budget == 1000:
        # shared: 13 + 16, 9 + 12, then 11 + 8 and 5 + 1 as plain sequences; plain: every prompt again
        expected = 75 if shared_prefix else 13 * 4 + 16 + 9 * 3 + 12 + 19 + 6
        assert metrics["tokens_forwarded"] == expected and metrics["micro_batches"] == 1
    else:
        assert metrics["micro_batches"] > 2
    advantages = _token_advantages(trajectories)
    clipped_high = (ref_ratios > 1.2) & (advantages > 0)  # the default clip 0.2 / 0.2
    assert metrics["clip_frac_high"] == pytest.approx(float(clipped_high.double().mean()), abs=1e-6)
    dual_clipped = (ref_ratios > 3.0) & (advantages < 0)  # dual clip c = 3: -A max(r, clip(r)) > -3A iff r > 3
    assert metrics["dual_clip_frac"] == pytest.approx(float(dual_clipped.double().mean()), abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(float(ref_ratios.max()), rel=1e-5)


def test_dual_clip_bounds_negative_advantage_losses():
    """A dual clip of 1.5 catches tokens of this batch (none pass the default 3); the loss and
    gradients still equal the float64 reference with the same dual clip."""
    hf, ours = tiny_models("llama")
    trajectories = synthetic_batch(hf)
    ref_loss, ref_grads, ref_ratios = reference_step(hf, trajectories, dual_clip=1.5)
    dual_clipped = (ref_ratios > 1.5) & (_token_advantages(trajectories) < 0)
    assert dual_clipped.any()
    trainer = Trainer(ours, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=1000, dual_clip=1.5))
    metrics = trainer.accumulate_gradients(trajectories)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-12)
    assert_grads_close(ours, ref_grads, rtol=1e-6)
    assert metrics["dual_clip_frac"] == pytest.approx(float(dual_clipped.double().mean()), abs=1e-6)


def test_clip_defaults_are_the_released_scripts():
    options = TrainerOptions()
    assert (options.clip_low, options.clip_high, options.dual_clip) == (0.2, 0.2, 3.0)


def _token_advantages(trajectories):
    return torch.tensor([t.advantage for t in trajectories for _ in t.response_ids], dtype=torch.float64)


def test_micro_batches_keep_the_budget_and_every_trajectory_once():
    hf, _ = tiny_models()
    trajectories = synthetic_batch(hf)
    plan = plan_micro_batches(trajectories, 24)
    assert all(mb.layout.num_tokens <= 24 for mb in plan)
    trained = sorted(i for mb in plan for i in mb.trajectories)
    assert trained == [i for i, t in enumerate(trajectories) if t.response_ids]
    # the responder group (13 + 5, 1, 7, 3 tokens) no longer fits: pieces that repeat its prompt
    prompt = trajectories[0].prompt_ids
    pieces = [mb for mb in plan for seg in range(len(mb.layout.parent))
              if mb.layout.parent[seg] == -1 and mb.input_ids[int(mb.layout.cu_seqlens[seg]):][:13].tolist() == prompt]
    assert len(pieces) >= 2


def test_on_policy_ratio_is_exactly_one():
    hf, ours = tiny_models()
    trajectories = synthetic_batch(hf)
    ref_loss, ref_grads, _ = reference_step(hf, trajectories, on_policy=True)
    trainer = Trainer(ours, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=24,
                                           use_sampler_logprobs=False))
    metrics = trainer.accumulate_gradients(trajectories)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0 and metrics["approx_kl"] == 0.0
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-12)
    assert_grads_close(ours, ref_grads, rtol=1e-6)


def test_float32_error_within_pytorch_float32_error():
    """fp32 training vs the float64 oracle: within a few times transformers' own fp32 error."""
    hf64, _ = tiny_models()
    trajectories = synthetic_batch(hf64)
    _, ref_grads, _ = reference_step(hf64, trajectories)
    hf32, ours32 = tiny_models(dtype=torch.float32)
    _, hf32_grads, _ = reference_step(hf32, trajectories)
    Trainer(ours32, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=24)).accumulate_gradients(trajectories)
    ours_grads = dict(ours32.named_parameters())
    for name, ref in ref_grads.items():
        pytorch_err = float((hf32_grads[name].double() - ref).abs().max())
        our_err = float((ours_grads[name].grad.double() - ref).abs().max())
        assert our_err <= 5 * pytorch_err + 1e-7, f"{name}: {our_err:.3g} vs PyTorch fp32 {pytorch_err:.3g}"


def test_adamw_steps_equal_torch_adamw_with_clipping():
    """Two steps; advantages scaled so the gradient norm is well above the clip of 1.0. The
    reference network is a copy of our model run on one whole sequence at a time, and the
    trainer packs plainly, so both run the same arithmetic (RoPE angles and the attention's
    log-sum-exp are fp32 even in float64): Adam divides by the gradients' RMS, which would blow
    1e-7 rounding differences up to more than the tolerance this test wants. The packings
    themselves are compared with the transformers oracle above."""
    hf, ours = tiny_models()
    trajectories = synthetic_batch(hf, advantage_scale=300.0)
    hf = copy.deepcopy(ours)
    opts = TrainerOptions(lr=1e-3, weight_decay=0.01, temperature=TEMPERATURE, micro_batch_tokens=24,
                          shared_prefix=False)
    trainer = Trainer(ours, opts)
    norms_at_step = []  # what the optimizer sees: the clipped gradient
    adamw_step = trainer.optimizer.step

    def step(*args, **kwargs):
        norms_at_step.append(float(torch.cat([p.grad.flatten() for p in ours.parameters()]).norm()))
        return adamw_step(*args, **kwargs)

    trainer.optimizer.step = step
    reference_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for _ in range(2):
        _, grads, _ = reference_step(hf, trajectories)
        norm = float(torch.cat([g.flatten() for g in grads.values()]).norm())
        for p in hf.parameters():
            p.grad.mul_(min(1.0, 1.0 / (norm + 1e-6)))  # clip to 1.0
        reference_opt.step()
        metrics = trainer.train_step(trajectories)
        assert not metrics["skipped"]
        assert norm > 2.0 and metrics["grad_norm"] == pytest.approx(norm, rel=1e-9)
    assert norms_at_step == pytest.approx([1.0, 1.0], rel=1e-8)  # torch clips to 1 / (norm + 1e-6)
    ours_params = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(ours_params[name], p, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in ours.parameters())  # freed between steps


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nan_advantage_skips_the_update_and_training_continues():
    hf, ours = tiny_models()
    trajectories = synthetic_batch(hf)
    trainer = Trainer(ours, TrainerOptions(lr=1e-3, temperature=TEMPERATURE, micro_batch_tokens=24))
    before = _weights(ours)
    trajectories[2].advantage = float("nan")
    metrics = trainer.train_step(trajectories)
    assert metrics["skipped"] and "non-finite" in metrics["skip_reason"]
    _assert_unchanged(ours, before)
    assert all(p.grad is None for p in ours.parameters())
    assert not trainer.optimizer.state  # AdamW never stepped: no moments, no weight decay
    trajectories[2].advantage = 0.5
    metrics = trainer.train_step(trajectories)
    assert not metrics["skipped"]
    assert any(not torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_inf_weight_skips_the_update():
    hf, ours = tiny_models()
    trajectories = synthetic_batch(hf)
    with torch.no_grad():
        ours.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    before = _weights(ours)
    metrics = Trainer(ours, TrainerOptions(lr=1e-3, micro_batch_tokens=24)).train_step(trajectories)
    assert metrics["skipped"] and "non-finite" in metrics["skip_reason"]
    _assert_unchanged(ours, before)


@pytest.mark.parametrize("batch", ["empty", "only_empty_responses"])
def test_nothing_trainable_is_skipped(batch):
    _, ours = tiny_models()
    trajectories = [] if batch == "empty" else [Trajectory("verifier", [1, 2, 3], [], [], 1.0)]
    before = _weights(ours)
    metrics = Trainer(ours).train_step(trajectories)
    assert metrics["skipped"] and "nothing trainable" in metrics["skip_reason"]
    assert metrics["tokens_trained"] == 0 and metrics["micro_batches"] == 0
    _assert_unchanged(ours, before)


def test_sequence_over_the_budget_names_the_knob():
    _, ours = tiny_models()
    t = Trajectory("questioner", list(range(11)), list(range(8)), [-1.0] * 8, 1.0)
    with pytest.raises(ValueError, match=r"19 tokens.*--micro-batch-tokens.*at least 19"):
        Trainer(ours, TrainerOptions(micro_batch_tokens=18)).train_step([t])


def test_token_id_outside_the_vocabulary():
    _, ours = tiny_models()
    t = Trajectory("responder", [1, 2], [3, VOCAB + 4], [-1.0, -1.0], 1.0)
    with pytest.raises(ValueError, match=rf"trajectory 0 \(responder\): response_ids holds token id {VOCAB + 4}"):
        Trainer(ours).train_step([t])


def test_out_of_memory_names_the_knobs(monkeypatch):
    hf, ours = tiny_models()
    trajectories = synthetic_batch(hf)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ours, "forward_hidden", out_of_memory)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        Trainer(ours, TrainerOptions(micro_batch_tokens=24)).train_step(trajectories)
    message = str(info.value)
    for knob in ("--micro-batch-tokens", "gradient checkpointing", "--ctx", "--max-new-tokens", "20.00 GiB"):
        assert knob in message
    assert all(p.grad is None for p in ours.parameters())


def test_bf16_autocast_within_pytorch_bf16_error():
    """The CUDA default (bf16 autocast over fp32 weights), run on CPU: within a few times the
    error of transformers' model under the same autocast, both against the float64 oracle."""
    hf64, _ = tiny_models()
    trajectories = synthetic_batch(hf64)
    _, ref_grads, _ = reference_step(hf64, trajectories)
    hf32, ours32 = tiny_models(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, hf_bf16_grads, _ = reference_step(hf32, trajectories)
    metrics = Trainer(ours32, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=24, bf16_autocast=True)
                      ).accumulate_gradients(trajectories)
    assert not metrics["skipped"]
    ours_grads = dict(ours32.named_parameters())
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        pytorch_err = float((hf_bf16_grads[name].double() - ref).abs().max())
        our_err = float((ours_grads[name].grad.double() - ref).abs().max())
        assert our_err <= 5 * pytorch_err + 1e-3 * scale, f"{name}: {our_err:.3g} vs PyTorch bf16 {pytorch_err:.3g}"
