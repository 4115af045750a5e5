"""History memory and document curriculum (SPEC.md, "History memory and document curriculum").

Per (cluster, task type) a queue of the last `capacity` (L = 3) questions admitted by the
admission rule on their mean responder reward r̄: "released" (the default, the method's
released code) admits 0.01 <= r̄ <= 1.0, so questions every answer got right enter too;
"paper" (the paper's text) admits 0 < r̄ < 1. The questioner of
that (cluster, task type) sees the documents of those questions plus `new_documents`
(m = 5) documents of the cluster it has not seen in memory yet, in the cluster's order,
so each success grows the context by about m documents.

Clusters are duck-typed: anything with `.id` and `.documents` (each with `.id`).
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

MEMORY_CAPACITY = 3  # L
NEW_DOCUMENTS = 5  # m


@dataclass(frozen=True)
class MemoryEntry:
    evidence_ids: tuple  # ids of the documents the questioner was shown for this question
    question: str
    answer: str
    options: dict[str, str] | None = None  # doc_mc only, shown with the example

    def to_dict(self) -> dict:
        return {"evidence_ids": list(self.evidence_ids), "question": self.question,
                "answer": self.answer, "options": dict(self.options) if self.options else None}

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryEntry":
        return cls(tuple(data["evidence_ids"]), data["question"], data["answer"], data.get("options"))


MEMORY_ADMISSIONS = ("released", "paper")
RELEASED_ADMISSION_LOW = 0.01


def enters_memory(group_reward: float, admission: str = "released") -> bool:
    """Whether a question with mean responder reward `group_reward` enters the memory:
    "released": 0.01 <= r̄ <= 1.0; "paper": 0 < r̄ < 1."""
    if admission == "released":
        return RELEASED_ADMISSION_LOW <= group_reward <= 1.0
    if admission == "paper":
        return 0.0 < group_reward < 1.0
    raise ValueError(f"unknown memory admission rule {admission!r}; expected one of {', '.join(MEMORY_ADMISSIONS)}")


class HistoryMemory:
    def __init__(self, capacity: int = MEMORY_CAPACITY, new_documents: int = NEW_DOCUMENTS,
                 admission: str = "released"):
        if capacity < 0 or new_documents < 1:
            raise ValueError(f"need capacity >= 0 and new_documents >= 1, got {capacity}, {new_documents}")
        enters_memory(0.5, admission)  # an unknown rule fails here, not at the first record
        self.admission = admission
        self.capacity = capacity
        self.new_documents = new_documents
        self._queues: dict[tuple[Hashable, str], deque[MemoryEntry]] = {}

    def entries(self, cluster_id: Hashable, task_type: str) -> list[MemoryEntry]:
        """The remembered questions of (cluster, task type), oldest first."""
        return list(self._queues.get((cluster_id, task_type), ()))

    def remembered_ids(self, cluster_id: Hashable, task_type: str) -> set:
        return {doc_id for entry in self.entries(cluster_id, task_type) for doc_id in entry.evidence_ids}

    def select_documents(self, cluster, task_type: str, rng: random.Random | None = None) -> list:
        """The questioner's documents: those of the memory entries plus up to
        `new_documents` documents not in memory (the first ones in cluster order, or a
        random choice with `rng`), returned in the cluster's original order."""
        remembered = self.remembered_ids(cluster.id, task_type)
        fresh = [d.id for d in cluster.documents if d.id not in remembered]
        k = min(self.new_documents, len(fresh))
        chosen = set(rng.sample(fresh, k) if rng is not None else fresh[:k])
        return [d for d in cluster.documents if d.id in remembered or d.id in chosen]

    def record(self, cluster_id: Hashable, task_type: str, entry: MemoryEntry, group_reward: float) -> bool:
        """Remember `entry` if the admission rule admits its group reward (the oldest entry
        leaves when the queue is full). Returns whether it entered."""
        if not enters_memory(group_reward, self.admission) or self.capacity == 0:
            return False
        key = (cluster_id, task_type)
        queue = self._queues.setdefault(key, deque(maxlen=self.capacity))
        queue.append(entry)
        return True

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    # --- checkpoints ------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-able snapshot (cluster and document ids must themselves be JSON-able)."""
        return {
            "capacity": self.capacity,
            "new_documents": self.new_documents,
            "admission": self.admission,
            "queues": [
                {"cluster_id": cluster_id, "task_type": task_type, "entries": [e.to_dict() for e in queue]}
                for (cluster_id, task_type), queue in self._queues.items() if queue
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HistoryMemory":
        memory = cls(data["capacity"], data["new_documents"], data.get("admission", "released"))
        for record in data["queues"]:
            queue = deque((MemoryEntry.from_dict(e) for e in record["entries"]), maxlen=memory.capacity)
            memory._queues[(record["cluster_id"], record["task_type"])] = queue
        return memory


def evidence_ids(documents: Sequence) -> tuple:
    """The ids of the documents a questioner was shown, for a `MemoryEntry`."""
    return tuple(d.id for d in documents)
