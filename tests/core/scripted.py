"""Test helpers for the self-play loop: a tiny random Llama saved as an HF folder, a tiny
corpus, and a scripted `generate` that answers each role with chosen texts (so every rule of
"What trains" can be exercised deterministically).

A script is `script(role, prompt_text, prompt_index, sample_index, rng) -> text`, role one
of questioner / grounding / responder / verifier (recognised from the prompt wording of
spell_core.roles), rng a `random.Random` seeded from the call's seed and the sample's place.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from spell_core.sampling.sampler import Completion, ProgressEvent
from spell_core.sampling.token_selection import sample_seed

PLAY = """THE TINY PLAY

PERSONS. Ann, Bob.

ACT I.

SCENE I. A room.

ANN. The key is under the third stone by the well.

SCENE II. A garden.

BOB. Then the well it is, and quickly.

ACT II.

SCENE I. The well.

ANN. Here lies the stone, and under it the key.
"""
NOTES = [f"Note {i}: the lantern hangs by door {i}." for i in range(1, 8)]  # one line each in notes.jsonl


def make_tiny_model(folder, tokenizer_source, seed: int = 0):
    """A random 2-layer Llama with the given tokenizer, saved by transformers into `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_corpus(folder):
    """play.txt (PLAY) and notes.jsonl (NOTES, cluster "notes") in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "play.txt").write_text(PLAY)
    lines = [{"id": f"n{i}", "text": text, "cluster": "notes"} for i, text in enumerate(NOTES, 1)]
    (folder / "notes.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def role_of(prompt_text: str) -> str:
    if "you will write an exam question" in prompt_text:
        return "questioner"
    if "You are grading an answer" in prompt_text:
        return "verifier"
    if "<document>\nEmpty\n</document>" in prompt_text:  # the released grounding check: documents -> "Empty"
        return "grounding"
    if "<document>" in prompt_text:
        return "responder"
    return "grounding"


def scripted_generate(script, *, real_logprobs: bool = False, calls: list | None = None):
    """A drop-in for spell_core.sampling.sampler.generate that returns the script's texts, tokenized,
    ending with the chat template's end-of-turn token. Log-probs: the model's own at the
    sampling temperature (real_logprobs=True, what the sampler reports; an MoE model's
    completions then also carry their expert ids, as the sampler's do) or -0.5 per token.
    Every call is appended to `calls` as (role, prompts, n, max_new_tokens)."""

    def generate(model, tokenizer, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                 stop=None, seed=None, progress=None, **kwargs):
        counts = list(n) if isinstance(n, (list, tuple)) else [n] * len(prompts)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        results = []
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            text = tokenizer.decode(prompt)
            role = role_of(text)
            if calls is not None and i == 0:
                calls.append((role, [list(p) for p in prompts], n, max_new_tokens))
            out = []
            for j in range(count):
                rng = random.Random(sample_seed(seed or 0, i, j))
                reply = script(role, text, i, j, rng)
                ids = tokenizer(reply, add_special_tokens=False)["input_ids"][: max_new_tokens - 1] + [end]
                out.append(Completion(ids, [-0.5] * len(ids), "stop", tokenizer.decode(ids[:-1])))
            results.append(out)
        if real_logprobs:
            _fill_logprobs(model, prompts, results, temperature)
        if progress is not None:
            progress(ProgressEvent("decode", sum(len(c.token_ids) for r in results for c in r), 0.01, 0, 0))
        return results

    return generate


@torch.no_grad()
def _fill_logprobs(model, prompts, results, temperature):
    """The model's log-probs of every response token at the sampling temperature, from one
    packed forward pass (only the rows that predict response tokens go through the head); an
    MoE model's expert ids of the forwarded tokens (all but each response's last) as routing."""
    from spell_core.models.moe import expert_id_dtype
    from spell_core.models.routed_tokens import RoutedTokens, moe_layers, stack_record
    from spell_core.models.routing import Routing

    sequences = [(list(p), c) for p, out in zip(prompts, results) for c in out]
    ids = torch.tensor([t for p, c in sequences for t in p + c.token_ids])
    lengths = torch.tensor([len(p) + len(c.token_ids) for p, c in sequences])
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    rows, targets = [], []
    for (p, c), start in zip(sequences, cu[:-1].tolist()):
        rows += range(start + len(p) - 1, start + len(p) - 1 + len(c.token_ids))
        targets += c.token_ids
    layers = moe_layers(model.config)
    record = {"routing": Routing("record")} if layers else {}
    hidden = model.forward_hidden(ids, cu, **record)[torch.tensor(rows)]
    if layers:
        experts = stack_record(record["routing"], layers, expert_id_dtype(model.config.num_experts))
        for (p, c), start in zip(sequences, cu[:-1].tolist()):
            c.routing = RoutedTokens(experts[start:start + len(p)].clone(),
                                     experts[start + len(p):start + len(p) + len(c.token_ids) - 1].clone())
    logp = torch.log_softmax((hidden @ model.lm_head_weight.T).float() / temperature, dim=-1)
    values = logp.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
    for _, c in sequences:
        c.logprobs[:], values = values[: len(c.token_ids)], values[len(c.token_ids):]


# --- a random but well-formed self-play, for whole runs -----------------------------------------

RIGHT = {"doc_qa": "lantern", "doc_math": "42", "doc_mc": "B"}
WRONG = {"doc_qa": "candle", "doc_math": "17", "doc_mc": "C"}


def _task_type(text: str) -> str:
    if "multiple-choice" in text:
        return "doc_mc"
    if "arithmetic" in text:
        return "doc_math"
    return "doc_qa"


def random_play(role, text, i, j, rng):
    """Outputs of a model that sometimes blunders: a fifth of the questions malformed, a tenth
    answerable without documents, responders right half the time, verifiers mostly right."""
    if role == "questioner":
        if rng.random() < 0.2:
            return "Here is a question, without the JSON block."
        task_type = _task_type(text)
        block = {"question": f"Which object is number {rng.randint(0, 999)}?", "answer": RIGHT[task_type]}
        if task_type == "doc_mc":
            block["options"] = {"A": "a candle", "B": "a lantern", "C": "a torch", "D": "a lamp"}
        return "Let me write it.\n```json\n" + json.dumps(block) + "\n```"
    if role in ("grounding", "responder"):
        known = role == "responder" and rng.random() < 0.5 or role == "grounding" and rng.random() < 0.1
        # the reference answer is unknown here: answer with every type's right (or wrong) value
        values = RIGHT if known else WRONG
        kind = "doc_mc" if "\n(A) " in text else "doc_math" if "single number" in text else "doc_qa"
        return f"I read it. The answer is {values[kind]}"
    reference = re.search(r"Reference answer: (.*)", text).group(1).strip()
    answer = re.search(r"Answer to grade: (.*)", text).group(1).strip()
    correct = reference == answer or reference.startswith(f"({answer}) ")  # MC reference: "(B) text"
    draw = rng.random()
    if draw < 0.1:
        return "I cannot decide."
    return f"Judged. [[{'YES' if correct == (draw < 0.85) else 'NO'}]]"


def _pause_in_checkpoint_write(where: str, step: int, marker: Path) -> None:
    """Make the save of checkpoint `step` stop for a long time at `where` ("weights": after the
    safetensors file, "marker": just before COMPLETE), touching `marker` first."""
    import time

    from spell_core.models import checkpoint

    from spell_core.common import durable

    from spell_core.training import train_state

    def pause():
        marker.write_text("paused")
        time.sleep(120)

    if where == "weights":
        original = checkpoint._write_weights

        def write_weights(folder, tensors, max_shard_bytes):
            original(folder, tensors, max_shard_bytes)
            if f"step-{step:06d}" in str(folder):
                pause()
        checkpoint._write_weights = write_weights
    else:
        original_text = durable.write_text

        def write_text(path, text):
            if path.name == train_state.COMPLETE and f"step-{step:06d}" in str(path.parent):
                pause()
            original_text(path, text)
        durable.write_text = write_text


if __name__ == "__main__":
    # python -m tests.core.scripted ARGS...: `python -m spell_core.run ARGS` with random_play as
    # the model's outputs. Env: SPELL_TEST_SLEEP (seconds per generate call),
    # SPELL_TEST_PAUSE=weights|marker:STEP:MARKER_FILE (stall that checkpoint's write).
    import os
    import sys
    import time

    from spell_core.sampling import sampler
    from spell_core.run import main

    scripted = scripted_generate(random_play, real_logprobs=True)
    delay = float(os.environ.get("SPELL_TEST_SLEEP", "0"))

    def slow_generate(*args, **kwargs):
        time.sleep(delay)
        return scripted(*args, **kwargs)

    sampler.generate = slow_generate
    if os.environ.get("SPELL_TEST_PAUSE"):
        where, step, marker = os.environ["SPELL_TEST_PAUSE"].split(":", 2)
        _pause_in_checkpoint_write(where, int(step), Path(marker))
    sys.exit(main(sys.argv[1:]))
