"""Fused linear log-prob and the fused policy loss beside the naive path, forward + backward.

naive:        logits = h @ W.T -> log_softmax (fp32) -> gather, backward through autograd
fused:        fused_linear_logprob (chunked; the backward recomputes each chunk's logits)
naive_policy: naive log-probs -> PPO-clip token-mean loss, backward through autograd
fused_policy: policy_loss (chunked; gradients formed in the forward chunk loop)
naive_grpo:   naive log-probs (soft-capped logits) -> TRL-style GRPO loss with k3 KL to a reference,
              a rollout importance cap and seq-mean-token-mean, backward through autograd
fused_grpo:   the same loss through policy_loss(softcap=, ref_logprobs=, rollout_logprobs=, agg="grpo")
naive_lowp:   (half-precision runs only) log_softmax in the input dtype, no fp32 upcast

Default (make bench): the default model's head (H = 576, V = 49152), fp32 on CPU, N = 2048
tokens. SPELL_BENCH_FULL=1: N = 16384, the issue's CPU target (naive peaks near 10 GB).
Time: pytest-benchmark on the fused variant; the naive baseline runs in the benchmark's
untimed setup before every round, so both see the same machine load; the ratio is printed
and stored in extra_info. Peak memory: each variant runs once in its own subprocess (this
file as a script), which reports its peak rise after allocating the inputs (bench/memory.py:
the resident set on CPU, torch.cuda.max_memory_allocated on CUDA).

As a script (used for the memory runs and by bench/gpu_logprob.sh):
  python bench/test_bench_logprob.py --variant fused --tokens 2048 [--device cuda --dtype bf16]
  python bench/test_bench_logprob.py --compare --tokens 2048     # every variant, ratio table
"""
import argparse
import json
import os
import time

import torch

import memory

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
TOKENS = 16384 if FULL else 2048
HIDDEN, VOCAB = 576, 49152  # SmolLM2-135M
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    """Generated in place on the device: no temporary copy raises the memory high-water mark."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, scale=1.0, dt=dtype):
        return torch.empty(shape, dtype=dt, device=device).normal_(0.0, scale, generator=gen)

    return dict(h=normal(tokens, hidden).requires_grad_(True),
                w=normal(vocab, hidden, scale=2 / hidden ** 0.5).requires_grad_(True),
                targets=torch.randint(0, vocab, (tokens,), generator=gen, device=device),
                g=normal(tokens, dt=torch.float32), adv=normal(tokens, dt=torch.float32),
                mask=normal(tokens, dt=torch.float32) > -1.3)  # ~90% of tokens train


def _naive_logprob(x, upcast=True):
    logits = x["h"] @ x["w"].T
    logp_all = torch.log_softmax(logits.float() if upcast else logits, dim=-1)
    return logp_all.gather(1, x["targets"][:, None]).squeeze(1).float()


def _naive_policy_loss(logp, x):
    ratio = torch.exp(logp - logp.detach())  # on-policy, as policy_loss(old_logprobs=None)
    per_token = torch.maximum(-x["adv"] * ratio, -x["adv"] * ratio.clamp(0.8, 1.28))
    return (per_token * x["mask"]).sum() / x["mask"].sum()


SEQ_LEN, SOFTCAP = 256, 30.0


def _grpo_extras(x):
    n = x["targets"].shape[0]
    base = torch.full((n,), -10.8)  # about log(1 / V): near the random head's log-probs
    cu = torch.arange(0, n + SEQ_LEN, SEQ_LEN).clamp(max=n).unique().to(torch.int32)
    return dict(old=base, ref=base - 0.1, rollout=base + 0.2 * x["g"], cu=cu)


def _naive_grpo_loss(x, e):
    logits = x["h"] @ x["w"].T
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    logp = torch.log_softmax(logits, -1).gather(1, x["targets"][:, None]).squeeze(1)
    ratio = torch.exp(logp - e["old"])
    per_token = torch.maximum(-x["adv"] * ratio, -x["adv"] * ratio.clamp(0.8, 1.28))
    per_token = per_token * torch.exp(e["old"] - e["rollout"]).clamp(max=2.0)
    per_token = per_token + 0.04 * (torch.exp(e["ref"] - logp) - (e["ref"] - logp) - 1)
    m = x["mask"].float()
    seq = torch.repeat_interleave(torch.arange(len(e["cu"]) - 1), e["cu"].diff().long())
    sums = torch.zeros(len(e["cu"]) - 1).index_add(0, seq, per_token * m)
    counts = torch.zeros(len(e["cu"]) - 1).index_add(0, seq, m)
    return (sums / counts.clamp(min=1)).mean()


def run_variant(name, x):
    """One forward + backward of a variant; leaves the gradients in h.grad / w.grad."""
    import spell_kernels as sk

    x["h"].grad = x["w"].grad = None
    if name in ("naive", "naive_lowp"):
        (_naive_logprob(x, upcast=name == "naive") * x["g"]).sum().backward()
    elif name == "fused":
        (sk.fused_linear_logprob(x["h"], x["w"], x["targets"]) * x["g"]).sum().backward()
    elif name == "naive_policy":
        _naive_policy_loss(_naive_logprob(x), x).backward()
    elif name == "fused_policy":
        sk.policy_loss(x["h"], x["w"], x["targets"], None, x["adv"], x["mask"])[0].backward()
    elif name == "naive_grpo":
        _naive_grpo_loss(x, _grpo_extras(x)).backward()
    elif name == "fused_grpo":
        e = _grpo_extras(x)
        sk.policy_loss(x["h"], x["w"], x["targets"], e["old"], x["adv"], x["mask"], agg="grpo", cu_seqlens=e["cu"],
                       softcap=SOFTCAP, ref_logprobs=e["ref"], kl_coef=0.04, rollout_logprobs=e["rollout"],
                       rollout_is_cap=2.0)[0].backward()
    else:
        raise ValueError(f"unknown variant {name!r}")


def measure(name, tokens, hidden, vocab, dtype, device, reps):
    """Peak extra memory of the first run, then the best wall and CPU time of `reps` runs."""
    warm = make_inputs(8, 16, 64, DTYPES[dtype], device)  # thread pools, BLAS handles, Triton JIT
    run_variant(name, warm)
    del warm
    x = make_inputs(tokens, hidden, vocab, DTYPES[dtype], device)
    return {"variant": name, **memory.time_and_peak(lambda: run_variant(name, x), reps, device)}


def measure_in_subprocess(name, tokens, hidden=HIDDEN, vocab=VOCAB, dtype="fp32", device="cpu", reps=1, threads=0):
    argv = [os.path.abspath(__file__), "--variant", name, "--tokens", str(tokens), "--hidden", str(hidden),
            "--vocab", str(vocab), "--dtype", dtype, "--device", device, "--reps", str(reps), "--threads", str(threads)]
    return {"variant": name, **memory.run_json(argv, label=name)}


BASELINES = {"fused": "naive", "fused_policy": "naive_policy", "naive_lowp": "naive", "fused_grpo": "naive_grpo"}
COLUMNS = [("peak_extra_bytes", "peak extra MiB", memory.MiB), ("best_s", "wall s", 1), ("best_cpu_s", "cpu s", 1)]


def compare(variants, **kw):
    """Run each variant in its own process; print peak memory and time beside the naive ones."""
    results = {v: measure_in_subprocess(v, **kw) for v in variants}
    memory.print_table(results, BASELINES, COLUMNS)
    return results


# --- pytest-benchmark --------------------------------------------------------------------

def _bench_against_naive(benchmark, fused, naive, tokens, rounds):
    x = make_inputs(tokens, HIDDEN, VOCAB, torch.float32, "cpu")
    naive_times = []

    def run_naive_untimed():  # pedantic's setup: the baseline, right before each timed round
        t0 = time.perf_counter()
        run_variant(naive, x)
        naive_times.append(time.perf_counter() - t0)

    benchmark.pedantic(run_variant, args=(fused, x), setup=run_naive_untimed, rounds=rounds, iterations=1)
    fused_best = benchmark.stats.stats.min if benchmark.stats else None
    if fused_best is not None:
        ratio = fused_best / min(naive_times)
        benchmark.extra_info.update(naive_best_s=min(naive_times), ratio_vs_naive=ratio)
        print(f"\n{fused} vs {naive}, N={tokens} H={HIDDEN} V={VOCAB} fp32 CPU: best {fused_best:.3f}s vs "
              f"{min(naive_times):.3f}s -> {ratio:.2f}x")
    assert x["h"].grad is not None and x["w"].grad is not None


def test_fused_linear_logprob_time(benchmark):
    _bench_against_naive(benchmark, "fused", "naive", TOKENS, rounds=2)


def test_fused_policy_loss_time(benchmark):
    _bench_against_naive(benchmark, "fused_policy", "naive_policy", TOKENS, rounds=2)


def test_fused_grpo_loss_time(benchmark):
    """policy_loss with the TRL/verl pieces (soft-cap, k3 KL, rollout cap, grpo aggregation)."""
    _bench_against_naive(benchmark, "fused_grpo", "naive_grpo", TOKENS, rounds=2)


def test_peak_memory_vs_naive():
    results = compare(["naive", "fused", "naive_policy", "fused_policy"], tokens=TOKENS)
    for fused, naive in (("fused", "naive"), ("fused_policy", "naive_policy")):
        assert "error" not in results[fused] and "error" not in results[naive], results
        # not a timing: a fused path that needs more memory than the logits is broken
        assert results[fused]["peak_extra_bytes"] < results[naive]["peak_extra_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["naive", "naive_lowp", "fused", "naive_policy", "fused_policy",
                                              "naive_grpo", "fused_grpo"])
    parser.add_argument("--compare", nargs="*", metavar="VARIANT",
                        help="run these variants (default: all) in subprocesses and print ratios")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    kw = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype, device=args.device,
              reps=args.reps)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare is not None:
        variants = args.compare or ["naive", "naive_lowp", "fused", "naive_policy", "fused_policy", "naive_grpo",
                                    "fused_grpo"]
        print(json.dumps(compare(variants, threads=args.threads, **kw)))
    else:
        print(json.dumps(measure(args.variant, **kw)))


if __name__ == "__main__":
    main()
