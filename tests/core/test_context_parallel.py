"""Context parallel training: zigzag shards of a micro-batch, and a CP = 2 (and DP 2 x CP 2) step
on gloo processes against the single-process trainer on the same trajectories.

The single-process step packs shared prefixes; the CP step shards the same shared-prefix groups
(the prompt forwarded once, kernels/ring_shared_prefix.py) or, with shared_prefix=False, packs
every trajectory as a plain sequence, and runs ring attention (float64 blocks merge in float64). The model's RMSNorm runs in
fp32 as transformers' does, so gradients through it are rounded to fp32, and the two packings
round differently: loss and gradient norm rel 1e-6, weights after AdamW within 1e-5 x lr (a
step moves a weight by about lr; measured: 5e-7 x lr; see test_distributed.py for the AdamW eps
used). The DP 2 x CP 2 case runs a float32 model (rel 1e-5, weights 1e-4 x lr)."""
from types import SimpleNamespace

import pytest
import torch

import spell_kernels
from spell_core.selfplay.batch import Trajectory
from spell_core.distributed.context_parallel import RingAttention, _token_weighted_advantages, micro_batch_loss, shard_micro_batch
from spell_core.distributed.process_groups import Topology
from spell_core.training.trainer import TrainerOptions, plan_micro_batches
from tests.core.test_distributed import OPTIONS, check_distributed_step, make_batch, run_ranks, tiny_model

CP_TOLERANCE = 1e-6  # relative, loss and gradient norm
CP_WEIGHT_TOLERANCE = 1e-5  # x lr
FP32_TOLERANCE = 1e-5  # a float32 model: single-process and distributed both in fp32
FP32_WEIGHT_TOLERANCE = 1e-4


@pytest.mark.parametrize("world_size, cp, agg, dtype, shared_prefix", [
    (2, 2, "token-mean", torch.float64, True),
    (4, 4, "token-mean", torch.float64, True),
    (2, 2, "seq-mean-token-mean", torch.float64, True),
    (2, 2, "token-mean", torch.float64, False),  # every answer its own copy of the prompt
    (4, 2, "token-mean", torch.float32, True),  # DP 2 x CP 2; fp32 takes FSDP2's other reduction path
])
def test_context_parallel_step_and_checkpoints_equal_single_process(tmp_path, world_size, cp, agg, dtype,
                                                                    shared_prefix):
    options = {**OPTIONS, "agg": agg, "shared_prefix": shared_prefix}
    fp32 = dtype == torch.float32
    ranks, _, shares = check_distributed_step(tmp_path, world_size, cp, options, dtype=dtype,
                                              weight_tol=FP32_WEIGHT_TOLERANCE if fp32 else CP_WEIGHT_TOLERANCE,
                                              rel=FP32_TOLERANCE if fp32 else CP_TOLERANCE)
    # every CP rank trained on the union of its group's trajectories (gather_for_context_parallel)
    for rank, result in enumerate(ranks):
        group = range(rank // cp * cp, rank // cp * cp + cp)
        assert result["trained"] == sum(len(shares[r]) for r in group)


# ---- zigzag shards of a micro-batch (one process) ------------------------------------------------

def plain_micro_batch():
    return plan_micro_batches(make_batch(5), 1000, shared_prefix=False)[0]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_loss_row_is_scored_once_from_the_right_token(world_size):
    mb = plain_micro_batch()
    lengths = mb.layout.cu_seqlens.diff().tolist()
    scored = []
    for rank in range(world_size):
        shard = shard_micro_batch(mb, rank, world_size)
        # each sequence: a multiple of 2 x world_size tokens, 1 / world_size of them here
        multiple = 2 * world_size
        padded = [-(-n // multiple) * multiple for n in lengths]
        assert shard.cu_seqlens.diff().tolist() == [n // world_size for n in padded]
        assert shard.max_seqlen == max(padded) // world_size
        # the hidden row scored for a loss row holds the token that predicts it, at its global position
        torch.testing.assert_close(shard.input_ids[shard.hidden_rows], mb.input_ids[mb.pred_rows[shard.loss_rows]])
        torch.testing.assert_close(shard.position_ids[shard.hidden_rows],
                                   mb.layout.position_ids[mb.pred_rows[shard.loss_rows]])
        scored += shard.loss_rows.tolist()
    assert sorted(scored) == list(range(mb.targets.numel()))


def short_micro_batch():
    """One sequence [prompt 3 + response 3]."""
    return plan_micro_batches([Trajectory("responder", [10, 11, 12], [13, 14, 15], [-1.0] * 3, 1.0)], 100)[0]


def test_zigzag_chunks_by_hand():
    """One sequence [prompt 3 + response 3] on 2 ranks: padded to 8, chunks of 2; rank 0 holds
    chunks 0 and 3 (positions 0, 1 and two pads), rank 1 chunks 1 and 2 (positions 2..5)."""
    mb = short_micro_batch()
    shards = [shard_micro_batch(mb, r, 2) for r in range(2)]
    assert [s.cu_seqlens.tolist() for s in shards] == [[0, 4], [0, 4]]
    assert shards[0].position_ids.tolist()[:2] == [0, 1] and shards[1].position_ids.tolist() == [2, 3, 4, 5]
    assert shards[0].input_ids.tolist()[:2] == [10, 11] and shards[1].input_ids.tolist() == [12, 13, 14, 15]
    # rows predicting 13, 14, 15 are the tokens 12, 13, 14 at positions 2, 3, 4: all on rank 1
    assert shards[0].loss_rows.numel() == 0 and shards[1].loss_rows.tolist() == [0, 1, 2]
    assert shards[1].hidden_rows.tolist() == [0, 1, 2]


def _short_sequence_scenario(topology):
    model = tiny_model()
    trainer = SimpleNamespace(topology=topology, options=TrainerOptions(**OPTIONS), model=model,
                              device=torch.device("cpu"), autocast=False)
    loss, stats = micro_batch_loss(trainer, short_micro_batch(), global_count=3)
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "num_tokens": int(stats["num_tokens"]), "grads": grads}


def test_a_rank_without_loss_rows_still_joins_the_backward(tmp_path):
    """Rank 0 holds no loss row of the short sequence (see test_zigzag_chunks_by_hand): its zero
    loss must still backpropagate (the ring's backward is collective), and the two ranks'
    gradients add up to the single-process ones."""
    ranks = run_ranks(2, _short_sequence_scenario, tmp_path, cp=2)
    assert [r["num_tokens"] for r in ranks] == [0, 3]
    assert ranks[0]["loss"].item() == 0.0

    model, mb, opts = tiny_model(), short_micro_batch(), TrainerOptions(**OPTIONS)
    hidden = model.forward_hidden(mb.input_ids, mb.layout.cu_seqlens, mb.layout.position_ids)
    loss, _ = spell_kernels.policy_loss(
        hidden[mb.pred_rows], model.lm_head_weight, mb.targets, mb.old_logprobs, mb.advantages,
        torch.ones_like(mb.targets, dtype=torch.bool), clip_low=opts.clip_low, clip_high=opts.clip_high,
        dual_clip=opts.dual_clip, temperature=opts.temperature, global_count=3)
    loss.backward()
    assert float(ranks[0]["loss"] + ranks[1]["loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, rtol=1e-6, atol=1e-12,
                                   msg=name)
    assert float(ranks[0]["grads"]["model.embed_tokens.weight"].abs().sum()) > 0  # rank 0's K/V got gradients


@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_prefix_shards_hold_each_prompt_once(world_size):
    """A shared-prefix micro-batch keeps its segments: the ranks together hold every token once
    (plus each segment's padding to 2 x world_size), and every loss row is scored once, from the
    hidden row of the token that predicts it."""
    mb = plan_micro_batches(make_batch(5), 1000, shared_prefix=True)[0]
    assert mb.has_groups
    segments = mb.layout.cu_seqlens.diff().tolist()
    multiple = 2 * world_size
    scored = []
    for rank in range(world_size):
        shard = shard_micro_batch(mb, rank, world_size)
        assert shard.input_ids.numel() == sum(-(-n // multiple) * multiple for n in segments) // world_size
        assert shard.plan is not None and shard.plan.cu_seqlens.tolist() == shard.cu_seqlens.tolist()
        torch.testing.assert_close(shard.input_ids[shard.hidden_rows], mb.input_ids[mb.pred_rows[shard.loss_rows]])
        torch.testing.assert_close(shard.position_ids[shard.hidden_rows],
                                   mb.layout.position_ids[mb.pred_rows[shard.loss_rows]])
        scored += shard.loss_rows.tolist()
    assert sorted(scored) == list(range(mb.targets.numel()))
    # far fewer tokens than the plain packing, where every response repeats its prompt
    plain = plan_micro_batches(make_batch(5), 1000, shared_prefix=False)[0]
    assert mb.input_ids.numel() < plain.input_ids.numel()


def test_ring_attention_of_one_rank_is_the_model_default():
    model = tiny_model()
    mb = plain_micro_batch()
    shard = shard_micro_batch(mb, 0, 1)
    with torch.no_grad():
        ring = model.forward_hidden(shard.input_ids, shard.cu_seqlens, shard.position_ids,
                                    attn=RingAttention(shard.cu_seqlens, shard.max_seqlen))
        plain = model.forward_hidden(mb.input_ids, mb.layout.cu_seqlens, mb.layout.position_ids)
    # world size 1 pads every sequence to an even length: compare the real tokens' rows
    torch.testing.assert_close(ring[shard.hidden_rows], plain[mb.pred_rows[shard.loss_rows]], rtol=1e-12, atol=1e-12)


def test_folded_advantages_give_the_seq_mean_token_mean_loss():
    """The kernel's own seq-mean-token-mean == token-mean over the sequence count with A / length."""
    mb = plain_micro_batch()
    g = torch.Generator().manual_seed(0)
    n, sequences = mb.targets.numel(), mb.resp_cu_seqlens.numel() - 1
    hidden = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(61, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(n, dtype=torch.bool)
    common = dict(clip_low=0.2, clip_high=0.28, temperature=0.7, global_count=sequences)
    loss, _ = spell_kernels.policy_loss(hidden, weight, mb.targets, mb.old_logprobs, mb.advantages, mask,
                                        agg="seq-mean-token-mean", cu_seqlens=mb.resp_cu_seqlens, **common)
    grads = torch.autograd.grad(loss, (hidden, weight))
    folded = _token_weighted_advantages(mb, "seq-mean-token-mean")
    loss2, _ = spell_kernels.policy_loss(hidden, weight, mb.targets, mb.old_logprobs, folded, mask, agg="token-mean",
                                         **common)
    grads2 = torch.autograd.grad(loss2, (hidden, weight))
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert _token_weighted_advantages(mb, "token-mean") is mb.advantages


def test_dynamic_rope_is_refused_under_context_parallelism():
    model = tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    trainer = SimpleNamespace(topology=Topology(world_size=2, cp=2), options=None, model=model)
    with pytest.raises(ValueError, match="dynamic-NTK RoPE"):
        micro_batch_loss(trainer, plain_micro_batch(), 10)
