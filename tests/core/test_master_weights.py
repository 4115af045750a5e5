"""fp32 master weights: a model held in bf16 must train as if its weights were fp32.

The oracle is the same trainer step on an fp32 copy of the bf16 weights (the same values): at lr
2e-6 AdamW's first step moves every weight by about 2e-6, far below half a bf16 ulp of these
weights (~2e-4 at magnitude 0.1), so a step that updates the bf16 weights in place keeps none of
it, while the fp32 master weights must keep the reference's update up to the rounding of the
bf16 forward / backward."""
import copy

import torch

from spell_core.training.master_weights import MasterWeights
from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.test_trainer import TEMPERATURE, synthetic_batch, tiny_models

LR = 2e-6


def _step_bf16_and_fp32_reference(steps: int = 1, lr: float = LR):
    hf, ours = tiny_models(dtype=torch.float32)
    trajectories = synthetic_batch(hf)
    model = ours.to(torch.bfloat16)  # as load_pretrained gives it on CUDA: the checkpoint's bf16
    reference = copy.deepcopy(model).float()  # the very same weight values, in fp32
    start = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    options = TrainerOptions(lr=lr, temperature=TEMPERATURE, micro_batch_tokens=24)  # several micro-batches
    reference_trainer, trainer = Trainer(reference, options), Trainer(model, options)
    for _ in range(steps):
        assert not reference_trainer.train_step(trajectories)["skipped"]
        assert not trainer.train_step(trajectories)["skipped"]
    names = [name for name, _ in model.named_parameters()]
    stepped = dict(zip(names, trainer.optimizer.param_groups[0]["params"]))  # what the optimizer updates
    return model, reference, start, stepped


def test_one_step_at_lr_2e_6_moves_bf16_weights_as_the_fp32_reference_does():
    model, reference, start, stepped = _step_bf16_and_fp32_reference()
    ref = dict(reference.named_parameters())
    for name, w0 in start.items():
        ref_delta = ref[name].detach().double() - w0.double()
        delta = stepped[name].detach().double() - w0.double()
        assert float(ref_delta.abs().max()) < 3 * LR  # the reference step is the tiny one the test is about
        moved = ref_delta != 0  # not the embedding rows of unused tokens: weight decay alone is below an fp32 ulp
        # Adam's first step is about lr * sign(gradient): the two differ only where the bf16 forward / backward
        # flipped the sign of a tiny gradient (about 3 % of the weights here); everywhere else within 1 %
        same = (delta[moved] - ref_delta[moved]).abs() <= 0.01 * ref_delta[moved].abs()
        assert float(same.double().mean()) > 0.9, \
            f"{name}: only {float(same.double().mean()):.1%} of the reference's update kept (rounded away?)"
        assert stepped[name].dtype == torch.float32, f"{name}: the optimizer steps {stepped[name].dtype} weights"
    for name, p in model.named_parameters():  # the model the sampler reads: the master weights, rounded
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), stepped[name].detach().to(torch.bfloat16)), name


def test_updates_below_half_an_ulp_add_up_in_the_model_weights():
    """Three steps at lr 2e-5 (each still below half a bf16 ulp, ~2.4e-4 at magnitude 0.1) move a
    weight by ~6e-5: some of the bf16 weights must now have moved, as the rounded fp32 reference's did."""
    model, reference, start, stepped = _step_bf16_and_fp32_reference(steps=3, lr=2e-5)
    ref = dict(reference.named_parameters())
    moved = agree = total = 0
    for name, p in model.named_parameters():
        changed = p.detach().float() != start[name]
        expected = ref[name].detach().to(torch.bfloat16).float() != start[name]
        moved += int(changed.sum())
        agree += int((changed == expected).sum())
        total += changed.numel()
    assert moved > 0.02 * total, f"only {moved} of {total} bf16 weights moved in 3 steps"
    assert agree > 0.97 * total, f"{agree} of {total} agree with the fp32 reference on which weights moved"


def test_fp32_parameters_are_stepped_as_they_are():
    _, ours = tiny_models(dtype=torch.float32)
    master = MasterWeights(list(ours.parameters()))
    assert not master.active and master.bytes() == 0
    assert all(a is b for a, b in zip(master.params, ours.parameters()))


def test_gradients_are_summed_in_fp32_over_micro_batches():
    """Two backward passes: the fp32 gradient is the sum of the two bf16 gradients, each freed
    from the bf16 parameter as soon as it was added."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    master = MasterWeights([w])
    (w * torch.tensor([1.0, 1e-3], dtype=torch.bfloat16)).sum().backward()
    assert w.grad is None
    (w * torch.tensor([1.0, 1e-3], dtype=torch.bfloat16)).sum().backward()
    g = master.params[0].grad
    assert g.dtype == torch.float32
    one_e_3 = float(torch.tensor(1e-3, dtype=torch.bfloat16))
    assert g.tolist() == [2.0, 2 * one_e_3]


def test_weights_loaded_into_the_model_become_the_master_weights():
    """A resume loads the checkpoint's bf16 weights into the model (train_state.load): the optimizer
    must then step from them, not from the fp32 weights it held before."""
    _, ours = tiny_models(dtype=torch.float32)
    model = ours.to(torch.bfloat16)
    trainer = Trainer(model, TrainerOptions(lr=LR, temperature=TEMPERATURE))
    loaded = {name: torch.full_like(t, 0.5) for name, t in model.state_dict().items()}
    model.load_state_dict(loaded)
    assert all(bool((p == 0.5).all()) for p in trainer.optimizer.param_groups[0]["params"])


def test_a_second_trainer_on_the_same_model_gets_the_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    first, second = MasterWeights([w]), MasterWeights([w])
    (3 * w).sum().backward()
    assert first.params[0].grad is None and second.params[0].grad.tolist() == [3.0, 3.0]
