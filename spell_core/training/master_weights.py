"""fp32 master weights for a model that computes in half precision (bf16 / fp16).

    master = MasterWeights(trainer_params)      # fp32 copies of the half-precision parameters
    optimizer = AdamW(master.params, ...)       # AdamW steps the fp32 copies; its moments are fp32
    ... backward ...                            # each half gradient is added into an fp32 one, then freed
    master.take_gradients(); optimizer.step()
    master.copy_to_model()                      # the model's bf16 weights = round(fp32 weights)

Why. AdamW at lr 2e-6 moves a weight by about 2e-6 per step; a bf16 weight of magnitude 1e-2 has
half an ulp of about 3e-5, so updated in place nearly every update rounds away and the run trains
almost nothing, silently. The fp32 copy keeps every update; the model's bf16 weights follow it
once the sum of the updates crosses a rounding boundary (as verl, TRL and torchtitan do: fp32
master weights, bf16 compute).

Design, by memory and speed (the alternative: an fp32 model computing under bf16 autocast, with a
bf16 copy for the sampler). Both hold 18 bytes per parameter: here bf16 weights (2) + fp32 master
weights (4), fp32 gradients (4) and AdamW's two fp32 moments (8); there fp32 weights (4), fp32
gradients (4), the moments (8) and the sampler's bf16 copy (2). This layout was chosen because
  - the model everything else reads stays bf16: the sampler, the CUDA-graph decoder (its captured
    weight addresses stay valid: the copy back is in place), the KV cache dtype, the saved
    checkpoint and the memory plan's sampling phase are unchanged; no weight is cast per forward
    (autocast casts every fp32 weight again for each micro-batch, and a sampler reading fp32 weights
    under autocast would move 4 bytes per weight per decoded token instead of 2);
  - the trainer's forward uses the very bf16 weights the sampler sampled with, so the PPO ratio
    compares log-probs of one model (an autocast forward would use round(fp32) = the same values,
    but the head would then score in fp32 weights the sampler never saw);
  - gradients are still summed in fp32 across micro-batches: a post-accumulate-grad hook adds each
    bf16 gradient into the fp32 one and frees it as soon as backward produces it, so at most one
    tensor's bf16 gradient is alive beside the fp32 ones.
This class serves one process. Under FSDP2 (several ranks) `sharded_training.shard_model` instead
shards the model as fp32 and gathers it in bf16 for compute (MixedPrecisionPolicy, gradients
reduced in fp32): the same fp32 master weights and bf16 compute, in FSDP2's own terms; the
parameters the Trainer sees are then fp32 and this class keeps no copy. `take_gradients` still
folds in any half gradient set without the autograd hook.
The cost: one fp32 -> bf16 copy of the weights per optimizer step (6 bytes per weight, about a
millisecond per billion parameters on an H100). fp32 parameters are used as they are (no copy).

A checkpoint stores the model's bf16 weights (HF format) and the optimizer's moments; on resume the
master weights are the loaded bf16 weights again (`refresh_from_model`), so what the fp32 copy held
below half a bf16 ulp is dropped once per resume, never per step.
"""
from __future__ import annotations

import torch

__all__ = ["MasterWeights", "HALF_DTYPES"]

HALF_DTYPES = (torch.bfloat16, torch.float16)


class MasterWeights:
    """The tensors an optimizer should step for `params`: an fp32 copy of each half-precision
    parameter (with an fp32 .grad), the parameter itself otherwise."""

    def __init__(self, params: list[torch.Tensor]):
        self.model_params = list(params)
        self.params: list[torch.Tensor] = []
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (half model parameter, fp32 master)
        for p in self.model_params:
            if p.dtype in HALF_DTYPES:
                master = torch.nn.Parameter(p.detach().float().clone(), requires_grad=True)
                self._pairs.append((p, master))
                self.params.append(master)
                _attach(p, master)
            else:
                self.params.append(p)

    @property
    def active(self) -> bool:
        """True when some parameter is half precision (there are fp32 copies to keep)."""
        return bool(self._pairs)

    def bytes(self) -> int:
        """Bytes of the fp32 copies and their fp32 gradients (what this adds to a model + AdamW)."""
        return sum(2 * m.numel() * m.element_size() for _, m in self._pairs)

    @torch.no_grad()
    def take_gradients(self) -> None:
        """Add what is left in the half parameters' .grad (FSDP2 sets sharded gradients without
        the autograd hook) into the fp32 gradients, and free it."""
        for p, master in self._pairs:
            _fold(p, master)

    def zero_grad(self) -> None:
        for p, master in self._pairs:
            p.grad = None
            master.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's half weights := the fp32 weights, rounded (in place: addresses stay)."""
        for p, master in self._pairs:
            p.detach().copy_(master.detach())

    @torch.no_grad()
    def refresh_from_model(self) -> None:
        """The fp32 weights := the model's (after weights were loaded into the model)."""
        for p, master in self._pairs:
            master.detach().copy_(p.detach())


def _attach(p: torch.Tensor, master: torch.Tensor) -> None:
    """Gradients of `p` go to `master` from now on: one hook per parameter, whatever number of
    MasterWeights (Trainers) were built on it; the newest one's copy gets them."""
    first = not hasattr(p, "_fp32_master")
    p._fp32_master = master
    if first:
        p.register_post_accumulate_grad_hook(lambda param: _fold(param, param._fp32_master))


@torch.no_grad()
def _fold(p: torch.Tensor, master: torch.Tensor) -> None:
    if p.grad is None:
        return
    grad = p.grad.detach().float()
    if master.grad is None:
        master.grad = grad if grad is not p.grad else grad.clone()
    else:
        master.grad.add_(grad)
    p.grad = None
