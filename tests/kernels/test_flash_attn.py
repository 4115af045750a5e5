"""flash_attn_varlen_func against the float64 reference: the Triton kernels (interpreted, small
shapes) and the CPU path (the heavy shapes, bf16), with flash-attn-style tolerances."""
import math
import os
import subprocess
import sys

import pytest
import torch

from spell_kernels import attn_cpu, flash_attn, flash_attn_varlen_func
from tests.kernels.attn_oracle import (check_close, cu_seqlens, lowp_attention, max_err,
                                       reference_attention)

MIXED = [0, 1, 17, 113, 203]
# (head_dim, Hq, Hkv): GQA ratios 1, 2, 3 (9/3 as SmolLM2), 4, 8 across the supported head dims
HEADS = [(64, 4, 4), (64, 4, 2), (80, 9, 3), (96, 8, 1), (128, 4, 1)]


def _inputs(lens_q, lens_k, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    dout = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    return q, k, v, dout


def _run(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, scale=None):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                      return_lse=True)
    out.backward(dout)
    return out.detach(), lse, (q.grad, k.grad, v.grad)


def _check_against_reference(lens_q, lens_k, hq, hkv, d, dtype, causal, scale=None):
    q, k, v, dout = _inputs(lens_q, lens_k, hq, hkv, d, dtype)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, grads = _run(q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k), causal, scale)
    scale_value = scale if scale is not None else 1 / math.sqrt(d)
    out64, lse64, grads64 = reference_attention(q, k, v, dout, cu_q, cu_k, scale_value, causal)
    out_lp, lse_lp, grads_lp = lowp_attention(q, k, v, dout, cu_q, cu_k, scale_value, causal)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (hq, q.shape[0])
    check_close("out", out, out64, out_lp, 2)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), seen), "rows without keys must have lse = -inf"
    assert (out[~seen.T] == 0).all(), "rows without keys must output 0"
    check_close("lse", lse[seen], lse64[seen], lse_lp[seen], 2, dtype=dtype)
    for name, g, g64, g_lp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        assert g.dtype == dtype
        check_close(name, g, g64, g_lp, 3)


# ---------------------------------------------------------------- Triton kernels (interpreter)

def _interpret_blocks(monkeypatch, block_m, block_n):
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=block_m, BLOCK_N=block_n))


@pytest.mark.parametrize("causal,block_m,block_n", [(True, 64, 32), (True, 32, 64), (False, 32, 32)])
def test_triton_mixed_lengths(triton_path, monkeypatch, causal, block_m, block_n):
    # unequal query/key blocks, as the shipped GPU configs have, move the diagonal inside blocks
    _interpret_blocks(monkeypatch, block_m, block_n)
    _check_against_reference(MIXED, MIXED, 2, 1, 64, torch.float32, causal)


@pytest.mark.parametrize("d,hq,hkv", HEADS)
def test_triton_head_dims_and_gqa(triton_path, d, hq, hkv):
    _check_against_reference([17, 40], [17, 40], hq, hkv, d, torch.float32, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_q_shorter_and_longer_than_k(triton_path, monkeypatch, causal):
    # bottom-right causal alignment; 33 queries over 20 keys leaves 13 rows with no key
    _interpret_blocks(monkeypatch, 16, 32)
    _check_against_reference([5, 40, 1, 33, 0, 2], [9, 70, 1, 20, 3, 0], 4, 2, 64, torch.float32, causal,
                             scale=0.3)


@pytest.mark.parametrize("d", [64, 80])
def test_triton_fp16(triton_path, d):
    _check_against_reference([1, 17, 70], [1, 17, 70], 4, 2, d, torch.float16, causal=True)


def test_triton_long_sequence(triton_path, monkeypatch):
    _interpret_blocks(monkeypatch, 64, 64)
    _check_against_reference([1023, 17], [1023, 17], 1, 1, 64, torch.float16, causal=True)


def test_triton_backward_is_deterministic(triton_path, monkeypatch):
    _interpret_blocks(monkeypatch, 64, 32)
    lens = [33, 20]
    q, k, v, dout = _inputs(lens, lens, 4, 2, 64, torch.float16, seed=3)
    cu = cu_seqlens(lens)
    out, lse = flash_attn.varlen_forward(q, k, v, cu, cu, 33, 33, None, True)
    first = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 33, 33, None, True)
    for _ in range(19):
        again = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 33, 33, None, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_backward_from_superset_lse(monkeypatch, mode):
    """varlen_backward with out/lse of attention over all keys gives each key block's share
    (what ring attention does): the shares of two disjoint key halves sum to the full gradient.
    Both paths: Triton (interpreted) and the CPU path."""
    monkeypatch.setenv("SPELL_KERNELS", mode)
    lens_q, lens_k = [20, 9], [40, 30]
    q, k, v, dout = _inputs(lens_q, lens_k, 2, 1, 64, torch.float32, seed=5)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse = flash_attn.varlen_forward(q, k, v, cu_q, cu_k, 20, 40, None, False)
    full = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 20, 40, None, False)
    halves = [[0, 17, 40, 55], [17, 40, 55, 70]]  # each half: keys lo0:hi0 of sequence 0, lo1:hi1 of 1
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo0, hi0, lo1, hi1 in halves:
        idx = torch.cat([torch.arange(lo0, hi0), torch.arange(lo1, hi1)])
        cu_half = cu_seqlens([hi0 - lo0, hi1 - lo1])
        g = flash_attn.varlen_backward(dout, q, k[idx], v[idx], out, lse, cu_q, cu_half, 20, 23, None, False)
        dq += g[0]
        dk[idx] += g[1]
        dv[idx] += g[2]
    ref = reference_attention(q, k, v, dout, cu_q, cu_k, 1 / 8, False)[2]
    for got_split, got_full, expected in zip((dq, dk, dv), full, ref):
        assert max_err(got_full, expected) < 1e-5
        assert max_err(got_split, expected) < 1e-5


# ---------------------------------------------------------------- CPU path (heavy shapes)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_mixed_lengths(torch_path, dtype, causal):
    lens = MIXED + [1023]
    _check_against_reference(lens, lens, 3, 1, 64, dtype, causal)


@pytest.mark.parametrize("d,hq,hkv", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_dims_and_gqa(torch_path, d, hq, hkv, dtype):
    _check_against_reference([1, 113, 203], [1, 113, 203], hq, hkv, d, dtype, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_q_shorter_and_longer_than_k(torch_path, dtype, causal):
    _check_against_reference([5, 140, 1, 233, 0, 2], [9, 270, 1, 120, 3, 0], 8, 2, 128, dtype, causal)


@pytest.mark.parametrize("expand", [True, False])
def test_cpu_gqa_backward_with_and_without_expanded_kv(torch_path, monkeypatch, expand):
    # the CPU path expands K/V to the query heads for the backward when threads outnumber KV heads
    monkeypatch.setattr(attn_cpu, "_expand_kv_heads", lambda hq, hkv: expand)
    _check_against_reference([1, 113, 60], [1, 113, 90], 8, 2, 64, torch.float32, causal=True)


def test_cpu_backward_is_deterministic(torch_path):
    lens = [300, 200]  # several threads share the work: the sums must not depend on scheduling
    q, k, v, dout = _inputs(lens, lens, 6, 2, 64, torch.bfloat16, seed=4)
    cu = cu_seqlens(lens)
    out, lse = flash_attn.varlen_forward(q, k, v, cu, cu, 300, 300, None, True)
    first = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 300, 300, None, True)
    for _ in range(19):
        again = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 300, 300, None, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


_PEAK_SCRIPT = r"""
import torch
from spell_kernels import flash_attn_varlen_func

def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

L, h, d = 8192, 2, 64
cu = torch.tensor([0, L], dtype=torch.int32)
q, k, v, dout = (torch.randn(L, h, d) for _ in range(4))
q.requires_grad_(True)
small = torch.randn(64, h, d, requires_grad=True)  # load every code path before measuring
cu_small = torch.tensor([0, 64], dtype=torch.int32)
flash_attn_varlen_func(small, small, small, cu_small, cu_small, 64, 64, causal=True).sum().backward()
# the peak RSS back to the current level: a child starts with its parent's (pytest's) high-water mark
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_bytes("VmRSS")
flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True).backward(dout)
print("PEAK-KIB", (status_bytes("VmHWM") - before) // 1024)
"""


def test_cpu_path_forms_no_score_matrix():
    """At L = 8192 the (L, L) fp32 scores of one head alone take 256 MiB; forward + backward on
    the CPU path raise the process's peak RSS by less than half that (inputs: 8 MiB)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPELL_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kib = int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK-KIB")).split()[1])
    # measured: ~64 MiB at L = 8192, growing linearly with L (~50 MiB at 4096, ~94 MiB at 16384)
    assert peak_kib * 1024 < 8192 * 8192 * 4 // 2, f"peak grew by {peak_kib} KiB: not memory-efficient"


# ---------------------------------------------------------------- dispatch and input errors

def test_dispatch(monkeypatch):
    q, k, v, _ = _inputs([5], [5], 2, 2, 64, torch.float32)
    cu = cu_seqlens([5])
    calls = []

    def fake_triton_forward(q, k, v, cu_q, cu_k, max_q, scale, causal, parent):
        calls.append("triton")
        return attn_cpu.varlen_forward(q, k, v, cu_q, cu_k, scale, causal, parent)

    monkeypatch.setattr(flash_attn, "_triton_forward", fake_triton_forward)
    monkeypatch.delenv("SPELL_KERNELS", raising=False)
    flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    assert calls == []  # CPU tensors: the PyTorch path
    monkeypatch.setenv("SPELL_KERNELS", "triton")
    flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    assert calls == ["triton"]


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(monkeypatch, mode):
    monkeypatch.setenv("SPELL_KERNELS", mode)
    q, k, v, _ = _inputs([5], [5], 4, 2, 64, torch.float32)
    cu = cu_seqlens([5])
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q, k, v, cu.long(), cu, 5, 5)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_attn_varlen_func(q[:, :3], k, v, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="same number of segments"):
        flash_attn_varlen_func(q, k, v, cu, cu_seqlens([2, 3]), 5, 5)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attn_varlen_func(q, k.half(), v.half(), cu, cu, 5, 5)
    with pytest.raises(ValueError, match="ends at 7 but q holds 5 tokens"):
        flash_attn_varlen_func(q, k, v, cu_seqlens([7]), cu, 7, 5)
    with pytest.raises(ValueError, match="never decrease"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 4, 3, 5], dtype=torch.int32), cu_seqlens([2, 1, 2]), 5, 5)
    if mode == "triton":
        with pytest.raises(ValueError, match="max_seqlen_q"):
            flash_attn_varlen_func(q, k, v, cu, cu, 4, 5)
        big = torch.zeros(5, 2, 256)
        with pytest.raises(ValueError, match="head_dim 256"):
            flash_attn_varlen_func(big, big, big, cu, cu, 5, 5)
