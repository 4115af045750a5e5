"""Which (cluster, task type) pairs a generation round asks, as the method's released data
loader draws them (SPEC.md, "Questioner"; docs/fidelity.md).

Once per run, the clusters of each source (here: the clusters that share one tuple of task
types, e.g. the web clusters that take doc_qa and doc_mc) are shuffled and split between that
source's task types (`numpy.array_split` sizes: the first `len % k` parts one larger), so a
cluster is asked one task type only. Each round then asks the same number of questions of
every task type (480 / 3 = 160 at SPEC scale; the remainder to the first types), each type
drawing its clusters without replacement from its own shuffled pool: a pool with fewer
clusters left than the round needs is reshuffled whole first (its leftovers skipped, as
released), and a pool smaller than one round's share is cycled through (the released loader
cannot run in that case). The round's picks are shuffled together.

Exception to the released split, for small corpora: a source with fewer clusters than task
types gives every one of its types all of its clusters (released, some types would get none).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from spell_core.roles import TASK_TYPES


def split_sizes(n: int, parts: int) -> list[int]:
    """numpy.array_split's part sizes: n // parts each, the first n % parts one larger."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class TaskMix:
    """The per-task cluster pools and their draw order; `draw(n)` gives one round's picks."""

    def __init__(self, clusters: Sequence, rng: random.Random):
        self.rng = rng
        self.by_id = {c.id: c for c in clusters}
        sources: dict[tuple[str, ...], list] = {}
        for c in clusters:
            sources.setdefault(tuple(getattr(c, "tasks", TASK_TYPES)), []).append(c.id)
        self.pools: dict[str, list[str]] = {}
        for tasks, ids in sources.items():
            ids = list(ids)
            rng.shuffle(ids)
            if len(ids) < len(tasks):  # small corpus: share rather than leave a type without clusters
                for task in tasks:
                    self.pools.setdefault(task, []).extend(ids)
                continue
            start = 0
            for task, size in zip(tasks, split_sizes(len(ids), len(tasks))):
                self.pools.setdefault(task, []).extend(ids[start:start + size])
                start += size
        self.tasks = [t for t in TASK_TYPES if self.pools.get(t)]
        self.queues: dict[str, list[str]] = {t: [] for t in self.tasks}

    def _refill(self, task: str) -> None:
        queue = list(self.pools[task])
        self.rng.shuffle(queue)
        self.queues[task] = queue

    def _take(self, task: str, count: int) -> list[str]:
        if len(self.queues[task]) < count:
            self._refill(task)
        taken = []
        while count > 0:
            part = self.queues[task][:count]
            self.queues[task] = self.queues[task][count:]
            taken += part
            count -= len(part)
            if count:
                self._refill(task)
        return taken

    def draw(self, n: int) -> list[tuple[object, str]]:
        """n (cluster, task type) picks: n // T per task type (the first n % T types one more),
        clusters without replacement from each type's pool, shuffled together."""
        picks = []
        for task, count in zip(self.tasks, split_sizes(n, len(self.tasks))):
            picks += [(self.by_id[cid], task) for cid in self._take(task, count)]
        self.rng.shuffle(picks)
        return picks

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"pools": self.pools, "queues": self.queues, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        self.pools = {t: list(ids) for t, ids in state["pools"].items()}
        self.tasks = [t for t in TASK_TYPES if self.pools.get(t)]
        self.queues = {t: list(state["queues"].get(t, [])) for t in self.tasks}
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
