"""spell_kernels.moe_experts beside a plain loop over experts, forward + backward, in the same run.

ours:         spell_kernels.moe_experts (CUDA: the Triton grouped GEMMs; CPU: the sorted-rows loop)
transformers: transformers' Qwen3MoeExperts eager forward (a loop over the experts that were hit,
              each scanning the T x k one-hot mask), backward through autograd
loop:         spell_kernels.reference.moe_experts (the tests' plain loop), the GPU baseline

Default (CPU, fp32): a scaled-down Qwen3-30B-A3B layer, T 1024, H 256, I 128, E 64, k 8.
SPELL_BENCH_FULL=1: the real layer shape, H 2048, I 768, E 128, k 8, T 4096. Routing: the top-k
of random router logits (softmax weights, renormalised). Time: pytest-benchmark on ours; the
baseline runs in the benchmark's untimed setup before every round, so both see the same machine
load; the ratio is printed and stored in extra_info (on a shared CPU, read ratios, not seconds).

As a script (bench/first_contact.py's moe stage calls `compare` the same way):
  python bench/test_bench_moe.py --device cuda --dtype bf16 --tokens 4096 16384
"""
import argparse
import json
import os
import time

import torch

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
QWEN3_30B_A3B = dict(hidden=2048, inter=768, experts=128, top_k=8)
SHAPE = dict(QWEN3_30B_A3B, tokens=4096) if FULL else dict(tokens=1024, hidden=256, inter=128, experts=64, top_k=8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(tokens, hidden, inter, experts, top_k, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, scale=1.0):
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, scale, generator=gen)

    logits = torch.randn(tokens, experts, device=device, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return dict(hidden=normal(tokens, hidden).requires_grad_(True),
                gate_up_proj=normal(experts, 2 * inter, hidden, scale=hidden ** -0.5).requires_grad_(True),
                down_proj=normal(experts, hidden, inter, scale=inter ** -0.5).requires_grad_(True),
                topk_ids=ids, topk_weights=(weights / weights.sum(-1, keepdim=True)).requires_grad_(True),
                grad=normal(tokens, hidden))


def _ours(x):
    from spell_kernels import moe_experts
    return moe_experts(x["hidden"], x["gate_up_proj"], x["down_proj"], x["topk_ids"], x["topk_weights"])


def _loop(x):
    from spell_kernels import reference
    return reference.moe_experts(x["hidden"], x["gate_up_proj"], x["down_proj"], x["topk_ids"], x["topk_weights"])


def _transformers(x):
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    e, two_i, h = x["gate_up_proj"].shape
    config = transformers.Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=two_i // 2, num_experts=e,
                                         num_experts_per_tok=x["topk_ids"].shape[1], hidden_act="silu")
    config._experts_implementation = "eager"  # the loop (its default without a model around it)
    experts = Qwen3MoeExperts(config)
    experts.gate_up_proj, experts.down_proj = (torch.nn.Parameter(x[k], requires_grad=True)
                                               for k in ("gate_up_proj", "down_proj"))
    return experts(x["hidden"], x["topk_ids"], x["topk_weights"])


VARIANTS = {"ours": _ours, "transformers": _transformers, "loop": _loop}


def run_variant(name, x, backward=True):
    for k in ("hidden", "gate_up_proj", "down_proj", "topk_weights"):
        x[k].grad = None
    out = VARIANTS[name](x)
    if backward:
        out.backward(x["grad"])
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(name, x, backward, reps):
    """Best of reps (after one warm-up call: Triton compiles there)."""
    device = x["hidden"].device
    run_variant(name, x, backward)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        run_variant(name, x, backward)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def flops(tokens, hidden, inter, top_k, backward):
    """Matmul FLOPs: gate/up 2*(T k)*H*2I, down 2*(T k)*I*H; the backward twice the forward."""
    forward = 2 * tokens * top_k * hidden * 3 * inter
    return forward * (3 if backward else 1)


def compare(tokens, dtype, device, variants=("ours", "loop"), reps=3, shape=QWEN3_30B_A3B):
    """{variant: {fwd_s, fwd_bwd_s, fwd_tflops, fwd_bwd_tflops}} at one token count."""
    x = make_inputs(tokens, **shape, dtype=dtype, device=device)
    out = {}
    for name in variants:
        row = {}
        for backward, label in ((False, "fwd"), (True, "fwd_bwd")):
            s = seconds(name, x, backward, reps)
            row[f"{label}_s"] = s
            row[f"{label}_tflops"] = flops(tokens, shape["hidden"], shape["inter"], shape["top_k"], backward) / s / 1e12
        out[name] = row
    return out


# --- pytest-benchmark --------------------------------------------------------------------

def _bench_against(benchmark, baseline, rounds):
    x = make_inputs(**SHAPE)
    base_times = []

    def run_baseline_untimed():  # pedantic's setup: the baseline, right before each timed round
        t0 = time.perf_counter()
        run_variant(baseline, x)
        base_times.append(time.perf_counter() - t0)

    benchmark.pedantic(run_variant, args=("ours", x), setup=run_baseline_untimed, rounds=rounds, iterations=1)
    best = benchmark.stats.stats.min if benchmark.stats else None
    if best is not None:
        ratio = best / min(base_times)
        benchmark.extra_info.update(baseline_best_s=min(base_times), ratio_vs_baseline=ratio)
        print(f"\nmoe_experts vs {baseline}, {SHAPE} fp32 CPU, fwd+bwd: best {best:.3f}s vs {min(base_times):.3f}s "
              f"-> {ratio:.2f}x")
    assert all(x[k].grad is not None for k in ("hidden", "gate_up_proj", "down_proj", "topk_weights"))


def test_moe_experts_vs_transformers_loop(benchmark):
    _bench_against(benchmark, "transformers", rounds=3)


def test_moe_experts_vs_plain_loop(benchmark):
    _bench_against(benchmark, "loop", rounds=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "loop"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for tokens in args.tokens:
        result = compare(tokens, DTYPES[args.dtype], args.device, args.variants, args.reps)
        print(json.dumps({"tokens": tokens, **result}))


if __name__ == "__main__":
    main()
