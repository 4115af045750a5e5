"""Shared-prefix groups equal the G sequences [prefix + resp_i] run separately: response outputs
equal, prefix gradients = the sum over the copies. Several groups and plain sequences packed in
one call; Triton kernels interpreted on small shapes, the CPU path on larger ones and in bf16."""
import math

import pytest
import torch

from spell_kernels import flash_attn, reference, shared_prefix_attn_func
from spell_kernels.shared_prefix import SharedPrefixAttention, SharedPrefixLayout
from tests.kernels.attn_oracle import attention_in_dtype, check_close, cu_seqlens


def _separate_sequences(layout):
    """Index lists of the sequences the packed batch stands for: [prefix rows + response rows]
    per response, and every segment without a parent that no response uses, alone."""
    cu, parent = layout.cu_seqlens.tolist(), layout.parent.tolist()
    rows = [list(range(cu[s], cu[s + 1])) for s in range(len(parent))]
    used_as_prefix = {p for p in parent if p >= 0}
    sequences = []
    for s, p in enumerate(parent):
        if p >= 0:
            sequences.append((rows[p], rows[s]))
        elif s not in used_as_prefix:
            sequences.append(([], rows[s]))
    return sequences


def _expected(layout, q, k, v, dout, prefix_douts, compute):
    """Run the separate sequences with `compute` (the float64 reference or PyTorch in the input
    dtype), each prefix copy with its own output gradient, and fold the results back onto the
    packed rows: outputs taken from the copies, gradients summed over them (in float64)."""
    sequences = _separate_sequences(layout)
    index = torch.tensor([i for pre, own in sequences for i in pre + own], dtype=torch.long)
    lens = [len(pre) + len(own) for pre, own in sequences]
    dout_sep = torch.cat([torch.cat([prefix_douts[j], dout[own]]) if pre else dout[own]
                          for j, (pre, own) in enumerate(sequences)])
    cu = cu_seqlens(lens)
    out_sep, grads_sep = compute(q[index], k[index], v[index], dout_sep.to(q.dtype), cu)
    out = torch.zeros(q.shape, dtype=torch.float64)
    out[index] = out_sep.double()
    grads = [torch.zeros(t.shape, dtype=torch.float64).index_add_(0, index, g.double())
             for t, g in zip((q, k, v), grads_sep)]
    return out, grads


def _reference64(q, k, v, dout, cu):
    q, k, v = (t.double() for t in (q, k, v))
    out, _ = reference.attention_varlen_forward(q, k, v, cu, cu, None, True)
    return out, reference.attention_varlen_backward(dout.double(), q, k, v, cu, cu, None, True)


def _in_dtype(q, k, v, dout, cu):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, _ = attention_in_dtype(q, k, v, cu, cu, 1 / math.sqrt(q.shape[2]), True)
    return out.detach(), torch.autograd.grad(out, (q, k, v), dout)


def _check_equivalence(groups, hq, hkv, d, dtype, seed=0):
    layout = SharedPrefixLayout.from_groups(groups)
    g = torch.Generator().manual_seed(seed)
    t = layout.num_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g).to(dtype)
    # In the separate runs each copy of a prefix has its own output gradient; their sum is the packed
    # prefix's. The prefix rows' attention is the same in every copy, so the gradient is linear in
    # that sum: the first copy gets all of it (exact in any dtype), the others zero.
    prefix_douts, seen = [], set()
    for pre, _ in _separate_sequences(layout):
        first = bool(pre) and pre[0] not in seen
        seen.update(pre[:1])
        prefix_douts.append(dout[pre] if first else torch.zeros(len(pre), hq, d, dtype=dtype))

    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = shared_prefix_attn_func(qg, kg, vg, layout.cu_seqlens, layout.max_seqlen, layout.parent)
    out.backward(dout)

    out64, grads64 = _expected(layout, q, k, v, dout, prefix_douts, _reference64)
    out_lp, grads_lp = _expected(layout, q, k, v, dout, prefix_douts, _in_dtype)
    check_close("out", out, out64, out_lp, 2)
    for name, got, g64, g_lp in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), grads64, grads_lp):
        check_close(name, got, g64, g_lp, 3)


GROUPS_SMALL = [(40, [7, 20, 1, 0]), 30, (3, [25]), 1]
GROUPS_LARGE = [(300, [40, 113, 1]), 200, (17, [60, 0, 60]), (500, [203, 17])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_equals_separate_sequences(triton_path, monkeypatch, dtype):
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=32, BLOCK_N=16))
    _check_equivalence(GROUPS_SMALL, 4, 2, 64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_equals_separate_sequences(torch_path, dtype):
    _check_equivalence(GROUPS_LARGE, 4, 2, 64, dtype)


def test_cpu_equals_separate_sequences_head_dim_128(torch_path):
    _check_equivalence([(100, [30, 31]), 50], 8, 2, 128, torch.float32)


def test_layout_from_groups():
    layout = SharedPrefixLayout.from_groups([(4, [2, 3]), 3, (2, [1])])
    assert layout.cu_seqlens.tolist() == [0, 4, 6, 9, 12, 14, 15]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.parent.dtype == torch.int32
    assert layout.parent.tolist() == [-1, 0, 0, -1, -1, 4]
    # responses continue the prefix's positions, as in the sequence [prefix + response]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 0, 1, 2, 0, 1, 2]
    assert layout.max_seqlen == 4 and layout.num_tokens == 15


def test_layout_rejects_bad_parents():
    with pytest.raises(ValueError, match="without a parent"):
        SharedPrefixLayout.from_segments([3, 2, 2], [-1, 0, 1])  # a chain
    with pytest.raises(ValueError, match="not -1 or a segment index"):
        SharedPrefixLayout.from_segments([3, 2], [-1, 5])
    with pytest.raises(ValueError, match="another segment"):
        SharedPrefixLayout.from_segments([3], [0])


def test_backend_is_the_function(torch_path):
    layout = SharedPrefixLayout.from_groups([(20, [5, 6]), 7])
    q, k, v = (torch.randn(layout.num_tokens, h, 64) for h in (4, 2, 2))
    attn = SharedPrefixAttention(layout)
    expected = shared_prefix_attn_func(q, k, v, layout.cu_seqlens, layout.max_seqlen, layout.parent)
    assert torch.equal(attn(3, q, k, v), expected)
    # and a response row differs from attending to the response alone (the prefix is seen)
    alone = flash_attn.flash_attn_varlen_func(q[20:25], k[20:25], v[20:25], cu_seqlens([5]), cu_seqlens([5]),
                                              5, 5, causal=True)
    assert not torch.allclose(expected[20:25], alone)
