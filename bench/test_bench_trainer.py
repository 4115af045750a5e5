"""One train step on a responder group, shared-prefix packing beside plain packing.

Workload: one group of G = 8 answers to one prompt, random tokens; the default model's
architecture (SmolLM2-135M, random init), CPU, fp32, `Trainer.train_step` (forward, backward,
AdamW). `plain` packs [prompt + answer] 8 times (what a trainer without shared prefixes does);
`shared_prefix` packs [prompt, answer_1, ..., answer_8] with the prompt forwarded and
back-propagated once. Both train the same tokens and give the same gradients (tests/core/
test_trainer.py), with the same settings. Default (quick): 2 layers, prompt 512, answers of 64
tokens, micro-batches of 2 plain sequences; SPELL_BENCH_FULL=1: all 30 layers, prompt 2048,
answers of 128 tokens, gradient checkpointing, one micro-batch.

Peak memory: each variant runs in a fresh process (`python bench/test_bench_trainer.py
--peak-memory VARIANT`) with glibc's mmap threshold lowered so freed tensors leave the resident
set; after a one-token warm-up step (AdamW's moments exist), the group's step's peak rise above
its starting level is reported (bench/memory.py).
"""
import gc
import json
import os
import sys

import pytest
import torch

import memory

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
LAYERS = None if FULL else 2
PROMPT, ANSWER, G = (2048, 128, 8) if FULL else (512, 64, 8)
ROUNDS = 1 if FULL else 2
WARMUP = 0 if FULL else 1  # FULL: the one timed step also allocates AdamW's moments
VARIANTS = ["plain", "shared_prefix"]
# The same settings for both variants. Quick: two plain sequences per micro-batch (plain: 4
# micro-batches; shared_prefix: the whole group in one). FULL: gradient checkpointing and the
# whole group in one micro-batch either way (without checkpointing, plain's 30-layer activations
# of 17k tokens take ~23 GB, more than this machine has).
MICRO_BATCH_TOKENS = G * (PROMPT + ANSWER) if FULL else 2 * (PROMPT + ANSWER)
CHECKPOINTING = FULL


def build(variant):
    from spell_core.models.assets import resolve_model
    from spell_core.selfplay.batch import Trajectory
    from spell_core.models.model import CausalLM, ModelConfig
    from spell_core.training.trainer import Trainer, TrainerOptions

    raw = json.loads((resolve_model("smollm2-135m-instruct") / "config.json").read_text())
    if LAYERS is not None:
        raw["num_hidden_layers"] = LAYERS
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(raw)).float()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT,)).tolist()
    batch = [Trajectory("responder", prompt, torch.randint(0, vocab, (ANSWER,)).tolist(), [-2.0] * ANSWER,
                        1.0 if i % 2 else -1.0, group="bench") for i in range(G)]
    options = TrainerOptions(micro_batch_tokens=MICRO_BATCH_TOKENS, shared_prefix=variant == "shared_prefix",
                             gradient_checkpointing=CHECKPOINTING)
    return Trainer(model, options), batch


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant):
    trainer, batch = build(variant)
    benchmark.group = (f"train step, 1 group: prompt {PROMPT} + {G} x {ANSWER} answers, "
                       f"{trainer.model.config.num_hidden_layers} layers, fp32 CPU"
                       + (", gradient checkpointing" if CHECKPOINTING else ""))
    metrics = benchmark.pedantic(trainer.train_step, args=(batch,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    assert not metrics["skipped"] and metrics["tokens_trained"] == G * ANSWER
    expected = PROMPT + G * ANSWER if variant == "shared_prefix" else G * (PROMPT + ANSWER)
    assert metrics["tokens_forwarded"] == expected
    benchmark.extra_info.update(tokens_trained=metrics["tokens_trained"], tokens_forwarded=expected,
                                micro_batches=metrics["micro_batches"])
    del trainer, batch
    gc.collect()


@pytest.mark.timeout(3600)
def test_peak_memory():
    """Peak resident-set rise of one step per variant, each in its own process."""
    results = {variant: memory.run_json([__file__, "--peak-memory", variant], env={"MALLOC_MMAP_THRESHOLD_": "65536"})
               for variant in VARIANTS}
    print(f"\npeak RSS rise of one train step, prompt {PROMPT} + {G} x {ANSWER}")
    memory.print_table(results, "shared_prefix", [("peak_extra_bytes", "peak rise MiB", memory.MiB),
                                                  ("best_s", "step s", 1)])
    assert all("error" not in r and r["peak_extra_bytes"] > 0 for r in results.values()), results


def _peak_memory(variant):
    from spell_core.selfplay.batch import Trajectory

    trainer, batch = build(variant)
    trainer.train_step([Trajectory("responder", [1, 2], [3], [-1.0], 1.0)])  # allocates AdamW's moments
    print(json.dumps({"variant": variant, **memory.time_and_peak(lambda: trainer.train_step(batch))}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
        _peak_memory(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --peak-memory {{{','.join(VARIANTS)}}}")
