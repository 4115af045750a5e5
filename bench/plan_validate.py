"""The memory planner (spell_core/plan.py) against measured peaks on CPU.

Each case runs in a fresh process: a random fp32 model, a warm-up step on a short trajectory
(the libraries' lazy buffers and AdamW's state then exist, as in a run), then the peak rise of
the resident set during a train step (bench/memory.py), beside the planner's `activations()` for the largest micro-batch of the
step. Prints a markdown table; the error is (predicted - measured) / measured.

    python bench/plan_validate.py            # the table of bench/results/plan.md
    python bench/plan_validate.py --case '{"layers": 2, ...}'   # one case (what the table runs)
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "llama 4 x 256": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
    "qwen3 2 x 384": dict(model_type="qwen3", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64, vocab_size=8192),
}
# (sequence length, sequences per step, micro-batch tokens, gradient checkpointing)
SHAPES = {"llama 4 x 256": [(2048, 2, 4096, False), (8192, 1, 8192, False), (8192, 2, 16384, False),
                            (8192, 1, 8192, True), (16384, 1, 16384, True)],
          "qwen3 2 x 384": [(4096, 1, 4096, False), (8192, 2, 8192, False), (8192, 1, 8192, True)]}
RESPONSE = 256


def raw_config(name):
    return dict(MODELS[name], architectures=[], max_position_embeddings=65536, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def run_case(case):
    import torch

    from memory import time_and_peak
    from spell_core.batch import Trajectory
    from spell_core.model import CausalLM, ModelConfig
    from spell_core.trainer import Trainer, TrainerOptions, plan_micro_batches

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(raw_config(case["model"])))
    trainer = Trainer(model, TrainerOptions(lr=1e-5, micro_batch_tokens=case["mb"],
                                            gradient_checkpointing=case["gc"], bf16_autocast=False))
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    trajectories = []
    for i in range(case["sequences"]):
        prompt = torch.randint(0, vocab, (case["length"] - RESPONSE,), generator=g).tolist()
        response = torch.randint(0, vocab, (RESPONSE,), generator=g).tolist()
        trajectories.append(Trajectory("responder", prompt, response, [-8.0] * RESPONSE, 1.0, group=f"g{i}"))
    # warm-up on one short trajectory: the libraries' lazy buffers and AdamW's state exist from
    # here on, and the few blocks it frees are too small to hide the measured step's peak
    trainer.train_step([Trajectory("responder", trajectories[0].prompt_ids[:64], trajectories[0].response_ids[:8],
                                   [-8.0] * 8, 1.0)])
    largest = max(plan_micro_batches(trajectories, case["mb"]), key=lambda mb: mb.layout.num_tokens)
    result = time_and_peak(lambda: trainer.train_step(trajectories))
    return {"measured": result["peak_extra_bytes"], "tokens": largest.layout.num_tokens,
            "loss_rows": int(largest.targets.numel())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    from memory import run_json
    from spell_core.plan import Shape, activations

    print("| model | sequence | sequences | micro-batch tokens | checkpointing | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name in MODELS:
        shape = Shape.from_config(raw_config(name), "float32")
        for length, sequences, mb, gc in SHAPES[name]:
            case = dict(model=name, length=length, sequences=sequences, mb=mb, gc=gc)
            got = run_json([os.path.abspath(__file__), "--case", json.dumps(case)])
            if "error" in got:
                print(f"| {name} | {length} | {sequences} | {mb} | {gc} | - | - | error: {got['error']} |")
                continue
            predicted = activations(shape, got["tokens"], gc, device="cpu", loss_rows=got["loss_rows"],
                                    full_gradients=True)
            error = (predicted - got["measured"]) / got["measured"]
            worst = max(worst, abs(error))
            print(f"| {name} | {length} | {sequences} | {mb} | {'yes' if gc else 'no'} | {predicted / 2**20:.0f} | "
                  f"{got['measured'] / 2**20:.0f} | {error:+.1%} |", flush=True)
    print(f"\nlargest error: {worst:.1%}")


if __name__ == "__main__":
    main()
