"""The cross-rank rollback (spell_core/common/guards.py, `all_ranks`) on two forked gloo ranks with FSDP2
shards: an update that leaves a NaN in rank 1's shard only is rolled back on both ranks, to the
weights and AdamW state from before it, compared element by element with a copy saved before
the step (the oracle: what the tensors were, not another run of the code)."""
import math

import torch

from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.test_distributed import OPTIONS, make_batch, run_ranks, split_groups, tiny_model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state(trainer):
    """Every parameter's local shard and AdamW state (step, exp_avg, exp_avg_sq), cloned."""
    weights = [_local(p).detach().clone() for p in trainer.params]
    adam = [{k: _local(v).detach().clone() if torch.is_tensor(v) else v for k, v in trainer.optimizer.state[p].items()}
            for p in trainer.params]
    return weights, adam


def nan_on_rank_1_scenario(topology, batches):
    """Step 1 trains normally (AdamW state exists); before step 2 both ranks save a copy of their
    shards and state; rank 1's optimizer step then writes one NaN into its shard of the first
    parameter. Returns the copies, the state after step 2, the full weights and the metrics."""
    model = tiny_model()
    trainer = Trainer(model, TrainerOptions(**OPTIONS, rollback_snapshot=True, max_rollbacks=3), topology)
    first = trainer.train_step(batches[0][topology.rank])
    before = _state(trainer)
    full_before = [_full(p).detach().clone() for p in trainer.params]
    real_step = trainer.optimizer.step

    def step_leaving_a_nan_on_rank_1(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if topology.rank == 1:
            with torch.no_grad():
                _local(trainer.params[0]).view(-1)[0] = math.nan
        return out

    trainer.optimizer.step = step_leaving_a_nan_on_rank_1
    second = trainer.train_step(batches[1][topology.rank])
    after = _state(trainer)
    full_after = [_full(p).detach().clone() for p in trainer.params]
    local_nan = bool(torch.isnan(_local(trainer.params[0])).any())
    return {"first": first, "second": second, "before": before, "after": after, "full_before": full_before,
            "full_after": full_after, "consecutive": trainer.guard.consecutive, "nan": local_nan,
            "shard_numel": _local(trainer.params[0]).numel(), "numel": trainer.params[0].numel()}


def test_a_nan_in_rank_1s_shard_rolls_both_ranks_back_to_their_saved_weights_and_adamw_state(tmp_path):
    batches = [split_groups(make_batch(1), 2), split_groups(make_batch(2), 2)]
    ranks = run_ranks(2, nan_on_rank_1_scenario, tmp_path, batches)
    for rank, r in enumerate(ranks):
        assert not r["first"]["skipped"], r["first"]
        assert r["second"]["skipped"] and r["second"]["rolled_back"], (rank, r["second"])
        assert r["consecutive"] == 1 and not r["nan"]
        assert r["shard_numel"] < r["numel"]  # FSDP2 shards: each rank holds part of the parameter
        (weights_before, adam_before), (weights_after, adam_after) = r["before"], r["after"]
        assert len(weights_after) == len(weights_before) > 0
        for i, (w0, w1) in enumerate(zip(weights_before, weights_after)):
            assert torch.equal(w0, w1), f"rank {rank}: parameter {i} differs from before the step"
        for i, (s0, s1) in enumerate(zip(adam_before, adam_after)):
            assert s0.keys() == s1.keys() == {"step", "exp_avg", "exp_avg_sq"}, (rank, i)
            assert float(s0["step"]) == float(s1["step"]) == 1, (rank, i)  # step 2 undone
            assert torch.equal(s0["exp_avg"], s1["exp_avg"]) and torch.equal(s0["exp_avg_sq"], s1["exp_avg_sq"])
            assert bool(s0["exp_avg"].abs().sum() > 0), (rank, i)  # a real state, not zeros compared with zeros
    # the whole (gathered) model is the same on both ranks, and the one from before step 2
    for full0, full1, before in zip(ranks[0]["full_after"], ranks[1]["full_after"], ranks[0]["full_before"]):
        assert torch.equal(full0, full1) and torch.equal(full0, before)
