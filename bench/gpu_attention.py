"""Varlen flash attention on a GPU, one run (bench/gpu_attention.sh calls this; it is importable
so that its CPU pieces are tested in tests/kernels/test_gpu_attention_bench.py).

1. Correctness on the device, forward and backward, against float64 PyTorch: mixed lengths,
   GQA 9/3 and 8/1, head dims 64/80/96/128, q shorter than k, fp16 / bf16 / fp32, a
   shared-prefix batch against its separate sequences, both backwards (deterministic=True, and
   False: dq by fp32 atomics); error <= 2x (3x for gradients) PyTorch's own error in that
   dtype. The deterministic backward 10 times, bitwise equal.
2. TFLOP/s, causal, head dim 128, 16 heads, bf16 (batch = 64k / L sequences): our variants
   (forward: K/V via TMA or pointers; backward: deterministic or atomic dq) beside torch SDPA
   (its flash backend is FlashAttention-2) in the same run, each as a ratio to SDPA and to a
   bf16 matmul peak measured in the same run. H100 targets: forward >= 450, forward + backward
   >= 300 TFLOP/s at >= 16k.
3. A block-config sweep at L = 16k (GPU_CONFIGS alternatives per kernel), within the time left
   of an 8-minute budget (TIME_BUDGET_S).
The markdown tables are printed and written to $OUT_MD (default bench/results/gpu_attention.md),
ready for bench/RESULTS.md. DRY_RUN=1 runs it all on CPU through the Triton interpreter at tiny
sizes (checks the script, numbers meaningless). FULL=1 times every length 4k..128k.
"""
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F

import spell_kernels as sk
from spell_kernels import flash_attn
from spell_kernels.shared_prefix import SharedPrefixLayout
from tests.kernels.attn_oracle import check_close, lowp_attention, reference_attention

dry = os.environ.get("DRY_RUN") == "1"
dev = "cpu" if dry else "cuda"
TIME_BUDGET_S = float(os.environ.get("TIME_BUDGET_S", 450))
LENGTHS = ([4096, 8192, 16384, 32768, 65536, 131072] if os.environ.get("FULL") == "1"
           else [4096, 16384, 65536])
low = torch.float16 if dry else torch.bfloat16  # the interpreter's bf16 arithmetic is wrong

# (name, USE_TMA, deterministic): what the sweep compares; "auto" is what ships
VARIANTS = [("TMA, deterministic", None, True), ("TMA, atomic dq", None, False),
            ("pointers, deterministic", False, True)]
CONFIG_CANDIDATES = {
    "fwd_tma": [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)],
    "dkdv": [dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)],
    "dkdv_atomic": [dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
                    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)],
    "dq": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
           dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)],
}


def causal_flops(batch, heads, length, d, backward=False):
    """Matmul FLOPs of causal attention (half the score matrix): 2 matmuls forward, 5 backward
    (FlashAttention's count, 2.5x the forward, whatever a kernel recomputes)."""
    fwd = 4 * batch * heads * length * length * d / 2
    return fwd * 3.5 if backward else fwd


@contextlib.contextmanager
def variant(use_tma=None, configs=None):
    """flash_attn with USE_TMA and some GPU_CONFIGS entries replaced, restored afterwards.
    configs: {kind: {head_dim: config}}."""
    saved_tma = flash_attn.USE_TMA
    saved = {kind: dict(flash_attn.GPU_CONFIGS[kind]) for kind in (configs or {})}
    flash_attn.USE_TMA = use_tma
    for kind, table in (configs or {}).items():
        flash_attn.GPU_CONFIGS[kind].update(table)
    try:
        yield
    finally:
        flash_attn.USE_TMA = saved_tma
        for kind, table in saved.items():
            flash_attn.GPU_CONFIGS[kind].clear()
            flash_attn.GPU_CONFIGS[kind].update(table)


def throughput_table(rows, peak):
    """Markdown: one row per (L, what) with TFLOP/s, the ratio to SDPA at that L and to the
    matmul peak. rows: dicts L, batch, what, fwd, fwd_bwd (TFLOP/s), SDPA's rows what="SDPA"."""
    sdpa = {r["L"]: r for r in rows if r["what"] == "SDPA"}
    lines = [f"bf16 matmul peak measured in this run: {peak:.0f} TFLOP/s", "",
             "| L | batch | kernels | fwd TFLOP/s | fwd / SDPA | fwd / peak | fwd+bwd TFLOP/s | fwd+bwd / SDPA "
             "| fwd+bwd / peak |", "|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b and math.isfinite(a) and math.isfinite(b) else "—"

    for r in rows:
        base = sdpa.get(r["L"], {})
        lines.append(f"| {r['L']} | {r['batch']} | {r['what']} | {r['fwd']:.0f} | {ratio(r['fwd'], base.get('fwd'))} "
                     f"| {ratio(r['fwd'], peak)} | {r['fwd_bwd']:.0f} | {ratio(r['fwd_bwd'], base.get('fwd_bwd'))} "
                     f"| {ratio(r['fwd_bwd'], peak)} |")
    return "\n".join(lines)


def sweep_table(rows):
    """Markdown of the config sweep: rows of (kernel kind, config, ms or error, shipped?)."""
    lines = ["| kernel | config | ms | |", "|---|---|---|---|"]
    for kind, cfg, ms, shipped in rows:
        text = f"{ms:.2f}" if isinstance(ms, float) else ms
        lines.append(f"| {kind} | {cfg} | {text} | {'shipped' if shipped else ''} |")
    return "\n".join(lines)


def rand(*shape, dtype, gen):
    return torch.randn(*shape, device=dev, generator=gen).to(dtype)


# ------------------------------------------------------------------ 1. correctness
def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)


# ------------------------------------------------------------------ 1. correctness
def check_varlen(lens_q, lens_k, hq, hkv, d, dtype, causal, deterministic=True):
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = rand(sum(lens_q), hq, d, dtype=dtype, gen=gen), rand(sum(lens_k), hkv, d, dtype=dtype, gen=gen), \
        rand(sum(lens_k), hkv, d, dtype=dtype, gen=gen)
    dout = rand(sum(lens_q), hq, d, dtype=dtype, gen=gen)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = sk.flash_attn_varlen_func(qg, kg, vg, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                    deterministic=deterministic)
    out.backward(dout)
    scale = 1 / math.sqrt(d)
    out64, _, grads64 = reference_attention(q, k, v, dout, cu_q, cu_k, scale, causal)
    out_lp, _, grads_lp = lowp_attention(q, k, v, dout, cu_q, cu_k, scale, causal)
    check_close("out", out, out64, out_lp, 2)
    for name, got, g64, glp in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), grads64, grads_lp):
        check_close(name, got, g64, glp, 3)


def check_shared_prefix(dtype):
    layout = SharedPrefixLayout.from_groups([(2000, [300, 1, 0, 257]), 500, (64, [100])] if not dry
                                            else [(40, [7, 1, 0, 9]), 5])
    layout = layout.to(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    t, hq, hkv, d = layout.num_tokens, 9, 3, 64
    q, k, v = (rand(t, h, d, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = sk.shared_prefix_attn_func(qg, kg, vg, layout.cu_seqlens, layout.max_seqlen, layout.parent)
    dout = rand(t, hq, d, dtype=dtype, gen=gen)
    out.backward(dout)
    # the separate sequences [prefix + resp_i] (and plain ones), float64 and in dtype; the whole
    # prefix-row output gradient goes to the first copy (the gradient is linear in it)
    cu, parent = layout.cu_seqlens.tolist(), layout.parent.tolist()
    rows = [list(range(cu[s], cu[s + 1])) for s in range(len(parent))]
    seqs, first_copy = [], set()
    for s, p in enumerate(parent):
        if p >= 0:
            seqs.append((rows[p], rows[s], p not in first_copy))
            first_copy.add(p)
        elif s not in parent:
            seqs.append(([], rows[s], False))
    index = torch.tensor([i for pre, own, _ in seqs for i in pre + own], device=dev)
    dsep = torch.cat([torch.cat([dout[pre] if first else torch.zeros_like(dout[pre]), dout[own]])
                      for pre, own, first in seqs])
    cu_sep = cu_of([len(pre) + len(own) for pre, own, _ in seqs])
    out64, _, g64 = reference_attention(q[index], k[index], v[index], dsep, cu_sep, cu_sep, 1 / 8, True)
    out_lp, _, glp = lowp_attention(q[index], k[index], v[index], dsep, cu_sep, cu_sep, 1 / 8, True)

    def fold(x, like):
        return torch.zeros(like.shape, dtype=torch.float64, device=dev).index_add_(0, index, x.double())

    def take(x, like):
        r = torch.zeros(like.shape, dtype=torch.float64, device=dev)
        r[index] = x.double()
        return r

    check_close("shared out", out, take(out64, q), take(out_lp, q), 2)
    for name, got, a, b, like in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), g64, glp, (q, k, v)):
        check_close("shared " + name, got, fold(a, like), fold(b, like), 3)


def check_determinism():
    gen = torch.Generator(device=dev).manual_seed(2)
    lens = [3000, 1000, 17] if not dry else [40, 17]
    q, k, v, dout = (rand(sum(lens), h, 128, dtype=torch.bfloat16 if not dry else torch.float16, gen=gen)
                     for h in (8, 2, 2, 8))
    cu = cu_of(lens)
    out, lse = flash_attn.varlen_forward(q, k, v, cu, cu, max(lens), max(lens), None, True)
    first = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, max(lens), max(lens), None, True)
    for _ in range(9):
        again = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, max(lens), max(lens), None, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "backward not bitwise deterministic"


def _with(context, fn):
    with context:
        return fn()


MIXED = [0, 1, 17, 113, 203, 1023, 4000] if not dry else [0, 1, 17, 40]
CASES = [
    ("mixed lengths, 9/3, D=64, causal", lambda: check_varlen(MIXED, MIXED, 9, 3, 64, low, True)),
    ("q shorter/longer than k, 8/2, D=80, fp16", lambda: check_varlen([5, 400, 33, 0], [9, 700, 20, 3], 8, 2, 80,
                                                                    torch.float16, True)),
    ("non-causal, 8/1, D=96", lambda: check_varlen([300, 77], [250, 77], 8, 1, 96, low, False)),
    ("D=128, 16/16, causal", lambda: check_varlen([2048, 1000] if not dry else [40], [2048, 1000] if not dry else [40],
                                                  16 if not dry else 2, 16 if not dry else 2, 128, low, True)),
    ("fp32, D=128, 4/2", lambda: check_varlen([257, 31], [257, 31], 4, 2, 128, torch.float32, True)),
    ("atomic dq (deterministic=False), mixed lengths, 9/3, D=128", lambda: check_varlen(
        MIXED, MIXED, 9, 3, 128, low, True, deterministic=False)),
    ("pointer forward (USE_TMA=False), 8/2, D=64", lambda: _with(variant(use_tma=False), lambda: check_varlen(
        MIXED, MIXED, 8, 2, 64, low, True))),
    ("shared prefix vs separate", lambda: check_shared_prefix(low)),
    ("backward determinism x10", check_determinism),
]


def run_correctness():
    failures = []
    print("\n## correctness on", torch.cuda.get_device_name() if not dry else "CPU (interpreter dry run)")
    for name, fn in CASES:
        try:
            fn()
            print(f"- PASS {name}")
        except Exception as e:  # report and continue: one run should show every problem
            failures.append(name)
            print(f"- FAIL {name}: {type(e).__name__}: {str(e)[:400]}")
    return failures


# ------------------------------------------------------------------ 2. throughput
def timed(fn, min_reps=5, min_s=0.3):
    fn()  # JIT compile / warm up
    if dev == "cuda":
        torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if dry:
            break
    return sorted(times)[len(times) // 2]


def matmul_peak():
    n = 8192 if not dry else 64
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if not dry else torch.float32)
    return 2 * n ** 3 / timed(lambda: a @ a) / 1e12


def attention_rows(length, heads=16, d=128, dtype=torch.bfloat16):
    """Rows for throughput_table at one length: each variant of ours, then SDPA."""
    batch = max(1, 65536 // length) if not dry else 1
    gen = torch.Generator(device=dev).manual_seed(3)
    q, k, v, dout = (rand(batch * length, heads, d, dtype=dtype, gen=gen) for _ in range(4))
    cu = torch.arange(batch + 1, device=dev, dtype=torch.int32) * length
    flops_fwd, flops_all = causal_flops(batch, heads, length, d), causal_flops(batch, heads, length, d, True)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    rows = []

    def rate(fn, flops, label):
        try:
            return flops / timed(fn) / 1e12
        except Exception as e:  # e.g. out of memory at 128k for a baseline
            print(f"  {label} at L={length}: {type(e).__name__}: {str(e)[:200]}")
            return float("nan")

    for name, use_tma, deterministic in VARIANTS:
        with variant(use_tma=use_tma):
            def fwd():
                with torch.no_grad():
                    sk.flash_attn_varlen_func(q, k, v, cu, cu, length, length, causal=True)

            def fwd_bwd():
                sk.flash_attn_varlen_func(qg, kg, vg, cu, cu, length, length, causal=True,
                                          deterministic=deterministic).backward(dout)
            rows.append(dict(L=length, batch=batch, what=name, fwd=rate(fwd, flops_fwd, name),
                             fwd_bwd=rate(fwd_bwd, flops_all, name)))

    qb, kb, vb, db = (t.view(batch, length, heads, d).transpose(1, 2) for t in (q, k, v, dout))
    qbg, kbg, vbg = (t.detach().clone().requires_grad_(True) for t in (qb, kb, vb))

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(qbg, kbg, vbg, is_causal=True).backward(db)

    rows.append(dict(L=length, batch=batch, what="SDPA", fwd=rate(sdpa_fwd, flops_fwd, "SDPA"),
                     fwd_bwd=rate(sdpa_fwd_bwd, flops_all, "SDPA")))
    return rows


def shared_prefix_ratio(prefix=8192, g=8, resp=512, heads=16, d=128):
    if dry:
        prefix, g, resp, heads = 64, 2, 16, 2
    layout = SharedPrefixLayout.from_groups([(prefix, [resp] * g)]).to(dev)
    gen = torch.Generator(device=dev).manual_seed(4)
    q, k, v, dout = (rand(layout.num_tokens, heads, d, dtype=low, gen=gen) for _ in range(4))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    index = torch.cat([torch.cat([torch.arange(prefix), prefix + i * resp + torch.arange(resp)])
                       for i in range(g)]).to(dev)
    cu = torch.arange(g + 1, dtype=torch.int32, device=dev) * (prefix + resp)
    t_shared = timed(lambda: sk.shared_prefix_attn_func(q, k, v, layout.cu_seqlens, layout.max_seqlen,
                                                          layout.parent).backward(dout))
    t_sep = timed(lambda: sk.flash_attn_varlen_func(q[index], k[index], v[index], cu, cu, prefix + resp,
                                                      prefix + resp, causal=True).backward(dout[index]))
    return t_shared, t_sep


# ------------------------------------------------------------------ 3. config sweep
def config_sweep(deadline):
    """Time each candidate config of each kernel kind at L = 16k, head dim 128, until deadline."""
    length, batch = (16384, 4) if not dry else (64, 1)
    heads = 16 if not dry else 2
    gen = torch.Generator(device=dev).manual_seed(5)
    q, k, v, dout = (rand(batch * length, heads, 128, dtype=low, gen=gen) for _ in range(4))
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev) * length
    out, lse = flash_attn.varlen_forward(q, k, v, cu, cu, length, length, None, True)
    rows = []
    for kind, configs in CONFIG_CANDIDATES.items():
        shipped = flash_attn.GPU_CONFIGS[kind][128]
        for cfg in configs:
            if time.perf_counter() > deadline:
                rows.append((kind, cfg, "skipped (time budget)", cfg == shipped))
                continue
            with variant(use_tma=None, configs={kind: {128: cfg}}):
                try:
                    if kind.startswith("fwd"):
                        fn = lambda: flash_attn.varlen_forward(q, k, v, cu, cu, length, length, None, True)  # noqa: E731
                    else:
                        fn = lambda: flash_attn.varlen_backward(  # noqa: E731
                            dout, q, k, v, out, lse, cu, cu, length, length, None, True,
                            deterministic=kind != "dkdv_atomic")
                    rows.append((kind, cfg, timed(fn) * 1e3, cfg == shipped))
                except Exception as e:
                    rows.append((kind, cfg, f"{type(e).__name__}: {str(e)[:120]}", cfg == shipped))
    return rows


def main():
    start = time.perf_counter()
    failures = run_correctness()
    print("\n## throughput (TFLOP/s; causal, D=128, 16 heads, bf16; batch = 64k / L sequences)")
    peak = matmul_peak()
    rows = []
    for length in (LENGTHS if not dry else [64]):
        rows += attention_rows(length, **({} if not dry else dict(heads=2, dtype=torch.float16)))
    table = throughput_table(rows, peak)
    print(table)
    t_shared, t_sep = shared_prefix_ratio()
    shared = (f"shared prefix 8k + 8x512 fwd+bwd (16 heads, D=128): {t_shared * 1e3:.1f} ms vs separate "
              f"{t_sep * 1e3:.1f} ms -> {t_sep / t_shared:.2f}x faster")
    print("\n" + shared)
    sweep = config_sweep(start + TIME_BUDGET_S)
    print("\n## config sweep at L = 16k, head dim 128 (ms; lower is better)\n" + sweep_table(sweep))
    device = torch.cuda.get_device_name() if not dry else "CPU (interpreter dry run)"
    md = (f"# GPU attention ({device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
          f"Command: `bench/gpu_attention.sh`; correctness failures: {failures or 'none'}\n\n{table}\n\n{shared}\n\n"
          f"Config sweep at L = 16k, head dim 128:\n\n{sweep_table(sweep)}\n")
    path = os.environ.get("OUT_MD", "bench/results/gpu_attention.md" if not dry else "")
    if path:
        with open(path, "w") as f:
            f.write(md)
        print(f"\nwritten to {path} ({time.perf_counter() - start:.0f} s in all)")
    if failures:
        raise SystemExit(f"correctness failures: {failures}")


if __name__ == "__main__":
    main()
