"""History memory and document curriculum (SPEC.md) on a hand-made cluster."""
import json
import random
from types import SimpleNamespace

import pytest

from spell_core.selfplay.memory import HistoryMemory, MemoryEntry, enters_memory, evidence_ids


def cluster(n_docs, cluster_id="c0"):
    # duck-typed like spell_core.data.documents.Cluster / Document: .id, .documents, .text
    documents = [SimpleNamespace(id=f"d{i}", text=f"text {i}", source="s", n_tokens=2) for i in range(n_docs)]
    return SimpleNamespace(id=cluster_id, documents=documents, n_tokens=2 * n_docs)


def ids(documents):
    return [d.id for d in documents]


def entry(doc_ids, n):
    return MemoryEntry(tuple(doc_ids), f"question {n}?", f"answer {n}")


def test_empty_memory_gives_the_first_m_documents():
    c = cluster(12)
    assert ids(HistoryMemory().select_documents(c, "doc_qa")) == ["d0", "d1", "d2", "d3", "d4"]
    assert ids(HistoryMemory(new_documents=2).select_documents(c, "doc_qa")) == ["d0", "d1"]


def test_context_grows_by_m_documents_per_success():
    c, memory = cluster(12), HistoryMemory()
    shown = memory.select_documents(c, "doc_qa")
    assert memory.record(c.id, "doc_qa", MemoryEntry(evidence_ids(shown), "q1?", "a1"), group_reward=0.5)
    shown = memory.select_documents(c, "doc_qa")
    assert ids(shown) == [f"d{i}" for i in range(10)]  # 5 remembered + 5 new
    memory.record(c.id, "doc_qa", MemoryEntry(evidence_ids(shown), "q2?", "a2"), group_reward=0.25)
    assert ids(memory.select_documents(c, "doc_qa")) == [f"d{i}" for i in range(12)]  # only 2 new left
    assert ids(memory.select_documents(c, "doc_qa")) == [f"d{i}" for i in range(12)]  # cluster exhausted


# worked by hand: "released" admits [0.01, 1.0] (all-right questions too), "paper" admits (0, 1)
@pytest.mark.parametrize("admission, group_reward, enters", [
    ("paper", 0.0, False), ("paper", 1.0, False), ("paper", 0.125, True), ("paper", 0.875, True),
    ("paper", 0.005, True),
    ("released", 0.0, False), ("released", 0.005, False), ("released", 0.01, True), ("released", 0.125, True),
    ("released", 1.0, True),
])
def test_memory_admission_rules(admission, group_reward, enters):
    memory = HistoryMemory(admission=admission)
    assert enters_memory(group_reward, admission) is enters
    assert memory.record("c0", "doc_qa", entry(["d0"], 1), group_reward) is enters
    assert len(memory.entries("c0", "doc_qa")) == int(enters)


def test_released_admission_is_the_default_and_survives_a_checkpoint():
    assert HistoryMemory().admission == "released"
    assert HistoryMemory.from_dict(HistoryMemory(admission="paper").to_dict()).admission == "paper"
    with pytest.raises(ValueError, match="released, paper"):
        HistoryMemory(admission="strict")


def test_queue_keeps_the_last_L_entries():
    memory = HistoryMemory(capacity=3)
    for n in range(5):
        memory.record("c0", "doc_qa", entry([f"d{n}"], n), 0.5)
    assert [e.question for e in memory.entries("c0", "doc_qa")] == ["question 2?", "question 3?", "question 4?"]
    assert memory.remembered_ids("c0", "doc_qa") == {"d2", "d3", "d4"}
    assert len(memory) == 3


def test_union_of_memory_docs_plus_new_ones_in_cluster_order():
    c, memory = cluster(20), HistoryMemory(capacity=3, new_documents=2)
    memory.record(c.id, "doc_mc", entry(["d17", "d3"], 1), 0.5)
    memory.record(c.id, "doc_mc", entry(["d3", "d9"], 2), 0.5)
    # memory {d3, d9, d17} + the first two not in memory (d0, d1), in the cluster's order
    assert ids(memory.select_documents(c, "doc_mc")) == ["d0", "d1", "d3", "d9", "d17"]


def test_random_choice_of_new_documents_with_rng():
    c, memory = cluster(20), HistoryMemory(new_documents=5)
    memory.record(c.id, "doc_qa", entry(["d1", "d2"], 1), 0.5)
    shown = memory.select_documents(c, "doc_qa", rng=random.Random(0))
    chosen = set(ids(shown)) - {"d1", "d2"}
    assert {"d1", "d2"} <= set(ids(shown)) and len(chosen) == 5
    assert ids(shown) == sorted(ids(shown), key=lambda i: int(i[1:]))  # cluster order
    # the rng's own choice, computed independently: sample 5 of the 18 fresh ids
    fresh = [f"d{i}" for i in range(20) if i not in (1, 2)]
    assert chosen == set(random.Random(0).sample(fresh, 5))


def test_memory_is_per_cluster_and_task():
    memory = HistoryMemory()
    memory.record("c0", "doc_qa", entry(["d0"], 1), 0.5)
    assert memory.entries("c0", "doc_math") == []
    assert memory.entries("c1", "doc_qa") == []
    c1 = cluster(8, cluster_id="c1")
    assert ids(memory.select_documents(c1, "doc_qa")) == ["d0", "d1", "d2", "d3", "d4"]


def test_round_trip_through_json():
    memory = HistoryMemory(capacity=2, new_documents=4)
    memory.record(7, "doc_qa", entry([0, 1], 1), 0.5)  # integer ids survive as integers
    memory.record("c1", "doc_mc", MemoryEntry(("x",), "Which?", "B", {"A": "a", "B": "b", "C": "c", "D": "d"}), 0.5)
    restored = HistoryMemory.from_dict(json.loads(json.dumps(memory.to_dict())))
    assert (restored.capacity, restored.new_documents) == (2, 4)
    assert restored.entries(7, "doc_qa") == memory.entries(7, "doc_qa") == [entry([0, 1], 1)]
    assert restored.entries("c1", "doc_mc")[0].options["B"] == "b"
    for n in range(2, 5):  # the restored queue still holds at most L
        restored.record(7, "doc_qa", entry([n], n), 0.5)
    assert [e.question for e in restored.entries(7, "doc_qa")] == ["question 3?", "question 4?"]


def test_capacity_zero_disables_memory_and_bad_sizes_are_rejected():
    memory = HistoryMemory(capacity=0)
    assert not memory.record("c0", "doc_qa", entry(["d0"], 1), 0.5)
    with pytest.raises(ValueError, match="new_documents"):
        HistoryMemory(new_documents=0)
