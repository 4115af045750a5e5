"""`--ctx 128k` end to end: documents clustered to the full context, every stage of one
SelfPlay.step (questioner, grounding, responder, verifier, rewards, selection) on prompts that
hold the whole cluster, and the update on them, with a tiny random model whose positions reach
131072 + the response.

Outputs are scripted (tests/core/scripted.py): a well-formed doc_qa question, responders right
half the time, verifiers that judge correctly but one; so the step always has a responder group with
reward variance and a questioner sample to train (with one question the verifier batch is
floor(1 / G) = 0 groups: no verifier update, as in the released trainer, docs/fidelity.md). The responder stage also runs
the real sampler on its 128k prompt: the responders keep the script's texts (so the rewards are
the script's) but carry the sampler's token ids and log-probs, so that the update's own forward
scores the sampler's tokens at positions 131k: the trainer's log-probs of them must equal the
sampler's (ratio within 1e-3), i.e. decoding on the KV cache of a 128k prefill equals one full
forward at that length. The check reads the rows the update already computes (no extra pass).

What reads the whole cluster: the responder prompt only (the questioner sees the documents the
history memory selects, the grounding and verifier prompts none), so the step does one 128k
prefill and the update forwards and back-propagates one 128k prompt, once for the G answers.
Attention is quadratic in the context: those two passes are the cost of this test, about
2.7 CPU-minutes on one core at 128k (bench/results/long_context.md).
`SPELL_LONG_CTX=4k pytest tests/core/test_long_context.py` runs the same test at another length."""
import dataclasses
import json
import math
import os

import torch

import spell_kernels

from spell_core.selfplay.config import RunConfig, parse_ctx
from spell_core.sampling import sampler
from spell_core.data.documents import build_clusters, load_documents
from spell_core.selfplay.loop import SelfPlay
from spell_core.models.model import load_pretrained
from spell_core.data.task_types import TaskRules
from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.scripted import role_of, scripted_generate

CTX = parse_ctx(os.environ.get("SPELL_LONG_CTX", "128k"))
RESPONSE = 32
G = 4


def make_model(folder, tokenizer_source):
    """A random 1-layer Llama, 2 query heads sharing 1 KV head of 16 (GQA), positions
    131072 + 1024, saved by transformers. Head dim 16, not 8: PyTorch's CPU flash attention
    (the cost of this test) takes about half the time per (query, key) pair at 16. The attention
    projections are scaled x10 (sharp attention, large attention outputs): then decoding one
    position off moves a log-prob by ~0.16 at 2k, where at transformers' initialization it moves
    it by 5e-5, which the 1e-3 check below could not see."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072 + 1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            projection.weight *= 10
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_corpus(folder, tokenizer, budget):
    """notes.jsonl: one cluster of documents of 60 numbered notes (~1500 tokens), their text
    filling 90-95 % of the cluster budget (with the tags around each document, at most 97 %)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["stone", "well", "garden", "door", "lantern", "key", "river", "tower", "field", "gate"]
    texts = [f"Note {i}: the {words[i % 10]} by the {words[(i * 7) % 10]} is number {i}, near the {words[(i * 3) % 10]}."
             for i in range(budget // 8)]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    documents, current, total = [], [], 0
    for text, n in zip(texts, counts):
        if total + n + 1 > 0.95 * budget:
            break
        current.append(text)
        total += n + 1
        if len(current) == 60:
            documents.append(current)
            current = []
    documents += [current] if current else []
    lines = [json.dumps({"id": f"d{k}", "text": "\n".join(doc), "cluster": "notes"}) for k, doc in enumerate(documents)]
    (folder / "notes.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def play(role, text, i, j, rng):
    if role == "questioner":
        return 'Here it is.\n```json\n{"question": "Which object is number 7?", "answer": "lantern"}\n```'
    if role == "grounding":
        return "The answer is unknown."
    if role == "responder":
        return f"I read it. The answer is {'lantern' if j % 2 == 0 else 'candle'}."
    right = "Answer to grade: lantern" in text
    return f"Judged. [[{'YES' if right == (j != G - 1) else 'NO'}]]"  # the last verifier errs: agreement 0.75


def _record_policy_loss_inputs(monkeypatch):
    """Wrap spell_kernels.policy_loss so that each call's head inputs are kept: (hidden rows, head
    weight, targets, the sampler's log-probs, per-trajectory row offsets, temperature)."""
    calls, real = [], spell_kernels.policy_loss

    def policy_loss(hidden, weight, targets, old_logprobs, *args, **kwargs):
        calls.append((hidden.detach().clone(), weight.detach().clone(), targets.clone(), old_logprobs.clone(),
                      kwargs["cu_seqlens"].tolist(), kwargs["temperature"]))
        return real(hidden, weight, targets, old_logprobs, *args, **kwargs)

    monkeypatch.setattr(spell_kernels, "policy_loss", policy_loss)
    return calls


def _trainer_logprobs_of(calls, sampled_ids):
    """{sample's token ids: (the trainer's log-probs of them, the same in float64 from its hidden
    rows)} for every trajectory row range of the update whose targets are a sampler's sample."""
    out = {}
    for hidden, weight, targets, old, cu, temperature in calls:
        for a, b in zip(cu, cu[1:]):
            ids = tuple(targets[a:b].tolist())
            if ids in sampled_ids:
                kernel = spell_kernels.fused_linear_logprob(hidden[a:b], weight, targets[a:b], temperature)
                logits = hidden[a:b].double() @ weight.double().T / temperature
                float64 = torch.log_softmax(logits, -1).gather(1, targets[a:b, None])[:, 0]
                out[ids] = (kernel.tolist(), float64.tolist(), old[a:b].tolist())
    return out


def test_one_self_play_step_and_update_at_the_full_context(tmp_path, monkeypatch):
    from spell_core.models.assets import resolve_model

    config = RunConfig()
    config.data.ctx = CTX
    config.sampling.group_size = G
    config.sampling.max_response_tokens = RESPONSE
    config.loop.questions = 1
    config.loop.kept_groups = 1
    config.loop.max_rounds = 1
    model, tokenizer = load_pretrained(make_model(tmp_path / "model", resolve_model("smollm2-135m-instruct")))
    budget = config.cluster_budget
    documents = TaskRules.parse(["doc_qa"]).apply(load_documents(make_corpus(tmp_path / "corpus", tokenizer, budget)))
    clusters = build_clusters(documents, tokenizer, budget)
    assert len(clusters) == 1 and 0.9 * budget <= clusters[0].n_tokens <= budget  # a cluster reaching the context

    scripted, sampled = scripted_generate(play), []

    def generate(model, tokenizer, prompts, **kwargs):
        """The script's outputs; the responder stage also runs the real sampler on its prompt
        (chunked prefill of the whole cluster into the KV cache, G samples decoded on it)."""
        out = scripted(model, tokenizer, prompts, **kwargs)
        if role_of(tokenizer.decode(prompts[0])) == "responder":
            sampled.append(sampler.generate(model, tokenizer, prompts, **kwargs))
            out = [[dataclasses.replace(c, token_ids=list(s.token_ids), logprobs=list(s.logprobs))
                    for c, s in zip(script_row, sample_row)] for script_row, sample_row in zip(out, sampled[-1])]
        return out

    result = SelfPlay(model, tokenizer, clusters, config, generate=generate).step()
    (samples,) = sampled[0]
    assert len(sampled) == 1 and len(samples) == G
    assert all(1 <= len(c.token_ids) <= RESPONSE and all(-1e4 < lp <= 0 for lp in c.logprobs) for c in samples)
    roles = {t.role for t in result.trajectories}
    # one question, one questioner positive: the verifier batch is floor(1 / G) = 0 groups, so the
    # released trainer (docs/fidelity.md) skips the verifier update this step; the verifier's prompts
    # hold no documents, so the long context is the questioner's and the responders'
    assert roles == {"questioner", "responder"}, roles
    responders = [t for t in result.trajectories if t.role == "responder"]
    assert len(responders) == G and len({tuple(t.prompt_ids) for t in responders}) == 1
    # the responder reads the whole cluster (--ctx tokens of documents); with the prompt around it and
    # the response, it fits ctx + prompt room + response
    assert all(clusters[0].n_tokens < len(t.prompt_ids) and t.num_tokens <= config.context_needed
               for t in responders), \
        [t.num_tokens for t in responders]

    trainer = Trainer(model, TrainerOptions(lr=1e-3, micro_batch_tokens=config.context_needed + G * RESPONSE, bf16_autocast=False))
    before = model.lm_head_weight.detach().clone()
    calls = _record_policy_loss_inputs(monkeypatch)
    metrics = trainer.train_step(result.trajectories)
    assert not metrics["skipped"], metrics
    assert metrics["tokens_trained"] == sum(len(t.response_ids) for t in result.trajectories)
    # every distinct prompt forwarded once (the responders' 128k one for the whole group), then the responses
    prompts = {tuple(t.prompt_ids) for t in result.trajectories}
    assert metrics["tokens_forwarded"] == sum(map(len, prompts)) + metrics["tokens_trained"]
    # only the responder prompt holds the whole cluster; the questioner's (empty memory) holds 5 new documents
    one_per_role = {t.role: t for t in result.trajectories}
    shown = {role: tokenizer.decode(t.prompt_ids).count("<document>") for role, t in one_per_role.items()}
    assert shown == {"questioner": min(5, len(clusters[0].documents)), "responder": len(clusters[0].documents)}
    assert float((model.lm_head_weight.detach() - before).abs().max()) > 0

    # the update's forward scored the sampler's tokens after the whole cluster: its log-probs equal the
    # sampler's (KV-cache decode after a chunked prefill = one full forward at that length)
    assert {tuple(t.response_ids) for t in responders} == {tuple(c.token_ids) for c in samples}
    scored = _trainer_logprobs_of(calls, {tuple(c.token_ids) for c in samples})
    assert len(scored) == len({tuple(c.token_ids) for c in samples})
    first_position = len(responders[0].prompt_ids)
    assert first_position > 0.9 * CTX  # the positions these log-probs are at
    worst = 0.0
    for kernel, float64, sampler_logprobs in scored.values():
        for new, exact, old in zip(kernel, float64, sampler_logprobs):
            assert abs(new - exact) < 1e-4  # the trainer's head in fp32 against float64 on its own rows
            worst = max(worst, abs(math.exp(new - old) - 1))
    assert worst < 1e-3, f"largest |trainer / sampler probability ratio - 1| = {worst:.2e}"
