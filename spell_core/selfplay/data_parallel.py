"""Data parallel self-play: rollouts spread over ranks, questioner normalisation across them,
one history memory in checkpoints.

Rollouts. Every rank samples its own share (`rollout_share`) of each round's questions and of
the kept responder groups, from its own share of the document clusters (`shard_clusters`), with
weights gathered once per step (`sampling_weights`: no collective inside generation, so ranks
may generate different lengths). A question's whole group (its G answers and their verdicts)
stays on the rank that generated it, which computes its rewards and GRPO advantages; only the
questioner's batch normalisation per task type spans ranks, made exact by an all-gather of the
questioner rewards (`normalise_questioner_advantages`). The ranks of one CP group then train on
the union of their trajectories (`gather_for_context_parallel`). The training side (FSDP2,
the distributed forward / backward) is spell_core/distributed/sharded_training.py; nothing here imports the
trainer.

Checkpoints keep one history memory: the union of the ranks' (their clusters are disjoint), and
rank 0's random state; on resume every rank derives its own generator from it (sampling is
deterministic for a given world size, not across world sizes).
"""
from __future__ import annotations

import copy
import dataclasses
import random

import torch
import torch.distributed as dist

import spell_kernels
from spell_core.selfplay.batch import Trajectory
from spell_core.distributed.process_groups import Topology, process_group_ready, agreed, all_gather_objects, all_reduce_sum
from spell_core.distributed.sharded_training import sampling_weights

__all__ = ["rollout_share", "shard_clusters", "rank_run_config", "normalise_questioner_advantages",
           "gather_for_context_parallel", "merged_self_play_state", "self_play_state_for_rank", "self_play_for_rank",
           "DistributedSelfPlay"]


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
    everyone = all_gather_objects(local, group)
    by_type: dict[str, list[float]] = {}
    for items in everyone:
        for task_type, reward in items:
            by_type.setdefault(task_type, []).append(reward)
    rank = dist.get_rank(group) if process_group_ready(group) else 0
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
    return [t for part in all_gather_objects(trajectories, topology.cp_group) for t in part]


def merged_self_play_state(state: dict, group=None) -> dict:
    """One SelfPlay state for a checkpoint from every rank's: the union of the history memories
    (first rank first where two ranks share a cluster), rank 0's random generator and step
    count, and every rank's generator under "rank_rngs". Collective."""
    states = all_gather_objects(state, group)
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
    from spell_core.selfplay.loop import SelfPlay

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
        from spell_core.selfplay.loop import StepAbandoned

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


