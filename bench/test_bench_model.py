"""Forward throughput of the packed decoder beside transformers on the same padded batch.

Same weights (the default model's architecture, random init), CPU, float32, logits for
every token on both sides. Ours runs the sequences packed (no padding), transformers a
right-padded batch with an attention mask (its default SDPA attention); tokens/s counts
real tokens only. Default: 4 of SmolLM2's 30 layers and lengths 256/384/768 (quick);
SPELL_BENCH_FULL=1: all 30 layers and lengths 256..2048.
"""
import json
import os

import pytest
import torch
import transformers

from spell_core.models.assets import resolve_model
from spell_core.models.model import CausalLM, ModelConfig

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
LENGTHS = [256, 512, 1024, 1536, 2048] if FULL else [256, 384, 768]
ROUNDS = 3 if FULL else 5
LAYERS = None if FULL else 4


@pytest.fixture(scope="module")
def models():
    raw = json.loads((resolve_model("smollm2-135m-instruct") / "config.json").read_text())
    if LAYERS is not None:
        raw["num_hidden_layers"] = LAYERS
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw),
                                                       dtype=torch.float32).eval()
    ours = CausalLM(ModelConfig.from_hf(raw))
    state = hf.state_dict()
    if ours.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    ours.load_state_dict(state, strict=True)
    return ours, hf


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (n,), generator=g) for n in LENGTHS]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    padded = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], mask[i, :len(s)] = s, 1
    return torch.cat(seqs), cu, padded, mask


@pytest.mark.parametrize("variant", ["transformers_padded", "spell_packed"])
def test_forward_throughput(benchmark, models, batch, variant):
    ours, hf = models
    input_ids, cu, padded, mask = batch
    benchmark.group = f"model forward, {len(LENGTHS)} sequences {min(LENGTHS)}-{max(LENGTHS)} tokens, " \
                      f"{ours.config.num_hidden_layers} layers, fp32 CPU"
    if variant == "spell_packed":
        def run():
            with torch.no_grad():
                return ours(input_ids, cu)
    else:
        def run():
            with torch.no_grad():
                return hf(input_ids=padded, attention_mask=mask).logits
    logits = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    real_tokens = int(cu[-1])
    assert logits.shape[-1] == ours.config.vocab_size
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s_best"] = real_tokens / benchmark.stats.stats.min
    benchmark.extra_info["real_tokens"] = real_tokens
    benchmark.extra_info["computed_tokens"] = logits.shape[0] * (logits.shape[1] if logits.dim() == 3 else 1)
