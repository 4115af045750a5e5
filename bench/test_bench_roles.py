"""Cost of building a responder prompt over a long cluster, beside the baseline
`tokenizer.apply_chat_template(..., tokenize=True)` on the same messages.

build_responder_prompt tokenizes the prompt and, to measure the shared document prefix,
the prefix alone (cached per documents): the first question over a cluster ("cold") pays
two tokenizations, the next ones ("warm") about one, like the baseline.
Default model tokenizer (SmolLM2) and corpus (Shakespeare); 16k tokens of documents, plus
128k with SPELL_BENCH_LONG=1.
"""
import os
from pathlib import Path

import pytest

from spell_core.roles import DOC_QA, Task, build_responder_prompt
from spell_core.roles import chat as roles_chat

CONTEXTS = [16 * 1024] + ([128 * 1024] if os.environ.get("SPELL_BENCH_LONG") == "1" else [])
QUESTIONS = [Task(DOC_QA, "Which character speaks the first line of the play?", "x"),
             Task(DOC_QA, "Who is banished in the first act?", "y")]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def cluster_texts(tokenizer, n_tokens, piece_chars=8000):
    from spell_core.models.assets import resolve_corpus

    texts, total = [], 0
    for path in sorted(Path(resolve_corpus()).glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        for start in range(0, len(text), piece_chars):
            piece = text[start:start + piece_chars]
            texts.append(piece)
            total += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if total >= n_tokens:
                return texts
    return texts


@pytest.mark.parametrize("ctx", CONTEXTS, ids=lambda c: f"{c // 1024}k")
@pytest.mark.parametrize("variant", ["baseline_apply_chat_template", "build_cold", "build_warm"])
def test_responder_prompt(benchmark, tokenizer, ctx, variant):
    documents = cluster_texts(tokenizer, ctx)
    benchmark.group = f"responder prompt, {ctx // 1024}k tokens of documents"
    first = build_responder_prompt(tokenizer, documents, QUESTIONS[0])  # also warms the prefix cache
    if variant == "baseline_apply_chat_template":
        def run():
            return list(tokenizer.apply_chat_template(first.messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
        ids = benchmark.pedantic(run, rounds=3, iterations=1)
        assert ids == first.input_ids
    elif variant == "build_cold":
        prompt = benchmark.pedantic(lambda: build_responder_prompt(tokenizer, documents, QUESTIONS[1]),
                                    setup=roles_chat._PREFIX_CACHE.clear, rounds=3, iterations=1)
        assert prompt.prefix_len == first.prefix_len > 0.9 * ctx
    else:
        prompt = benchmark.pedantic(lambda: build_responder_prompt(tokenizer, documents, QUESTIONS[1]),
                                    rounds=3, iterations=1)
        assert prompt.input_ids[: prompt.prefix_len] == first.input_ids[: first.prefix_len]
