"""Token counting for clustering: `spell_core.data.documents.count_tokens` (the Rust tokenizer's batch
call) beside the baseline `tokenizer(texts, add_special_tokens=False)` of transformers, on the
same documents; and `build_clusters` end to end, at the default budget (16k context).

Default model tokenizer (SmolLM2) and corpus (Shakespeare scenes). By default 6 plays;
SPELL_BENCH_LONG=1 takes the whole corpus. Short texts (lines) show the wrapper's overhead.
"""
import os

import pytest

from spell_core.models.assets import resolve_corpus, resolve_model
from spell_core.selfplay.config import RunConfig
from spell_core.data.documents import build_clusters, load_documents, token_counter

WORKS = None if os.environ.get("SPELL_BENCH_LONG") == "1" else 6


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def documents():
    docs = load_documents(resolve_corpus())
    works = list(dict.fromkeys(d.group for d in docs))[:WORKS]
    return [d for d in docs if d.group in works]


def texts_of(documents, unit):
    texts = [d.text for d in documents]
    return texts if unit == "scenes" else [line for text in texts for line in text.split("\n")]


@pytest.mark.parametrize("unit", ["scenes", "lines"])
@pytest.mark.parametrize("variant", ["baseline_transformers_call", "count_tokens"])
def test_token_counting(benchmark, tokenizer, documents, unit, variant):
    texts = texts_of(documents, unit)
    benchmark.group = f"token counting, {len(texts)} {unit}"
    if variant == "baseline_transformers_call":
        def run():
            encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
            return [len(ids) for ids in encoded["input_ids"]]
    else:
        count = token_counter(tokenizer)

        def run():
            return count(texts)
    counts = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert counts == [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts[:200]] + counts[200:]


def test_build_clusters(benchmark, tokenizer, documents):
    budget = RunConfig().cluster_budget
    benchmark.group = f"build_clusters, {len(documents)} documents, budget {budget}"

    def run():
        fresh = [type(d)(d.id, d.text, d.source, None, d.group) for d in documents]  # uncounted
        return build_clusters(fresh, tokenizer, budget)

    clusters = benchmark.pedantic(run, rounds=3, iterations=1)
    assert all(c.n_tokens <= budget for c in clusters)
