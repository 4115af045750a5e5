"""Routing replay (issue 22): the sampler records each token's experts, the trainer replays them.

A tiny random Qwen3-MoE in fp32. The oracle of a record is one plain forward of the whole
sequence in record mode; the oracle of the trainer's log-probs is the sampler's own (the PPO
ratio of every trained token is 1). The perturbation test builds exact router ties (experts 2j
and 2j + 1 share a gate row, k = 3, so every token's third choice is a tie) and then breaks them
by a relative 1e-5 after sampling: the live top-k flips for many tokens while the gate weights
move by ~1e-5, so replayed log-probs stay the sampler's and live ones do not.
"""
import pytest
import torch

from spell_core.models.routed_tokens import RoutingRecordError, moe_layers
from spell_core.models.routing import Routing
from spell_core.sampling.sampler import generate
from spell_core.selfplay.batch import Trajectory
from spell_core.training.trainer import Trainer, TrainerOptions, plan_micro_batches
from tests.core.tiny_models import ours_from_hf, perturbed_hf_model, tiny_moe_config

VOCAB = 96
TEMPERATURE = 0.9


def tiny_moe(seed=0, **overrides):
    model = ours_from_hf(perturbed_hf_model(tiny_moe_config(VOCAB, eos_token_id=0, **overrides), seed))
    return model.float()


def sample(model, prompts, n=3, max_new_tokens=7, **kwargs):
    return generate(model, None, prompts, n=n, max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=3,
                    ignore_eos=True, **kwargs)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def trajectories(prompts, outputs, role="responder"):
    return [Trajectory(role, p, c.token_ids, c.logprobs, 1.0 if j % 2 else -1.0, group=f"g{i}", routing=c.routing)
            for i, (p, out) in enumerate(zip(prompts, outputs)) for j, c in enumerate(out)]


@torch.no_grad()
def recorded(model, ids):
    """(T, L, k) ids and (T, L, E) router probabilities of one plain forward of `ids`."""
    routing = Routing("record")
    probs = {}
    handles = []
    for i, block in model.moe_blocks().items():
        handles.append(block.register_forward_pre_hook(
            lambda m, args, i=i: probs.__setitem__(i, torch.softmax(args[0] @ m.gate.weight.T, -1))))
    try:
        model.forward_hidden(torch.tensor(ids), routing=routing)
    finally:
        for h in handles:
            h.remove()
    layers = moe_layers(model.config)
    return (torch.stack([routing.experts[i].long() for i in layers], 1),
            torch.stack([probs[i] for i in layers], 1))


def test_sampler_records_prompt_and_generated_tokens_like_one_plain_forward():
    model = tiny_moe()
    layers, k = moe_layers(model.config), model.config.num_experts_per_tok
    assert layers == (0, 2)  # layer 1 is dense (mlp_only_layers)
    prompts = prompts_of([5, 11])
    # small chunks: a prompt spans chunks and a chunk spans prompts
    outputs = sample(model, prompts, prefill_chunk_tokens=4)
    compared = 0
    for p, out in zip(prompts, outputs):
        assert all(c.routing.prompt is out[0].routing.prompt for c in out)  # one prompt record per prompt
        for c in out:
            assert c.routing.prompt.dtype == torch.uint8 and c.routing.prompt.shape == (len(p), len(layers), k)
            assert c.routing.response.shape == (len(c.token_ids) - 1, len(layers), k)
            got = torch.cat([c.routing.prompt, c.routing.response]).long().sort(-1).values
            want, probs = recorded(model, p + c.token_ids[:-1])
            # tokens whose k-th and (k+1)-th router probabilities are within 1e-5 may differ: not compared
            top = probs.topk(k + 1, -1).values
            clear = (top[..., k - 1] - top[..., k]) > 1e-5
            assert torch.equal(got[clear], want.sort(-1).values[clear])
            compared += int(clear.sum())
    assert compared > 100


def test_dense_models_record_nothing():
    from tests.core.tiny_models import perturbed_hf_model as hf
    import transformers

    dense = ours_from_hf(hf(transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, head_dim=8)))
    out = sample(dense, prompts_of([4]), n=2)
    assert all(c.routing is None for c in out[0])
    assert Trainer(dense, TrainerOptions(temperature=TEMPERATURE)).replay is None


def ratio_extremes(model, trajs, **options):
    """The trainer's PPO ratios exp(trainer log-prob - sampler log-prob) over every trained token."""
    trainer = Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None, **options))
    metrics = trainer.accumulate_gradients(trajs)
    trainer._zero_grad()
    return metrics["ratio_min"], metrics["ratio_max"]


@pytest.mark.parametrize("shared_prefix, budget", [(True, 10_000), (True, 24), (False, 10_000)])
def test_replayed_logprobs_are_the_samplers(shared_prefix, budget):
    model = tiny_moe()
    prompts = prompts_of([6, 9])
    trajs = trajectories(prompts, sample(model, prompts))
    # 24 tokens: the groups split into several micro-batches, each repeating its prompt
    assert (len(plan_micro_batches(trajs, budget, shared_prefix)) > 2) == (budget < 100)
    low, high = ratio_extremes(model, trajs, shared_prefix=shared_prefix, micro_batch_tokens=budget)
    assert abs(low - 1) < 1e-5 and abs(high - 1) < 1e-5


def tied_router_moe():
    """k = 3 of 8 experts, experts 2j and 2j + 1 with one gate row: each token's third pick is a tie."""
    model = tiny_moe(seed=2, num_experts_per_tok=3)
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.gate.weight[1::2] = block.gate.weight[0::2]
    return model


def break_ties(model, relative=1e-5):
    with torch.no_grad():
        for block in model.moe_blocks().values():
            block.gate.weight[1::2] *= 1 + relative


def test_replay_keeps_the_samplers_logprobs_where_a_perturbation_flips_the_live_top_k():
    model = tied_router_moe()
    prompts = prompts_of([7, 10], seed=4)
    outputs = sample(model, prompts, n=3, max_new_tokens=8)
    trajs = trajectories(prompts, outputs)
    break_ties(model)
    flipped = total = 0
    for p, out in zip(prompts, outputs):
        for c in out:
            live, _ = recorded(model, p + c.token_ids[:-1])
            sampled = torch.cat([c.routing.prompt, c.routing.response]).long()
            differs = (live.sort(-1).values != sampled.sort(-1).values).any(-1)
            flipped, total = flipped + int(differs.sum()), total + differs.numel()
    assert flipped > total // 10  # the live top-k moved for many (token, layer) pairs
    low, high = ratio_extremes(model, trajs)  # replay: the default for an MoE model
    assert abs(low - 1) < 1e-4 and abs(high - 1) < 1e-4
    low, high = ratio_extremes(model, trajs, routing_replay=False)
    assert max(abs(low - 1), abs(high - 1)) > 1e-2


def gradients(model, trajs, **options):
    trainer = Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None, **options))
    trainer.accumulate_gradients(trajs)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    trainer._zero_grad()
    return grads


def test_gradient_checkpoint_recomputation_replays_the_same_experts():
    model = tied_router_moe()
    prompts = prompts_of([7, 10], seed=4)
    trajs = trajectories(prompts, sample(model, prompts, n=3, max_new_tokens=8))
    break_ties(model)  # live routing would now pick other experts for many tokens
    plain = gradients(model, trajs)
    recomputed = gradients(model, trajs, gradient_checkpointing=True)
    live = gradients(model, trajs, gradient_checkpointing=True, routing_replay=False)
    model.gradient_checkpointing = False
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(live[name], plain[name], rtol=1e-3, atol=1e-6) for name in plain)


def test_missing_or_misaligned_records_are_clear_errors():
    model = tiny_moe()
    prompts = prompts_of([6])
    trajs = trajectories(prompts, sample(model, prompts, n=2))
    trainer = Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None))
    bare = [Trajectory(t.role, t.prompt_ids, t.response_ids, t.old_logprobs, t.advantage, group=t.group)
            for t in trajs]
    with pytest.raises(RoutingRecordError, match=r"trajectory 0 \(responder.*no expert record.*--no-routing-replay"):
        trainer.accumulate_gradients(bare)
    trajs[1].response_ids = trajs[1].response_ids[:-2]
    trajs[1].old_logprobs = trajs[1].old_logprobs[:-2]
    with pytest.raises(RoutingRecordError, match=r"trajectory 1 .*response expert record has 6 rows for 4 tokens"):
        trainer.accumulate_gradients(trajs)
    other = tiny_moe(num_experts_per_tok=3)
    with pytest.raises(RoutingRecordError, match=r"shape \(6, 2, 2\), expected \(tokens, 2 MoE layers, 3 experts"):
        Trainer(other, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None)).accumulate_gradients(trajs[:1])
    # without replay the records are not needed
    Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None,
                                  routing_replay=False)).accumulate_gradients(bare)
