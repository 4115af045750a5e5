"""The Hopper paths of flash_attn, run through the Triton interpreter at tiny shapes: the forward
reading K/V through TMA tensor descriptors (USE_TMA), against the float64 reference and bitwise
against the pointer path, including the shared-prefix parent ranges."""
import pytest
import torch

from spell_kernels import flash_attn
from tests.kernels.attn_oracle import cu_seqlens
from tests.kernels.test_flash_attn import _check_against_reference, _inputs, _interpret_blocks
from tests.kernels.test_shared_prefix import GROUPS_SMALL, _check_equivalence


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setattr(flash_attn, "USE_TMA", True)


@pytest.mark.parametrize("causal", [True, False])
def test_tma_forward_against_reference(triton_path, monkeypatch, tma, causal):
    # q shorter and longer than k (bottom-right diagonal, rows without keys), GQA 4/2
    _interpret_blocks(monkeypatch, 16, 32)
    _check_against_reference([5, 40, 33, 0], [9, 70, 20, 3], 4, 2, 64, torch.float16, causal)


def test_tma_forward_shared_prefix(triton_path, monkeypatch, tma):
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=32, BLOCK_N=16))
    _check_equivalence(GROUPS_SMALL, 4, 2, 64, torch.float16)


def test_tma_and_pointer_forward_agree_bitwise(triton_path, monkeypatch):
    # a masked block's rows past its segment are other tokens under TMA and zeros without it:
    # both are masked out of the scores, so the two paths give the same bits
    _interpret_blocks(monkeypatch, 16, 16)
    lens_q, lens_k = [7, 30, 1], [20, 30, 9]
    q, k, v, _ = _inputs(lens_q, lens_k, 4, 1, 32, torch.float16, seed=5)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    runs = []
    for use_tma in (True, False):
        monkeypatch.setattr(flash_attn, "USE_TMA", use_tma)
        assert flash_attn._use_tma(k, v) is use_tma
        runs.append(flash_attn.varlen_forward(q, k, v, cu_q, cu_k, 30, 30, None, True))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_tma_needs_packed_power_of_two_heads(monkeypatch):
    monkeypatch.setattr(flash_attn, "USE_TMA", True)
    k = torch.zeros(10, 2, 64, dtype=torch.float16)
    assert not flash_attn._use_tma(k.float(), k.float())  # fp32: the checking path keeps pointers
    assert flash_attn._use_tma(k, k)
    assert not flash_attn._use_tma(k[:, :, :48], k[:, :, :48])  # not packed
    k80 = torch.zeros(10, 2, 80, dtype=torch.float16)
    assert not flash_attn._use_tma(k80, k80)  # a 128-wide block would span two heads
    monkeypatch.setattr(flash_attn, "USE_TMA", None)
    assert not flash_attn._use_tma(k, k)  # auto: CPU tensors have no TMA


def test_non_positive_scale_is_refused_by_the_kernels(triton_path):
    q, k, v, _ = _inputs([4], [4], 2, 2, 32, torch.float16)
    cu = cu_seqlens([4])
    with pytest.raises(ValueError, match="softmax_scale must be positive"):
        flash_attn.varlen_forward(q, k, v, cu, cu, 4, 4, -0.5, True)


# ---------------------------------------------------------------- deterministic=False (atomic dq)

def _reference_gradients(lens_q, lens_k, hq, hkv, d, dtype, causal):
    from tests.kernels.attn_oracle import lowp_attention, reference_attention
    q, k, v, dout = _inputs(lens_q, lens_k, hq, hkv, d, dtype, seed=7)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    scale = d ** -0.5
    _, _, g64 = reference_attention(q, k, v, dout, cu_q, cu_k, scale, causal)
    _, _, glp = lowp_attention(q, k, v, dout, cu_q, cu_k, scale, causal)
    return (q, k, v, dout, cu_q, cu_k), g64, glp


@pytest.mark.parametrize("causal", [True, False])
def test_atomic_dq_backward_against_reference(triton_path, monkeypatch, causal):
    from tests.kernels.attn_oracle import check_close
    _interpret_blocks(monkeypatch, 16, 32)
    lens_q, lens_k = [5, 40, 33, 0], [9, 70, 20, 3]
    (q, k, v, dout, cu_q, cu_k), g64, glp = _reference_gradients(lens_q, lens_k, 4, 2, 64, torch.float16, causal)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = flash_attn.flash_attn_varlen_func(qg, kg, vg, cu_q, cu_k, 40, 70, causal=causal, deterministic=False)
    out.backward(dout)
    for name, got, a, b in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), g64, glp):
        assert got.dtype == q.dtype
        check_close(name, got, a, b, 3)


def test_atomic_dq_backward_shared_prefix(triton_path, monkeypatch):
    # parent ranges: a prefix key block adds to the dq of every child segment's queries
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=32, BLOCK_N=16))
    backward, calls = flash_attn.varlen_backward, []

    def atomic_backward(*args, **kwargs):
        calls.append(1)
        return backward(*args, **dict(kwargs, deterministic=False))

    monkeypatch.setattr(flash_attn, "varlen_backward", atomic_backward)
    _check_equivalence(GROUPS_SMALL, 4, 2, 64, torch.float16)
    assert calls, "the shared-prefix backward did not go through varlen_backward"


def test_atomic_and_deterministic_backward_agree(triton_path, monkeypatch):
    _interpret_blocks(monkeypatch, 16, 16)
    lens = [20, 33]
    q, k, v, dout = _inputs(lens, lens, 2, 1, 32, torch.float32, seed=9)
    cu = cu_seqlens(lens)
    out, lse = flash_attn.varlen_forward(q, k, v, cu, cu, 33, 33, None, True)
    det = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 33, 33, None, True)
    fast = flash_attn.varlen_backward(dout, q, k, v, out, lse, cu, cu, 33, 33, None, True, deterministic=False)
    assert torch.equal(det[1], fast[1]) and torch.equal(det[2], fast[2])  # dk, dv: the same loop either way
    assert (det[0] - fast[0]).abs().max() <= 1e-5 * det[0].abs().max()
