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
