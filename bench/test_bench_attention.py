"""Varlen attention on CPU: the memory-efficient CPU path beside torch SDPA, and shared-prefix
training beside running the group's sequences separately (GPU numbers: bench/gpu_attention.sh).

1. cpu_vs_sdpa: one causal sequence, SmolLM2-135M's heads (9 query / 3 KV, head dim 64), fp32,
   forward + backward, L = 4096 and 8192 (SPELL_BENCH_FULL=1: also 16384 and 32768).
   ours:        flash_attn_varlen_func on CPU tensors (the CPU path)
   sdpa:        F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), (1, H, L, D)
   sdpa_repeat_kv: SDPA after repeating K/V to the query heads (transformers' repeat_kv); on
                torch 2.13 CPU the GQA backward is ~20x slower than this
   sdpa_math:   SDPA's math backend, the plain formula with (H, L, L) scores, what an
                implementation without a fused kernel pays (L <= 4096 only: ~10 GB at 8192)
2. shared_prefix: training forward + backward of one group, prefix 8192 + G = 8 responses of
   512, causal: shared_prefix_attn_func (prefix once) vs the 8 sequences [prefix + resp_i] in
   one varlen call. Heads 3 / 1 by default (SPELL_BENCH_FULL=1: 9 / 3).

Time: pytest-benchmark on ours; the baseline runs in the benchmark's untimed setup before every
round (both see the same machine load); the ratio is printed and kept in extra_info.
Memory: each variant runs once in its own subprocess (this file as a script) and reports its peak
RSS rise after the inputs are allocated (bench/memory.py). For shared_prefix, also the bytes
autograd saves for the backward (saved_tensors_hooks): the activation memory the attention keeps.

As a script:
  python bench/test_bench_attention.py --variant ours --length 32768        # one run, JSON
  python bench/test_bench_attention.py --compare --length 8192              # all variants
  python bench/test_bench_attention.py --compare-shared                      # shared prefix
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import memory

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
LENGTHS = [4096, 8192, 16384, 32768] if FULL else [4096, 8192]
HQ, HKV, D = 9, 3, 64  # SmolLM2-135M
PREFIX, G, RESPONSE = 8192, 8, 512
SHARED_HEADS = (9, 3) if FULL else (3, 1)


def _inputs(length, hq=HQ, hkv=HKV, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, hq, d, generator=g).requires_grad_(True)
    k = torch.randn(length, hkv, d, generator=g).requires_grad_(True)
    v = torch.randn(length, hkv, d, generator=g).requires_grad_(True)
    return q, k, v, torch.randn(length, hq, d, generator=g)


def run_single(variant, q, k, v, dout):
    """One forward + backward of one causal sequence (packed layout (L, H, D))."""
    import spell_kernels as sk

    for t in (q, k, v):
        t.grad = None
    length = q.shape[0]
    if variant == "ours":
        cu = torch.tensor([0, length], dtype=torch.int32)
        out = sk.flash_attn_varlen_func(q, k, v, cu, cu, length, length, causal=True)
    else:
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if variant == "sdpa":
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        elif variant == "sdpa_repeat_kv":
            rep = qb.shape[1] // kb.shape[1]
            kb, vb = (t.repeat_interleave(rep, dim=1) for t in (kb, vb))
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        elif variant == "sdpa_math":
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        else:
            raise ValueError(f"unknown variant {variant!r}")
        out = out[0].transpose(0, 1)
    out.backward(dout)


def shared_inputs(hq, hkv, seed=0):
    from spell_kernels.shared_prefix import SharedPrefixLayout

    layout = SharedPrefixLayout.from_groups([(PREFIX, [RESPONSE] * G)])
    q, k, v, dout = _inputs(layout.num_tokens, hq, hkv, D, seed)
    return layout, q, k, v, dout


def run_shared(variant, layout, q, k, v, dout):
    """Forward + backward of one group: packed with its prefix once, or as G separate sequences."""
    import spell_kernels as sk

    for t in (q, k, v):
        t.grad = None
    if variant == "shared":
        out = sk.shared_prefix_attn_func(q, k, v, layout.cu_seqlens, layout.max_seqlen, layout.parent)
        out.backward(dout)
        return
    if variant != "separate":
        raise ValueError(f"unknown variant {variant!r}")
    # [prefix + resp_i] for each i, gathered into one packed batch (the prefix copied G times)
    index = torch.cat([torch.cat([torch.arange(PREFIX), PREFIX + i * RESPONSE + torch.arange(RESPONSE)])
                       for i in range(G)])
    cu = torch.arange(G + 1, dtype=torch.int32) * (PREFIX + RESPONSE)
    out = sk.flash_attn_varlen_func(q[index], k[index], v[index], cu, cu, PREFIX + RESPONSE, PREFIX + RESPONSE,
                                    causal=True)
    out.backward(dout[index])


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for the backward while fn builds its graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure(case, variant, length, reps=1):
    """Peak extra RSS of the first run (in this process: run it in a fresh one), best wall time."""
    if case == "single":
        small = _inputs(64)
        run_single(variant, *small)  # thread pools and lazy imports before the baseline level
        x = _inputs(length)
        run = lambda: run_single(variant, *x)  # noqa: E731
    else:
        layout, *x = shared_inputs(*SHARED_HEADS)
        run = lambda: run_shared(variant, layout, *x)  # noqa: E731
    result = {"case": case, "variant": variant, "length": length, "threads": torch.get_num_threads(),
              **memory.time_and_peak(run, reps)}
    if case == "shared":
        layout, *x = shared_inputs(*SHARED_HEADS)
        result["saved_for_backward_bytes"] = saved_bytes(lambda: run_shared(variant, layout, *x))
    return result


def measure_in_subprocess(case, variant, length=0, reps=1):
    argv = [os.path.abspath(__file__), "--case", case, "--variant", variant, "--length", str(length), "--reps",
            str(reps)]
    return {"variant": variant, **memory.run_json(argv, label=variant)}


COLUMNS = [("peak_extra_bytes", "peak extra MiB", memory.MiB), ("best_s", "best s", 1),
           ("saved_for_backward_bytes", "saved for backward MiB", memory.MiB)]


def compare_single(length, reps=1):
    variants = ["sdpa", "sdpa_repeat_kv", "ours"] + (["sdpa_math"] if length <= 4096 else [])
    results = {v: measure_in_subprocess("single", v, length, reps) for v in variants}
    print(f"\nL = {length}, heads {HQ}/{HKV}, D = {D}, fp32, causal, forward + backward")
    memory.print_table(results, "sdpa", COLUMNS)
    return results


def compare_shared(reps=1):
    results = {v: measure_in_subprocess("shared", v, 0, reps) for v in ("separate", "shared")}
    print(f"\nprefix {PREFIX} + {G} x {RESPONSE}, heads {SHARED_HEADS[0]}/{SHARED_HEADS[1]}, D = {D}, fp32, "
          "forward + backward")
    memory.print_table(results, "separate", COLUMNS)
    return results


# --- pytest-benchmark --------------------------------------------------------------------

def _bench(benchmark, ours, baseline, rounds, label):
    baseline_times = []

    def run_baseline_untimed():  # pedantic's setup: the baseline right before each timed round
        t0 = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - t0)

    benchmark.pedantic(ours, setup=run_baseline_untimed, rounds=rounds, iterations=1)
    if benchmark.stats:
        ours_best, base_best = benchmark.stats.stats.min, min(baseline_times)
        benchmark.extra_info.update(baseline_best_s=base_best, ratio_vs_baseline=ours_best / base_best)
        print(f"\n{label}: best {ours_best:.3f}s vs baseline {base_best:.3f}s -> {ours_best / base_best:.2f}x")


@torch.no_grad()
def _forward_only(variant, q, k, v):
    import spell_kernels as sk

    length = q.shape[0]
    if variant == "ours":
        cu = torch.tensor([0, length], dtype=torch.int32)
        return sk.flash_attn_varlen_func(q, k, v, cu, cu, length, length, causal=True)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)


def test_cpu_forward_vs_sdpa(benchmark, length=LENGTHS[-1]):
    q, k, v, _ = _inputs(length)
    _bench(benchmark, lambda: _forward_only("ours", q, k, v), lambda: _forward_only("sdpa", q, k, v),
           rounds=3, label=f"forward L={length} ours vs SDPA")


def test_cpu_forward_backward_vs_sdpa(benchmark, length=LENGTHS[-1]):
    x = _inputs(length)
    # the faster of the two SDPA forms as the baseline (see sdpa_repeat_kv above)
    _bench(benchmark, lambda: run_single("ours", *x), lambda: run_single("sdpa_repeat_kv", *x), rounds=2,
           label=f"forward+backward L={length} ours vs SDPA (K/V repeated)")
    assert x[0].grad is not None


def test_shared_prefix_training_vs_separate(benchmark):
    layout, *x = shared_inputs(*SHARED_HEADS)
    _bench(benchmark, lambda: run_shared("shared", layout, *x), lambda: run_shared("separate", layout, *x),
           rounds=1, label=f"shared prefix {PREFIX} + {G}x{RESPONSE} vs separate")


def test_peak_memory_vs_sdpa():
    for length in LENGTHS:
        results = compare_single(length)
        assert "error" not in results["ours"], results
        if "sdpa_math" in results and "error" not in results["sdpa_math"]:
            # not a timing: a memory-efficient path that needs as much as the (L, L) scores is broken
            assert results["ours"]["peak_extra_bytes"] < results["sdpa_math"]["peak_extra_bytes"]


def test_shared_prefix_memory_vs_separate():
    results = compare_shared()
    assert "error" not in results["shared"] and "error" not in results["separate"], results
    assert results["shared"]["saved_for_backward_bytes"] < results["separate"]["saved_for_backward_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["single", "shared"], default="single")
    parser.add_argument("--variant", choices=["ours", "sdpa", "sdpa_repeat_kv", "sdpa_math", "shared", "separate"])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="all single-sequence variants, subprocesses")
    parser.add_argument("--compare-shared", action="store_true", help="shared prefix vs separate, subprocesses")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare_single(args.length, args.reps)))
    elif args.compare_shared:
        print(json.dumps(compare_shared(args.reps)))
    else:
        print(json.dumps(measure(args.case, args.variant, args.length, args.reps)))


if __name__ == "__main__":
    main()
