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
    # a rank with fewer micro-batches pads with a ghost one: it carries expert ids too
    assert trainer.padding_micro_batch().routing.shape == (2, 2, 2)
    # without replay the records are not needed
    Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None,
                                  routing_replay=False)).accumulate_gradients(bare)


def _context_parallel_scenario(topology, trajs, state):
    model = tied_router_moe().double()
    model.load_state_dict(state)
    trainer = Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None, agg="token-mean",
                                            micro_batch_tokens=40), topology)
    metrics = trainer.accumulate_gradients(trajs)
    return {k: metrics[k] for k in ("loss", "ratio_min", "ratio_max", "micro_batches")}


def test_context_parallel_shards_the_experts_like_the_tokens(tmp_path):
    """2 CP ranks (gloo), each holding a zigzag shard of every sequence and of its expert ids: the
    loss is the single-process one and every ratio stays 1 where live routing would move it."""
    from tests.core.test_distributed import run_ranks

    model = tied_router_moe().double()
    prompts = prompts_of([7, 10], seed=4)
    trajs = trajectories(prompts, sample(model, prompts, n=3, max_new_tokens=8))
    break_ties(model)
    single = Trainer(model, TrainerOptions(temperature=TEMPERATURE, max_rollbacks=None, agg="token-mean",
                                           micro_batch_tokens=80)).accumulate_gradients(trajs)
    ranks = run_ranks(2, _context_parallel_scenario, tmp_path, trajs, model.state_dict(), cp=2)
    for result in ranks:
        assert result["micro_batches"] == single["micro_batches"]
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-9)
        assert abs(result["ratio_min"] - 1) < 1e-4 and abs(result["ratio_max"] - 1) < 1e-4


def test_the_cuda_graph_step_records_the_eager_steps_experts():
    """decode_graph.py's static-buffer step (padding rows past the live ones), run without capture
    (the graph itself needs a GPU): the live rows' expert ids are the eager step's."""
    from spell_core.sampling.decode_graph import CudaGraphDecoder
    from spell_core.sampling.kv_cache import KVCache, WaveLayout
    from spell_core.sampling.routing_capture import RoutingCapture
    from spell_core.sampling.sampler import _decode_step, _decode_tables, _Sample

    model = tiny_moe()
    counts, prompt_lens, new_tokens = [2, 1, 1], [9, 5, 12], 6
    layout = WaveLayout.build(prompt_lens, counts, [new_tokens] * 3)
    cache = KVCache(model.config, layout.num_slots + 1, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    samples = [_Sample(r, i, prompt_lens[r], new_tokens, layout.own_start[i], None,
                       tokens=torch.randint(1, VOCAB, (i + 1,), generator=gen).tolist())
               for i, r in enumerate([0, 0, 1, 2])]
    live = [samples[0], samples[1], samples[3]]  # 3 live rows in a bucket of 4
    graph_capture, eager_capture = RoutingCapture(model), RoutingCapture(model)
    decoder = CudaGraphDecoder(model, cache, layout, counts, new_tokens, 1.0, _decode_tables, _decode_step,
                               capture=False, routing=graph_capture)
    with torch.inference_mode():
        decoder(live)
        _decode_step(model, cache, layout, live, 1.0, routing=eager_capture)
    assert [b.request for b in live] == [0, 0, 2]
    graph_rows, eager_rows = graph_capture.decode_rows[0], eager_capture.decode_rows[0]
    assert graph_rows.shape == eager_rows.shape == (3, 2, 2)
    assert torch.equal(graph_rows.sort(-1).values, eager_rows.sort(-1).values)
    assert graph_capture.sample_rows == {(0, 0): [0], (0, 1): [1], (2, 3): [2]}
    assert not any(block.live for block in model.moe_blocks().values())


def test_expert_load_metrics_by_hand():
    from types import SimpleNamespace

    from spell_core.models.routed_tokens import expert_load_metrics

    counts = {2: torch.tensor([1, 1, 1, 1]), 0: torch.tensor([6, 0, 1, 1])}  # layer 0: busiest 6 over a mean of 2
    model = SimpleNamespace(read_expert_load=lambda: counts)
    assert expert_load_metrics(model) == {"expert_load": [[6, 0, 1, 1], [1, 1, 1, 1]], "expert_load_imbalance": 3.0}
    counts = {0: torch.zeros(4, dtype=torch.long)}
    assert expert_load_metrics(model) == {"expert_load": [[0, 0, 0, 0]], "expert_load_imbalance": None}
    assert expert_load_metrics(SimpleNamespace()) == {}
