"""Time and peak memory of the sampler and of the update at 16k, 32k, 64k and 128k tokens (CPU).

A tiny random Llama (1 layer, hidden 32, 2 query heads / 1 KV head of 16, the default model's
tokenizer and vocabulary, max positions 128k + 1024), fp32, 1 thread. Per context length L, in
fresh processes (bench/memory.py: the rise of the resident set's peak above the level before):

  sampler  generate(n=2, max_new_tokens=16) after one L-token prompt: chunked prefill, then
           decode with the shared prompt KV (what a responder group costs)
  update   one Trainer.train_step on that group, shared-prefix packed [prompt, resp_1, resp_2]

Memory must grow linearly in L (no L x L buffer in attention, masks, log-probs, the LSE merge or
the KV cache): the table shows MiB per 1k tokens, which should stay flat. Time grows as L^2
(attention). Not a test: at 128k one run takes many minutes on a CPU.

    python bench/long_context.py                       # 16k 32k 64k 128k
    python bench/long_context.py --lengths 16k,32k
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NEW_TOKENS, SAMPLES = 16, 2


def build(max_positions):
    import torch

    from spell_core.models.assets import resolve_model
    from spell_core.models.model import CausalLM, ModelConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = ModelConfig.from_hf(dict(model_type="llama", architectures=[], vocab_size=len(tokenizer), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=max_positions,
                                      tie_word_embeddings=True, rope_theta=10000.0))
    torch.manual_seed(0)
    model = CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model, tokenizer


def run_case(stage, length):
    import torch

    from memory import time_and_peak
    from spell_core.selfplay.batch import Trajectory
    from spell_core.sampling.sampler import generate
    from spell_core.training.trainer import Trainer, TrainerOptions

    torch.set_num_threads(1)
    model, tokenizer = build(131072 + 1024)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()
    if stage == "sampler":
        generate(model, tokenizer, [prompt[:64]], n=SAMPLES, max_new_tokens=4, ignore_eos=True, seed=0)  # warm-up
        out = {}

        def run():
            out["samples"] = generate(model, tokenizer, [prompt], n=SAMPLES, max_new_tokens=NEW_TOKENS,
                                      ignore_eos=True, seed=0)
        result = time_and_peak(run)
        assert all(len(c.token_ids) == NEW_TOKENS for c in out["samples"][0])
    else:
        responses = [torch.randint(0, model.config.vocab_size, (NEW_TOKENS,), generator=g).tolist()
                     for _ in range(SAMPLES)]
        group = [Trajectory("responder", prompt, r, [-10.0] * NEW_TOKENS, 1.0 - 2 * i, group="g")
                 for i, r in enumerate(responses)]
        trainer = Trainer(model, TrainerOptions(lr=1e-5, micro_batch_tokens=1 << 30, bf16_autocast=False))
        trainer.train_step([Trajectory("responder", prompt[:64], responses[0], [-10.0] * NEW_TOKENS, 1.0)])  # warm-up
        metrics = {}

        def run():
            metrics.update(trainer.train_step(group))
        result = time_and_peak(run)
        assert not metrics["skipped"] and metrics["tokens_forwarded"] == length + SAMPLES * NEW_TOKENS
    return {"seconds": result["best_s"], "cpu_seconds": result["best_cpu_s"], "peak_bytes": result["peak_extra_bytes"]}


def main():
    from spell_core.selfplay.config import parse_ctx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16k,32k,64k,128k")
    p.add_argument("--case", nargs=2, metavar=("STAGE", "LENGTH"))
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return
    from memory import run_json

    lengths = [parse_ctx(x) - 1024 if parse_ctx(x) >= 131072 else parse_ctx(x) for x in args.lengths.split(",")]
    # CPU seconds (of the one thread) next to wall seconds: on a shared machine only they compare;
    # "x first": CPU time over the first row's, measured in this run (L^2 attention: 4x per doubling)
    print("| prompt tokens | sampler s wall / CPU | x first | sampler peak MiB | sampler MiB / 1k tokens "
          "| update s wall / CPU | x first | update peak MiB | update MiB / 1k tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = {}
    for length in lengths:
        row = {stage: run_json([os.path.abspath(__file__), "--case", stage, str(length)]) for stage in ("sampler", "update")}
        cells = []
        for stage in ("sampler", "update"):
            r = row[stage]
            if "error" in r:
                cells += [f"error: {r['error']}", "-", "-", "-"]
            else:
                mib = r["peak_bytes"] / 2**20
                first.setdefault(stage, r["cpu_seconds"])
                cells += [f"{r['seconds']:.1f} / {r['cpu_seconds']:.1f}", f"{r['cpu_seconds'] / first[stage]:.1f}",
                          f"{mib:.0f}", f"{mib / (length / 1024):.2f}"]
        print(f"| {length:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
