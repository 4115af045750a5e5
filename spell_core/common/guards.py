"""Nothing non-finite is saved or silently used.

    names = non_finite(named_tensors)       # names of tensors holding NaN/Inf ([] when all finite)
    guard = UpdateGuard(params, optimizer)  # in the Trainer, around optimizer.step()
    guard.snapshot(); optimizer.step()
    if not guard.check(): ...               # rolled back to the weights and optimizer state before the step

The check is one fused pass: the max-norm (ord=inf) of every tensor at once (torch._foreach_norm),
which is finite exactly when every element is (a NaN anywhere makes it NaN, an Inf makes it Inf)
and, unlike the L2 norm, cannot overflow on large but finite weights.
"""
from __future__ import annotations

import math

import torch

__all__ = ["non_finite", "all_finite", "UpdateGuard", "NonFiniteUpdatesError"]


class NonFiniteUpdatesError(ValueError):
    """Optimizer steps gave non-finite weights: several in a row, each rolled back (restored: the
    weights in memory are those from before them), or one without a snapshot to roll back to
    (restored False: the weights in memory are NaN/Inf and must not be saved)."""

    def __init__(self, message: str, restored: bool = True):
        super().__init__(message)
        self.restored = restored


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _max_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor max |x| (NaN / Inf when it holds one), one fused call per device and dtype."""
    floating = [t for t in tensors if t.is_floating_point() and t.numel() > 0]
    if not floating:
        return torch.zeros(0)
    norms = torch._foreach_norm(floating, math.inf)
    return torch.stack([n.float().cpu() for n in norms]) if len({n.device for n in norms}) > 1 \
        else torch.stack([n.float() for n in norms]).cpu()


@torch.no_grad()
def non_finite(named: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors (DTensors: their local shards) holding a NaN or an Inf."""
    items = [(name, _local(t)) for name, t in (named.items() if isinstance(named, dict) else named)
             if t is not None and _local(t).is_floating_point() and _local(t).numel() > 0]
    if not items:
        return []
    norms = _max_norms([t for _, t in items])
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    return [items[i][0] for i in bad]


@torch.no_grad()
def all_finite(tensors) -> bool:
    """True when no tensor (DTensors: their local shards) holds a NaN or an Inf."""
    local = [_local(t) for t in tensors if t is not None]
    norms = _max_norms(local)
    return bool(torch.isfinite(norms).all())


def describe(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class UpdateGuard:
    """Keeps a copy of the parameters and the optimizer state (on the CPU: no GPU memory) from
    before an optimizer step, and restores it when the step left a parameter non-finite.

    keep_snapshot=False keeps no copy (a CPU run: it would add three times the weights to the only
    memory there is) and only checks: the first non-finite step raises NonFiniteUpdatesError with
    restored=False. The Trainer skips steps on non-finite gradients before this, and clips them, so
    what is left for the guard is rare (an optimizer overflow, a bug)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, max_rollbacks: int = 3,
                 all_ranks=None, keep_snapshot: bool = True):
        """all_ranks: optional callable(bool) -> bool that ANDs a flag over every rank."""
        self.params, self.optimizer = params, optimizer
        self.keep_snapshot = keep_snapshot
        self.max_rollbacks = max_rollbacks
        self.consecutive = 0  # rollbacks in a row
        self.all_ranks = all_ranks
        self._saved: tuple[list[torch.Tensor], dict] | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}  # CPU copies, reused from step to step

    @torch.no_grad()
    def snapshot(self) -> None:
        if not self.keep_snapshot:
            return
        weights = [self._copy(("w", i), p) for i, p in enumerate(self.params)]
        state = {}
        for i, p in enumerate(self.params):
            if p in self.optimizer.state:
                state[i] = {k: self._copy(("s", i, k), v) if torch.is_tensor(v) else v
                            for k, v in self.optimizer.state[p].items()}
        self._saved = (weights, state)

    def _copy(self, key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy (pinned and asynchronous from a GPU: later kernels on the stream wait for it)."""
        src = _local(tensor).detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
            self._buffers[key] = buf
        buf.copy_(src, non_blocking=src.is_cuda)
        return buf

    @torch.no_grad()
    def check(self) -> bool:
        """True when every parameter is finite after the step; otherwise restore the snapshot and
        return False. Raises NonFiniteUpdatesError after max_rollbacks rollbacks in a row."""
        finite = all_finite(self.params)
        if self.all_ranks is not None:
            finite = self.all_ranks(finite)
        if finite:
            self.consecutive = 0
            return True
        if not self.keep_snapshot:
            raise NonFiniteUpdatesError(
                "the optimizer step gave NaN/Inf weights, and no copy of the weights from before it was kept "
                "(--no-rollback-snapshot, the CPU default), so the run stops here without saving them; the last "
                "checkpoint holds the weights before it. Lower --lr, or look at the step's loss and grad norm in "
                "metrics.jsonl; --rollback-snapshot rolls such steps back instead (at the cost of a copy of the "
                "weights and optimizer state)", restored=False)
        self._restore()
        self.consecutive += 1
        if self.consecutive >= self.max_rollbacks:
            raise NonFiniteUpdatesError(
                f"{self.consecutive} optimizer steps in a row gave NaN/Inf weights; each was rolled back, so the "
                "weights are those before the first of them (the checkpoint saved now holds them). The updates "
                "diverge: lower --lr, or look at the step's loss and grad norm in metrics.jsonl")
        return False

    def _restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("UpdateGuard.check without a snapshot before the optimizer step")
        weights, state = self._saved
        for p, saved in zip(self.params, weights):
            _local(p).copy_(saved)  # an ordered copy back: the buffer is only reused at the next snapshot
        for i, p in enumerate(self.params):
            if i not in state:
                self.optimizer.state.pop(p, None)  # the step created it: as if it never ran
                continue
            live = self.optimizer.state[p]
            for k, v in state[i].items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)):
                    _local(live[k]).copy_(v)
                else:
                    live[k] = v.clone() if torch.is_tensor(v) else v  # never the reused buffer itself
