"""Data parallel self-play: FSDP2 training state, rollouts spread over ranks, exact cross-rank sums.

Training state. `shard_model` applies FSDP2 (`torch.distributed.fsdp.fully_shard`) to every
decoder layer and to the whole model over all ranks of the world (the ranks of a
context-parallel group hold the same weights, so they shard them like any other ranks).
Gradients are summed, not averaged: every rank's loss is already its share of one token-mean
over the whole step (`global_count` is all-reduced), so the sum is the single-process gradient.
FSDP2 runs on CPUs with gloo too (torch >= 2.6), which is how the tests check it.

Rollouts. Every rank samples its own share (`rollout_share`) of each round's questions and of
the kept responder groups, from its own share of the document clusters (`shard_clusters`), with
weights gathered once per step (`sampling_weights`: no collective inside generation, so ranks
may generate different lengths). A question's whole group (its G answers and their verdicts)
stays on the rank that generated it, which computes its rewards and GRPO advantages; only the
questioner's batch normalisation per task type spans ranks, made exact by an all-gather of the
questioner rewards (`normalise_questioner_advantages`). The ranks of one CP group then train on
the union of their trajectories (`gather_for_context_parallel`).

Checkpoints keep one history memory: the union of the ranks' (their clusters are disjoint), and
rank 0's random state; on resume every rank derives its own generator from it (sampling is
deterministic for a given world size, not across world sizes).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random

import torch
import torch.distributed as dist

import spell_kernels
from spell_core.batch import Trajectory
from spell_core.distributed import Topology

__all__ = ["shard_model", "is_sharded", "sampling_weights", "rollout_share", "shard_clusters", "rank_run_config",
           "normalise_questioner_advantages", "gather_for_context_parallel", "merged_self_play_state",
           "self_play_state_for_rank", "self_play_for_rank", "DistributedSelfPlay", "forward_backward",
           "all_reduce_sum", "agreed"]


# --- training state ------------------------------------------------------------------------------

def shard_model(model, topology: Topology):
    """FSDP2 over all ranks: each decoder layer its own unit, embedding / final norm / head the
    root's. `forward_hidden` (what the trainer and the sampler call) gets FSDP's hooks."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not topology.is_distributed:
        return model
    if is_sharded(model):
        raise ValueError("the model is already sharded (fully_shard was applied before)")
    for layer in model.model.layers:
        fully_shard(layer, mesh=topology.world_mesh)
    fully_shard(model, mesh=topology.world_mesh)
    register_fsdp_forward_method(model, "forward_hidden")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already normalised globally
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def sampling_weights(model):
    """Every rank holds the full weights inside this block (one all-gather on entry), so that
    each can run its own generation with no collective per forward. Collective: every rank
    enters and leaves together. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's defaults: the root keeps its weights (the head) after forward, the layers free theirs
            unit.set_reshard_after_forward(unit is not model, recurse=False)


# --- rollouts ----------------------------------------------------------------------------------

def rollout_share(total: int, rank: int, world_size: int) -> int:
    """This rank's part of `total` items split as evenly as possible (the first ranks take the remainder)."""
    return total // world_size + (1 if rank < total % world_size else 0)


def shard_clusters(clusters, rank: int, world_size: int) -> list:
    """Clusters rank, rank + W, rank + 2W, ...: disjoint shares, so the ranks' history memories
    never touch the same cluster. With fewer clusters than ranks, ranks share them round robin
    (their memories then merge by keeping the lowest rank's entries)."""
    clusters = list(clusters)
    if not clusters:
        raise ValueError("no document cluster to share out among the ranks")
    if len(clusters) < world_size:
        return [clusters[rank % len(clusters)]]
    return clusters[rank::world_size]


def rank_run_config(config, rank: int, world_size: int):
    """A copy of the RunConfig for one rank's rollouts: its share of the questions per round and
    of the kept responder groups (at least one each), and a seed of its own."""
    if world_size == 1:
        return config
    loop = dataclasses.replace(config.loop, questions=max(1, rollout_share(config.loop.questions, rank, world_size)),
                               kept_groups=max(1, rollout_share(config.loop.kept_groups, rank, world_size)))
    return dataclasses.replace(config, loop=loop, seed=_rank_seed(config.seed, rank))


def _rank_seed(seed: int, rank: int) -> int:
    return seed if rank == 0 else random.Random(f"spell-rank-seed/{seed}/{rank}").getrandbits(62)


def normalise_questioner_advantages(trajectories: list[Trajectory], group=None, eps: float = 1e-6) -> list[Trajectory]:
    """Set each questioner trajectory's advantage to its reward normalised over the questioner
    samples of its task type on ALL ranks of `group` (SPEC: normalised across the batch's
    questioner samples of the same task type). Collective; single-process equal to
    `group_advantages(rewards, mode="batch")` per task type. Returns `trajectories`."""
    mine = [t for t in trajectories if t.role == "questioner"]
    local = [(t.info.get("task_type"), float(t.reward)) for t in mine]
    everyone = _all_gather_objects(local, group)
    by_type: dict[str, list[float]] = {}
    for items in everyone:
        for task_type, reward in items:
            by_type.setdefault(task_type, []).append(reward)
    rank = dist.get_rank(group) if _initialised(group) else 0
    offset_in_type = {task_type: sum(1 for r in range(rank) for tt, _ in everyone[r] if tt == task_type)
                      for task_type in by_type}
    advantages = {task_type: spell_kernels.group_advantages(torch.tensor(rewards, dtype=torch.float64),
                                                             mode="batch", eps=eps).tolist()
                  for task_type, rewards in by_type.items()}
    for t, (task_type, _) in zip(mine, local):
        t.advantage = advantages[task_type][offset_in_type[task_type]]
        offset_in_type[task_type] += 1
    return trajectories


def gather_for_context_parallel(trajectories: list[Trajectory], topology: Topology) -> list[Trajectory]:
    """The union of the trajectories of this rank's CP group, in CP-rank order: the CP ranks
    train on the same sequences, each holding a shard of every one. Collective within the group."""
    if topology.cp == 1:
        return trajectories
    return [t for part in _all_gather_objects(trajectories, topology.cp_group) for t in part]


def merged_self_play_state(state: dict, group=None) -> dict:
    """One SelfPlay state for a checkpoint from every rank's: the union of the history memories
    (first rank first where two ranks share a cluster), rank 0's random generator and step
    count, and every rank's generator under "rank_rngs". Collective."""
    states = _all_gather_objects(state, group)
    merged = copy.deepcopy(states[0])
    seen = {(q["cluster_id"], q["task_type"]) for q in merged["memory"]["queues"]}
    for other in states[1:]:
        for queue in other["memory"]["queues"]:
            key = (queue["cluster_id"], queue["task_type"])
            if key not in seen:
                seen.add(key)
                merged["memory"]["queues"].append(queue)
    merged["rank_rngs"] = [s["rng"] for s in states]
    return merged


def self_play_state_for_rank(state: dict, rank: int, world_size: int) -> dict:
    """What rank `rank` resumes from a merged state: the whole memory (it only reads its own
    clusters'), and its own generator: the one it saved when the world size is the same, else
    one derived from rank 0's (rank 0 keeps rank 0's)."""
    rngs = state.get("rank_rngs") or []
    if len(rngs) == world_size:
        return {**state, "rng": rngs[rank]}
    if rank == 0:
        return state
    _, internal, _ = state["rng"]
    version, internal, gauss = random.Random(f"spell-rank-rng/{rank}/{internal[:4]}/{internal[-1]}").getstate()
    return {**state, "rng": [version, list(internal), gauss]}


def self_play_for_rank(model, tokenizer, clusters, config, topology: Topology, **kwargs):
    """The self-play of this rank: a `SelfPlay` on all clusters in a single process; on several
    ranks, one on this rank's clusters and share of the questions, wrapped in DistributedSelfPlay."""
    from spell_core.loop import SelfPlay

    if not topology.is_distributed:
        return SelfPlay(model, tokenizer, clusters, config, **kwargs)
    rank, world = topology.rank, topology.world_size
    play = SelfPlay(model, tokenizer, shard_clusters(clusters, rank, world), rank_run_config(config, rank, world),
                    **kwargs)
    return DistributedSelfPlay(play, model, topology)


class DistributedSelfPlay:
    """A `SelfPlay` (built on this rank's clusters and `rank_run_config`) whose steps run every
    rank's rollouts with full weights, normalise the questioner across ranks and hand the CP
    group's union to the trainer. Its state_dict / load_state_dict are collective."""

    def __init__(self, play, model, topology: Topology):
        self.play, self.model, self.topology = play, model, topology

    def __getattr__(self, name):  # observer, should_stop, memory, ... of the wrapped SelfPlay
        return getattr(self.play, name)

    def __setattr__(self, name, value):
        if name in ("play", "model", "topology"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.play, name, value)

    def step(self):
        """One step of every rank's rollouts. A stop request abandons the step on every rank
        (StepAbandoned) as soon as one rank abandoned it: the ranks agree after generation."""
        from spell_core.loop import StepAbandoned

        topo, number = self.topology, self.play.steps_done + 1
        topo.mark(f"sample step {number}")
        abandoned = None
        with sampling_weights(self.model):
            try:
                result = self.play.step()
            except StepAbandoned as err:
                abandoned = err
        topo.mark(f"gather step {number}")
        if agreed(abandoned is not None, topo):
            raise abandoned or StepAbandoned(f"another rank abandoned step {number} (stop requested)")
        normalise_questioner_advantages(result.trajectories, topo.world_group, self.play.options.advantage_eps)
        result.trajectories = gather_for_context_parallel(result.trajectories, topo)
        result.metrics["trajectories_world"] = round(all_reduce_sum(len(result.trajectories) / topo.cp, topo))
        return result

    def state_dict(self) -> dict:
        return merged_self_play_state(self.play.state_dict(), self.topology.world_group)

    def load_state_dict(self, state: dict) -> None:
        self.play.load_state_dict(self_play_state_for_rank(state, self.topology.rank, self.topology.world_size))


# --- the distributed optimizer step's forward / backward -------------------------------------------

def forward_backward(trainer, micro_batches: list, global_count: int):
    """Trainer._forward_backward on a world of ranks. FSDP2 runs collectives in every forward
    and backward, so every rank runs as many micro-batches as the busiest one: the others pad
    with a micro-batch whose advantage is 0 (an exactly zero gradient). A non-finite loss no
    longer stops the loop early (the ranks would fall out of step); its gradient makes the
    global norm non-finite and the update is skipped everywhere. Returns (loss, [stats], finite)
    summed / combined over the world."""
    topo = trainer.topology
    device = trainer.device
    count = torch.tensor([len(micro_batches)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padding = None
    total, stats, finite = 0.0, [], True
    for i in range(int(count.item())):
        real = i < len(micro_batches)
        if real:
            mb = micro_batches[i]
        else:
            padding = padding or _padding_micro_batch(trainer)
            mb = padding
        loss, mb_stats = trainer._micro_batch_loss(mb, global_count)
        value = float(loss.detach())
        finite = finite and math.isfinite(value)
        loss.backward()
        if real:
            total += value
            stats.append(mb_stats)
        elif not stats:
            stats.append({k: torch.zeros_like(v) for k, v in mb_stats.items()})  # the keys, with no tokens
    summed = torch.tensor([total, 0.0 if finite else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return float(summed[0]), [_world_stats(stats, device)], bool(summed[1] == 0)


def _padding_micro_batch(trainer):
    from spell_core.trainer import plan_micro_batches

    ghost = Trajectory("questioner", [0], [0], [0.0], 0.0)
    return plan_micro_batches([ghost], 1 << 30, False, trainer.device)[0]


def _world_stats(stats: list[dict], device) -> dict:
    """The policy-loss statistics of the whole step over every rank's tokens."""
    keys = sorted(k for k in stats[0] if k not in ("num_tokens", "ratio_min", "ratio_max"))
    counts = torch.stack([s["num_tokens"].double() for s in stats])
    sums = torch.stack([torch.stack([s[k].double() for k in keys]) for s in stats]) * counts[:, None]
    buffer = torch.cat([sums.sum(0), counts.sum()[None]]).to(device)
    dist.all_reduce(buffer)
    out = {k: buffer[i] / buffer[-1].clamp(min=1.0) for i, k in enumerate(keys)}
    out["num_tokens"] = buffer[-1]
    for key, op, empty in (("ratio_min", dist.ReduceOp.MIN, math.inf), ("ratio_max", dist.ReduceOp.MAX, -math.inf)):
        values = [s[key].double() for s in stats if s["num_tokens"] > 0]
        local = torch.stack(values).min() if key == "ratio_min" and values else (
            torch.stack(values).max() if values else torch.tensor(empty, dtype=torch.float64))
        local = local.reshape(1).to(device)
        dist.all_reduce(local, op=op)
        out[key] = local[0] if math.isfinite(float(local[0])) else torch.tensor(1.0, dtype=torch.float64)
    return out


# --- small collectives -----------------------------------------------------------------------

def agreed(flag: bool, topology: Topology) -> bool:
    """True on every rank when `flag` is true on any (a stop request, an abandoned step).
    Collective: every rank calls it at the same point."""
    if not topology.is_distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=topology.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] > 0)


def all_reduce_sum(value: float, topology: Topology, group=None) -> float:
    """`value` summed over `group` (default: the world); `value` itself in a single process."""
    if not topology.is_distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=topology.device)
    dist.all_reduce(t, group=group)
    return float(t[0])


def _initialised(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is not None or dist.get_world_size() > 1)


def _all_gather_objects(obj, group=None) -> list:
    if not _initialised(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
