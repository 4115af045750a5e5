"""Ring attention benchmarks (CPU).

- A ring of one (no process group) beside flash_attn_varlen_func and PyTorch SDPA on the
  same causal GQA sequence, forward + backward: the ring layer's own overhead.
- A ring of 4 gloo processes (and of 2) beside one process on the same global batch
  (bench/ring_bench.py): agreement with the single-process output, time ratio, and the share
  of each rank's time spent waiting on transfers. Printed, not asserted on.

Default sizes are quick; SPELL_BENCH_FULL=1 runs longer sequences.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import ring_bench
from spell_kernels.flash_attn import flash_attn_varlen_func
from spell_kernels.ring_attn import ring_flash_attn_varlen_func

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
SEQLEN = 4096 if FULL else 2048
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def _sdpa(q, k, v, cu, max_seqlen):
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


def _flash(q, k, v, cu, max_seqlen):
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


def _ring_of_one(q, k, v, cu, max_seqlen):
    return ring_flash_attn_varlen_func(q, k, v, cu, max_seqlen, causal=True)


VARIANTS = {"torch_sdpa": _sdpa, "flash_attn_varlen_func": _flash, "ring_of_one": _ring_of_one}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ring_of_one_overhead(benchmark, variant):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(SEQLEN, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    cu = torch.tensor([0, SEQLEN], dtype=torch.int32)
    fn = VARIANTS[variant]
    benchmark.group = f"causal attention fwd+bwd, {SEQLEN} tokens, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, fp32 CPU"

    def fwd_bwd():
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        fn(qg, kg, vg, cu, SEQLEN).backward(dout)
        return qg.grad

    dq = benchmark.pedantic(fwd_bwd, rounds=3, warmup_rounds=1)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    _sdpa(qr, kr, vr, cu, SEQLEN).backward(dout.double())
    assert (dq.double() - qr.grad).abs().max().item() < 1e-4


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_of_gloo_processes_vs_one_process(world_size):
    result = ring_bench.main(["--world-size", str(world_size), "--seqlen", str(SEQLEN), "--iters", "2"])
    print(f"\nring of {world_size} gloo ranks (1 thread each) vs 1 process (1 thread), causal, {SEQLEN} tokens:"
          f" ring {result['ring_ms']:.0f} ms, single {result['single_ms']:.0f} ms,"
          f" ratio {result['ring_over_single']:.2f}, per-rank efficiency {result['per_device_efficiency']:.2f},"
          f" waiting {100 * result['wait_share']:.1f}% / computing {100 * result['compute_share']:.1f}% of rank time,"
          f" max |ring - single| {result['max_abs_err_vs_single']:.2e}")
    assert result["max_abs_err_vs_single"] < 1e-4  # fp32; the tests hold the exact tolerances
