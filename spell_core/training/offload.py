"""Host offload while sampling: the training state the sampler never reads waits in host memory.

    with offload_while_sampling(trainer, "all") as moved:   # Trainer.sampling_phase()
        result = play.step()                                  # the sampler has the GPU to itself
    trainer.train_step(result.trajectories)                   # everything is back where it was

Between two updates the sampler reads only the model's compute-dtype weights (one process: the
bf16 model; FSDP2: the bf16 copy every rank gathers), but AdamW's two moments and the fp32 weights
stay resident beside them (gradients are already freed after each update). For a model whose
sampler does not fit beside that state (Qwen3-30B-A3B on 80 GB GPUs: `python -m spell_core.plan`),
`what` moves:
  "moments"  every tensor of the optimizer state but AdamW's step counters (exp_avg, exp_avg_sq);
  "all"      the moments, and the fp32 weights: one process, the fp32 master copies of a half
             model (spell_core/training/master_weights.py; an fp32 model's weights are what the
             sampler reads and stay); FSDP2, each rank's fp32 shard, moved after the all-gather
             that reads it and brought back after the gathered copy is freed, so the device
             never holds the gathered copy and the shard at once.
Each storage is copied whole (views and FSDP2's padding included) into host memory, pinned when
CUDA is there, and the device storage is resized to nothing; coming back it is allocated again
and copied into, so every tensor object (the optimizer's parameters, FSDP2's views, the state
dict's entries) is the same object with the same bytes: a run with offload is bitwise the run
without (tests/core/test_offload.py).
"""
from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["HostCopies", "optimizer_state_tensors", "offload_while_sampling", "OFFLOAD_LEVELS"]

OFFLOAD_LEVELS = ("off", "moments", "all")


class HostCopies:
    """The storages of some tensors, moved to host memory (`to_host`) and back (`to_device`).
    A storage shared by several tensors (a view, FSDP2's padded shard) is moved once; one that
    cannot be resized (memory-mapped from a file) stays where it is and is counted in `kept_bytes`."""

    def __init__(self, tensors):
        self._storages: dict[int, torch.UntypedStorage] = {}
        self.kept_bytes = 0
        for t in tensors:
            if hasattr(t, "to_local"):  # a DTensor (FSDP2's parameters and their AdamW state): its shard
                with torch.no_grad():
                    t = t.to_local()
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._storages or storage.nbytes() == 0:
                continue
            if not storage.resizable():
                self.kept_bytes += storage.nbytes()
                continue
            self._storages[key] = storage
        self._host: list[tuple[torch.UntypedStorage, torch.Tensor]] = []

    @property
    def moved_bytes(self) -> int:
        return sum(host.numel() for _, host in self._host)

    @torch.no_grad()
    def to_host(self) -> None:
        if self._host:
            raise RuntimeError("HostCopies.to_host: already in host memory")
        pin = torch.cuda.is_available()
        on_cuda = False
        for storage in self._storages.values():
            on_cuda = on_cuda or storage.device.type == "cuda"
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu",
                               pin_memory=pin and storage.device.type == "cuda")
            host.copy_(_bytes_of(storage), non_blocking=True)
            self._host.append((storage, host))
        if on_cuda:  # the copies are complete before the device memory can be handed to anything else
            torch.cuda.synchronize()
        for storage, _ in self._host:
            storage.resize_(0)

    @torch.no_grad()
    def to_device(self) -> None:
        """Allocate every storage again and copy its bytes back (stream-ordered: what runs next on
        the device sees them; the pinned buffers go back to torch's host cache once copied)."""
        for storage, host in self._host:
            storage.resize_(host.numel())
            _bytes_of(storage).copy_(host, non_blocking=True)
        self._host = []


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state but the per-parameter step counters (a scalar each)."""
    return [value for state in optimizer.state.values() for key, value in state.items()
            if isinstance(value, torch.Tensor) and key != "step"]


@contextlib.contextmanager
def offload_while_sampling(trainer, what: str = "all"):
    """Inside the block the trainer's optimizer state (and with "all" its fp32 weights) is in host
    memory; it yields a dict that, after the block, holds the bytes moved and the seconds spent
    copying ({} for "off"). A sharded model's weights are gathered for sampling here
    (`sampling_weights`, collective: every rank enters together), so the sampler's own gather
    inside the block finds them gathered."""
    if what not in OFFLOAD_LEVELS:
        raise ValueError(f"offload_while_sampling={what!r} (--offload-while-sampling): expected one of "
                         f"{', '.join(OFFLOAD_LEVELS)}")
    report: dict = {}
    if what == "off":
        yield report
        return
    from spell_core.distributed.sharded_training import is_sharded, sampling_weights

    began = time.perf_counter()
    moments = HostCopies(optimizer_state_tensors(trainer.optimizer))
    sharded = what == "all" and is_sharded(trainer.model)
    weights = HostCopies(_fp32_weights(trainer, sharded) if what == "all" else [])
    copying = 0.0
    try:
        moments.to_host()
        gathered = sampling_weights(trainer.model) if sharded else contextlib.nullcontext()
        try:
            with gathered:  # the all-gather reads the fp32 shard: it moves after
                weights.to_host()
                copying = time.perf_counter() - began
                report["offload_bytes"] = moments.moved_bytes + weights.moved_bytes
                yield report
                back = time.perf_counter()
        finally:  # after the gathered copy is freed
            weights.to_device()
    finally:
        moments.to_device()
    report["offload_s"] = copying + time.perf_counter() - back


def _fp32_weights(trainer, sharded: bool) -> list[torch.Tensor]:
    """What the optimizer steps that the sampler does not read: FSDP2's local fp32 shards, or one
    process's fp32 master copies (none for an fp32 model: its weights are the sampler's)."""
    if sharded:
        return list(trainer.params)  # DTensors: HostCopies moves their local shards
    model_params = {id(p) for p in trainer.model.parameters()}
    return [p for p in trainer.params if id(p) not in model_params]
