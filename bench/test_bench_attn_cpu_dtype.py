"""The CPU attention path in bf16: computed in fp32 inside (flash-attn's accumulate-in-fp32 rule)
beside SDPA run in bf16, forward + backward of one causal sequence, SmolLM2-135M's heads (9 / 3,
D = 64), L = 2048. On CPUs without native bf16 the half-precision kernels are the slow ones, so
the fp32 path is also the faster (bench/results/attn_cpu_precision.md): asserted when timed
(--benchmark-enable) on a CPU whose /proc/cpuinfo shows no avx512_bf16 / amx_bf16; elsewhere the
ratio is only printed. Always asserted: both compute the same gradients (within bf16's error).

  .venv/bin/python -m pytest bench/test_bench_attn_cpu_dtype.py --benchmark-enable -s
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from test_bench_attention import HKV, HQ, D, _bench

LENGTH = 2048


def _bf16_inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(length, h, D, generator=g).to(torch.bfloat16) for h in (HQ, HKV, HKV, HQ))
    return [t.requires_grad_(True) for t in (q, k, v)] + [dout]


def _ours(q, k, v, dout):
    import spell_kernels as sk

    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    sk.flash_attn_varlen_func(q, k, v, cu, cu, q.shape[0], q.shape[0], causal=True).backward(dout)


def _sdpa(q, k, v, dout):
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
    out[0].transpose(0, 1).backward(dout)


def _native_bf16() -> bool | None:
    """True/False from the CPU flags in /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _gradients(fn):
    x = _bf16_inputs(LENGTH)
    fn(*x)
    return [t.grad.float() for t in x[:3]]


def test_cpu_bf16_fwd_bwd_same_gradients_as_sdpa_bf16_and_faster_without_native_bf16(benchmark):
    for name, ours, theirs in zip("qkv", _gradients(_ours), _gradients(_sdpa)):
        # both within ~1e-2 of float64 (bench/results/attn_cpu_precision.md): within 2e-2 of each other
        assert float((ours - theirs).abs().max()) <= 2e-2 * float(theirs.abs().max()), f"d{name}"
    x = _bf16_inputs(LENGTH)
    _bench(benchmark, lambda: _ours(*x), lambda: _sdpa(*x), rounds=3,
           label=f"bf16 forward + backward L={LENGTH}: ours (fp32 inside) vs SDPA bf16")
    if benchmark.stats and _native_bf16() is False:
        assert benchmark.extra_info["ratio_vs_baseline"] < 1.0, benchmark.extra_info
