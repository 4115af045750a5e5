"""Peak memory and time of the per-token log-prob + entropy head TRL's GRPOTrainer runs: TRL's own
fused head (trl.kernels.ChunkedLogProbFunction, what GRPOTrainer uses unpatched) against spell's
(fused_linear_logprob, what SpellGRPOTrainer uses), forward + backward, one variant per process.

  python bench/trl_head_memory.py --tokens 8192          # both, in subprocesses, ratio table
  python bench/trl_head_memory.py --variant spell --tokens 8192
"""
import argparse
import json
import os

import torch

import memory

HIDDEN, VOCAB = 576, 49152


def run(variant, x):
    x["h"].grad = x["w"].grad = None
    if variant == "trl":
        from trl.kernels import ChunkedLogProbFunction
        logp, ent = ChunkedLogProbFunction.apply(x["h"], x["w"], None, x["t"], 1.0, 32768, None, 1.0,
                                                 ("log_probs", "entropy"))[:2]
    else:
        import spell_kernels as sk
        logp, ent = sk.fused_linear_logprob(x["h"], x["w"], x["t"], 1.0, True)
    (logp * x["g"] + 0.01 * ent * x["g"]).sum().backward()


def measure(variant, tokens):
    g = torch.Generator().manual_seed(0)
    warm = dict(h=torch.randn(8, 16, requires_grad=True), w=torch.randn(64, 16, requires_grad=True),
                t=torch.randint(0, 64, (8,)), g=torch.randn(8))
    run(variant, warm)
    x = dict(h=torch.randn(tokens, HIDDEN, generator=g).requires_grad_(True),
             w=(torch.randn(VOCAB, HIDDEN, generator=g) * 2 / HIDDEN ** 0.5).requires_grad_(True),
             t=torch.randint(0, VOCAB, (tokens,), generator=g), g=torch.randn(tokens, generator=g))
    return memory.time_and_peak(lambda: run(variant, x), 1, "cpu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["trl", "spell"])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens)))
        return
    results = {v: {"variant": v, **memory.run_json([os.path.abspath(__file__), "--variant", v, "--tokens",
                                                    str(args.tokens)], label=v)} for v in ("trl", "spell")}
    memory.print_table(results, {"spell": "trl"}, [("peak_extra_bytes", "peak extra MiB", memory.MiB),
                                                   ("best_s", "wall s", 1), ("best_cpu_s", "cpu s", 1)])


if __name__ == "__main__":
    main()
