"""merge_attn_states (Triton on the interpreter, and PyTorch) against attention over the union
of two key sets (float64 reference) and against the hand formula in float64."""
import math

import pytest
import torch

from spell_kernels import merge_attn_states, reference

PATHS = ["triton_path", "torch_path"]
INF = math.inf


def _hand_merge(out, lse, out_b, lse_b):
    """float64, relative to the larger lse m: e_x = exp(lse_x - m), lse = m + log(e + e_b),
    out = (e * out + e_b * out_b) / (e + e_b)."""
    out, lse, out_b, lse_b = (t.double() for t in (out, lse, out_b, lse_b))
    m = torch.maximum(lse, lse_b)
    m = torch.where(torch.isneginf(m), 0.0, m)
    e, e_b = torch.exp(lse - m), torch.exp(lse_b - m)
    total = e + e_b
    merged_lse = torch.where(total == 0, -INF, m + torch.log(total))
    total = torch.where(total == 0, 1.0, total)
    return (e.T[..., None] * out + e_b.T[..., None] * out_b) / total.T[..., None], merged_lse


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (3, 3, 80)])
def test_merge_of_two_key_sets_equals_attention_over_both(request, path, dtype, hq, hkv, d):
    request.getfixturevalue(path)
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_a, lens_b = [3, 1, 7], [5, 0, 9], [2, 4, 0]  # empty key sets on either side
    q = torch.randn(sum(lens_q), hq, d, generator=gen, dtype=torch.float64)
    k_a, v_a = (torch.randn(sum(lens_a), hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k_b, v_b = (torch.randn(sum(lens_b), hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    out_a, lse_a = reference.attention_varlen_forward(q, k_a, v_a, cu(lens_q), cu(lens_a))
    out_b, lse_b = reference.attention_varlen_forward(q, k_b, v_b, cu(lens_q), cu(lens_b))
    # the union, sequence by sequence
    k_u, v_u, lens_u, a0, b0 = [], [], [], 0, 0
    for la, lb in zip(lens_a, lens_b):
        k_u += [k_a[a0:a0 + la], k_b[b0:b0 + lb]]
        v_u += [v_a[a0:a0 + la], v_b[b0:b0 + lb]]
        lens_u.append(la + lb)
        a0, b0 = a0 + la, b0 + lb
    out_u, lse_u = reference.attention_varlen_forward(q, torch.cat(k_u), torch.cat(v_u), cu(lens_q), cu(lens_u))

    merged, merged_lse = merge_attn_states(out_a.to(dtype), lse_a.float(), out_b.to(dtype), lse_b.float())
    assert merged.dtype == torch.float32 and merged_lse.dtype == torch.float32
    assert merged.shape == out_u.shape and merged_lse.shape == lse_u.shape
    atol = 1e-6 if dtype == torch.float32 else 2 * 2.0 ** -11 * out_u.abs().max().item()  # fp16 input rounding
    torch.testing.assert_close(merged.double(), out_u, atol=atol, rtol=0)
    torch.testing.assert_close(merged_lse.double(), lse_u, atol=1e-5, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 3e38 - (-3e38) overflows to inf, on purpose
@pytest.mark.parametrize("path", PATHS)
def test_infinite_and_huge_lse(request, path):
    request.getfixturevalue(path)
    gen = torch.Generator().manual_seed(1)
    t, h, d = 8, 2, 64
    out, out_b = torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
    lse = torch.tensor([[-INF, 2.0, -INF, 1e30, 1e30, 3e38, -3e38, 1e4],
                        [0.5, -INF, -INF, 1e30, -1e30, -3e38, 3e38, -1e4]])
    lse_b = torch.tensor([[1.0, -INF, -INF, 1e30, -1e30, -3e38, 3e38, 1e4 - 3],
                          [-INF, 4.0, -INF, 1e30, 1e30, 3e38, -3e38, -1e4 + 2]])
    out[:, 0][torch.isneginf(lse[0])] = 0.0  # an empty side carries out = 0, as the kernels write it
    out_b[:, 0][torch.isneginf(lse_b[0])] = 0.0
    out[:, 1][torch.isneginf(lse[1])] = 0.0
    out_b[:, 1][torch.isneginf(lse_b[1])] = 0.0
    merged, merged_lse = merge_attn_states(out, lse, out_b, lse_b)
    expected, expected_lse = _hand_merge(out, lse, out_b, lse_b)
    assert not merged.isnan().any() and not merged_lse.isnan().any()
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged_lse.double(), expected_lse.float().double(), atol=1e-6, rtol=1e-6)
    # exact cases: one side empty, both empty (-inf and zero output)
    assert torch.equal(merged[0, 0], out_b[0, 0]) and merged_lse[0, 0] == 1.0
    assert merged_lse[0, 2] == -INF and torch.equal(merged[2], torch.zeros_like(merged[2]))
    assert merged_lse[0, 5] == 3e38 and torch.equal(merged[5, 0], out[5, 0])


@pytest.mark.parametrize("path", PATHS)
def test_gradients_match_float64_autograd(request, path):
    request.getfixturevalue(path)
    gen = torch.Generator().manual_seed(2)
    t, h, d = 6, 3, 64
    tensors = [torch.randn(t, h, d, generator=gen), torch.randn(h, t, generator=gen) * 3,
               torch.randn(t, h, d, generator=gen), torch.randn(h, t, generator=gen) * 3]
    tensors[1][0, 0] = -INF  # one empty side: its gradients are 0
    tensors[3][1, 2] = -INF
    d_out, d_lse = torch.randn(t, h, d, generator=gen), torch.randn(h, t, generator=gen)

    leaves = [x.clone().requires_grad_(True) for x in tensors]
    merged, merged_lse = merge_attn_states(*leaves)
    grads = torch.autograd.grad((merged * d_out).sum() + (merged_lse * d_lse).sum(), leaves)

    leaves64 = [x.double().requires_grad_(True) for x in tensors]
    m64, l64 = _hand_merge(*leaves64)
    expected = torch.autograd.grad((m64 * d_out.double()).sum() + (l64 * d_lse.double()).sum(), leaves64)
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), torch.nan_to_num(want), atol=1e-5, rtol=1e-5)


def test_shape_errors():
    out = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match=r"lse and lse_b must be \(H, T\)"):
        merge_attn_states(out, torch.zeros(4, 2), out, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="out and out_b must both be"):
        merge_attn_states(out, torch.zeros(2, 4), out[:3], torch.zeros(2, 4))


def _sides_with_garbage(seed):
    """Rows (t, h) covering: both sides with keys, only a, only b, neither; the buffer of every
    empty side holds garbage (nan, +inf, -inf, huge) that must not reach the result."""
    gen = torch.Generator().manual_seed(seed)
    t, h, d = 8, 2, 64
    out, out_b = torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
    lse, lse_b = torch.randn(h, t, generator=gen) * 4, torch.randn(h, t, generator=gen) * 4
    lse[:, 2:4] = -INF  # a empty
    lse_b[:, 4:6] = -INF  # b empty
    lse[:, 6:8] = lse_b[:, 6:8] = -INF  # both empty
    garbage = torch.tensor([math.nan, INF, -INF, 3e38]).repeat(d // 4)
    for buf, side_lse in ((out, lse), (out_b, lse_b)):
        buf[torch.isneginf(side_lse).T] = garbage
    return out, lse, out_b, lse_b


@pytest.mark.parametrize("path", PATHS)
def test_empty_side_contributes_nothing_whatever_its_buffer_holds(request, path):
    request.getfixturevalue(path)
    out, lse, out_b, lse_b = _sides_with_garbage(3)
    merged, merged_lse = merge_attn_states(out, lse, out_b, lse_b)
    # by hand: an empty side drops out of e * out + e_b * out_b; both empty is flash-attn's (0, -inf)
    assert torch.equal(merged[2:4], out_b[2:4]) and torch.equal(merged_lse[:, 2:4], lse_b[:, 2:4])
    assert torch.equal(merged[4:6], out[4:6]) and torch.equal(merged_lse[:, 4:6], lse[:, 4:6])
    assert torch.equal(merged[6:8], torch.zeros_like(merged[6:8]))
    assert torch.isneginf(merged_lse[:, 6:8]).all()
    expected, expected_lse = _hand_merge(out[:2], lse[:, :2], out_b[:2], lse_b[:, :2])
    torch.testing.assert_close(merged[:2].double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged_lse[:, :2].double(), expected_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_empty_side_gets_zero_gradients_and_spoils_none(request, path):
    request.getfixturevalue(path)
    tensors = _sides_with_garbage(4)
    gen = torch.Generator().manual_seed(5)
    d_out, d_lse = torch.randn(tensors[0].shape, generator=gen), torch.randn(tensors[1].shape, generator=gen)
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    merged, merged_lse = merge_attn_states(*leaves)
    grads = torch.autograd.grad((merged * d_out).sum() + (merged_lse[:, :6] * d_lse[:, :6]).sum(), leaves)
    g_out, g_lse, g_out_b, g_lse_b = grads
    assert all(torch.isfinite(g).all() for g in grads)
    # the side with keys alone takes the whole gradient: d out_x = d merged, d lse_x = d merged_lse
    assert torch.equal(g_out[4:6], d_out[4:6]) and torch.equal(g_out_b[2:4], d_out[2:4])
    torch.testing.assert_close(g_lse[:, 4:6], d_lse[:, 4:6], atol=1e-6, rtol=0)
    torch.testing.assert_close(g_lse_b[:, 2:4], d_lse[:, 2:4], atol=1e-6, rtol=0)
    for g, rows in ((g_out, slice(2, 4)), (g_out_b, slice(4, 6))):
        assert torch.equal(g[rows], torch.zeros_like(g[rows]))
    for g, rows in ((g_lse, slice(2, 4)), (g_lse_b, slice(4, 6))):
        assert torch.equal(g[:, rows], torch.zeros_like(g[:, rows]))
    for g in grads:  # both sides empty: nothing to differentiate
        rows = g[6:8] if g.dim() == 3 else g[:, 6:8]
        assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # exp(2e30) = inf in the interpreter, on purpose
def test_triton_and_torch_merges_agree(monkeypatch):
    out, lse, out_b, lse_b = _sides_with_garbage(6)
    lse[0, 0], lse_b[0, 0] = 1e30, -1e30  # one side's weight underflows: exactly the other side
    lse[1, 1], lse_b[1, 1] = 50.0, 50.0 + 1e-5
    results = {}
    for path in ("triton", "torch"):
        monkeypatch.setenv("SPELL_KERNELS", path)
        results[path] = merge_attn_states(out.to(torch.bfloat16), lse, out_b.to(torch.bfloat16), lse_b)
    (m_tr, l_tr), (m_pt, l_pt) = results["triton"], results["torch"]
    assert m_tr.dtype == m_pt.dtype == torch.float32 and l_tr.dtype == l_pt.dtype == torch.float32
    torch.testing.assert_close(m_tr, m_pt, atol=2e-7, rtol=2e-7)
    torch.testing.assert_close(l_tr, l_pt, atol=0, rtol=2e-7)
    assert torch.equal(m_tr[2:], m_pt[2:]) and torch.equal(l_tr[:, 2:], l_pt[:, 2:])  # empty sides: exact
    assert torch.equal(m_tr[0, 0], out[0, 0].to(torch.bfloat16).float())


def test_triton_merge_refuses_more_rows_than_its_int32_row_index(triton_path):
    # expanded views: the shapes of 2^31 (token, head) rows without their memory
    from spell_kernels.lse_merge import MAX_TRITON_ROWS

    t, h = MAX_TRITON_ROWS // 2 + 1, 2
    out, lse = torch.zeros(1, 1, 16).expand(t, h, 16), torch.zeros(1, 1).expand(h, t)
    with pytest.raises(ValueError, match=r"at most \d+ \(token, head\) rows.*merge the tokens in slices"):
        merge_attn_states(out, lse, out, lse)


@pytest.mark.parametrize("path", PATHS)
def test_gradients_come_back_in_the_inputs_dtypes(request, path):
    request.getfixturevalue(path)
    out, lse, out_b, lse_b = _sides_with_garbage(7)
    leaves = [out.to(torch.bfloat16).requires_grad_(True), lse.requires_grad_(True),
              out_b.to(torch.float16).requires_grad_(True), lse_b.requires_grad_(True)]
    merged, merged_lse = merge_attn_states(*leaves)
    (merged.sum() + merged_lse[:, :6].sum()).backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    assert all(torch.isfinite(x.grad).all() for x in leaves)
