"""Host offload while sampling (spell_core/training/offload.py): a run that parks AdamW's moments and
the fp32 weights in host memory while it samples ends bitwise where the run without it ends, and
the state really left its storage meanwhile.

The oracle is the same run without offload (weights, fp32 master copies, optimizer state and what
the sampler computed compared with torch.equal). On a CPU, host and device memory are one, so the
mechanism is checked directly: inside the sampling phase every moved storage is empty (its memory
released) and a host buffer at another address holds its bytes; after it, the same tensor objects
hold the same bytes again. With FSDP2 (2 gloo ranks) the fp32 shard moves after the all-gather
that reads it: a gather from a released shard would not reproduce the sampler's forward.
"""
import pytest
import torch

from spell_core.distributed import sharded_training
from spell_core.training import offload
from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.test_distributed import VOCAB, make_batch, run_ranks, split_groups, tiny_model

OPTIONS = dict(lr=1e-2, eps=1e-3, temperature=0.7, micro_batch_tokens=48, grad_clip=1.0)
STEPS = 2  # the first sampling phase has no AdamW state yet; the second moves it and the update reads it back


def bf16_model():
    return tiny_model(seed=0).to(torch.bfloat16)


class Spy:
    """Records every HostCopies that moved to the host, so a test can look at its buffers."""

    def __init__(self, monkeypatch):
        self.copies = []
        to_host = offload.HostCopies.to_host

        def recording(copies):
            to_host(copies)
            self.copies.append(copies)
        monkeypatch.setattr(offload.HostCopies, "to_host", recording)


def run(model, what, spy=None, topology=None):
    """STEPS steps of: sample (a forward of the gathered weights inside the trainer's sampling
    phase, checking what was moved), then train on a fixed batch."""
    trainer = Trainer(model, TrainerOptions(**OPTIONS, offload_while_sampling=what), topology)
    sampled, reports = [], []
    rank = topology.rank if topology is not None else 0
    ids = torch.arange(5 + 3 * rank) % VOCAB
    for step in range(STEPS):
        expected = {}
        if spy is not None:  # the bytes each storage should get back
            spy.copies.clear()
            expected = {id(t): _local(t.detach()).clone() for t in _moved(trainer, what)}
        with trainer.sampling_phase() as report:
            if spy is not None:
                _check_moved(trainer, what, spy, expected, step)
            with sharded_training.sampling_weights(model), torch.inference_mode():  # nested, as the loop does
                sampled.append(model.forward_hidden(ids))
        if spy is not None:
            for t in _moved(trainer, what):  # the same tensor objects, their bytes back
                local = _local(t.detach())
                assert local.untyped_storage().nbytes() > 0 and torch.equal(local, expected[id(t)])
        reports.append(report)
        batch = make_batch(10 + step)
        trainer.train_step(split_groups(batch, topology.world_size)[rank] if topology is not None else batch)
    return trainer, sampled, reports


def _moved(trainer, what):
    tensors = offload.optimizer_state_tensors(trainer.optimizer)
    if what == "all":
        tensors += offload._fp32_weights(trainer, sharded_training.is_sharded(trainer.model))
    return tensors


def _check_moved(trainer, what, spy, expected, step):
    moments = offload.optimizer_state_tensors(trainer.optimizer)
    assert len(moments) == (0 if step == 0 else 2 * len(trainer.params))  # AdamW's state appears at step 1
    sharded = any(hasattr(p, "to_local") for p in trainer.params)  # the model's own are gathered here
    weights = offload._fp32_weights(trainer, sharded) if what == "all" else []
    apart = sharded or trainer.master.active  # fp32 weights the sampler does not read
    assert len(weights) == (len(trainer.params) if what == "all" and apart else 0)
    moments, weights = [_local(t) for t in moments], [_local(t) for t in weights]
    expected = {id(t): expected[key] for t, key in zip(moments + weights, expected)}
    for t in moments + weights:
        assert t.untyped_storage().nbytes() == 0, "a moved tensor still holds its memory"
    buffers = [(storage, host) for copies in spy.copies for storage, host in copies._host]
    assert len(buffers) == len(moments) + len(weights)
    by_storage = {storage._cdata: host for storage, host in buffers}  # released storages all sit at address 0
    for t in moments + weights:
        host = by_storage[t.untyped_storage()._cdata]
        assert host.data_ptr() != expected[id(t)].data_ptr() and host.data_ptr() != 0
        assert host.is_pinned() == (torch.cuda.is_available() and t.is_cuda)  # pinned only with CUDA
        assert torch.equal(host.view(t.dtype)[: t.numel()].view(t.shape), expected[id(t)])
    # what the sampler reads stays: the bf16 model (one process), the gathered weights (FSDP2)
    for p in trainer.model.parameters():
        assert p.untyped_storage().nbytes() > 0


def _local(t):
    """A DTensor's local shard (FSDP2's parameters and their AdamW state), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def assert_same_training_state(a: Trainer, b: Trainer):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        full_p, full_q = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (p, q))
        assert torch.equal(full_p, full_q), name
    for p, q in zip(a.params, b.params):
        assert torch.equal(_local(p.detach()), _local(q.detach()))
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a.params)
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(_local(sa[i][key]), _local(sb[i][key])), (i, key)


def test_one_process_bf16_model_offloads_moments_and_master_weights_bitwise(monkeypatch):
    """A bf16 model: AdamW steps fp32 master copies; "all" parks the moments and those copies while
    the sampler reads the bf16 model, and three steps end bitwise where the run without ends."""
    spy = Spy(monkeypatch)
    plain, plain_sampled, plain_reports = run(bf16_model(), "off")
    moved, moved_sampled, reports = run(bf16_model(), "all", spy)
    assert moved.master.active and all(p.dtype == torch.float32 for p in moved.params)
    assert_same_training_state(plain, moved)
    assert all(torch.equal(x, y) for x, y in zip(plain_sampled, moved_sampled))
    assert plain_reports == [{}] * STEPS
    n = sum(p.numel() for p in moved.params)
    assert [r["offload_bytes"] for r in reports] == [4 * n, 12 * n]  # fp32 copies, then + 2 moments
    assert all(r["offload_s"] >= 0 for r in reports)
    # "moments": the fp32 master copies stay
    moments_only, _, reports = run(bf16_model(), "moments", spy)
    assert_same_training_state(plain, moments_only)
    assert [r["offload_bytes"] for r in reports] == [0, 8 * n]


def test_an_fp32_model_keeps_its_weights_the_sampler_reads(monkeypatch):
    """fp32: the optimizer steps the model's own weights, which the sampler reads; only the moments
    move, even with "all"."""
    spy = Spy(monkeypatch)
    plain = run(bf16_model().float(), "off")[0]
    moved, _, reports = run(bf16_model().float(), "all", spy)
    assert not moved.master.active and offload._fp32_weights(moved, False) == []
    assert_same_training_state(plain, moved)
    assert reports[-1]["offload_bytes"] == 8 * sum(p.numel() for p in moved.params)


def test_a_bad_offload_level_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--offload-while-sampling.*off, moments, all"):
        Trainer(bf16_model(), TrainerOptions(**OPTIONS, offload_while_sampling="yes"))


def test_command_line_and_auto_follow_the_memory_plan():
    from spell_core.cli.run_options import config_from_args, offload_level, trainer_options

    assert trainer_options(*config_from_args(["--device", "cpu"])).offload_while_sampling == "off"
    assert trainer_options(*config_from_args(["--device", "cpu", "--offload-while-sampling", "on"])) \
        .offload_while_sampling == "all"
    moments, shard = "optimizer state (AdamW, 2 moments)", "weights (FSDP2 shard)"
    assert [offload_level("auto", moved) for moved in ([], [moments], [moments, shard])] == ["off", "moments", "all"]
    assert offload_level("on", []) == "all" and offload_level("off", [moments, shard]) == "off"


def sharded_scenario(topology):
    """A bf16 model sharded by FSDP2 (fp32 shards, bf16 gathered): with and without offload."""
    class _Patch:  # a minimal monkeypatch for the rank process
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    original = offload.HostCopies.to_host
    plain, plain_sampled, _ = run(bf16_model(), "off", topology=topology)
    spy = Spy(_Patch())
    moved, moved_sampled, reports = run(bf16_model(), "all", spy, topology)
    offload.HostCopies.to_host = original
    assert_same_training_state(plain, moved)
    return {"sampled_equal": all(torch.equal(x, y) for x, y in zip(plain_sampled, moved_sampled)),
            "offload_bytes": [r["offload_bytes"] for r in reports],
            "shard_elements": sum(p.to_local().numel() for p in moved.params),
            "sharded": sharded_training.is_sharded(moved.model)}


def test_fsdp2_ranks_move_the_fp32_shard_after_the_gather_bitwise(tmp_path):
    ranks = run_ranks(2, sharded_scenario, tmp_path)
    for r in ranks:
        assert r["sharded"] and r["sampled_equal"]
        n = r["shard_elements"]
        # each rank's fp32 shard (FSDP2 pads it: at least n elements), then + 2 moments of the shard
        assert r["offload_bytes"][0] >= 4 * n and r["offload_bytes"][1] >= 12 * n
