"""The CPU attention path in fp16/bf16 accumulates in fp32 (flash-attn's rule): gradients summed
over many queries are rounded once, not at every step."""
import pytest
import torch

from spell_kernels import flash_attn_varlen_func
from tests.kernels.attn_oracle import cu_seqlens, lowp_attention, max_err, reference_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dv_of_one_key_is_the_exact_sum_of_dout_rounded_once(torch_path, dtype):
    # 511 queries, one key: softmax is exactly 1, so dV = sum_i dO_i (and dK = 0 up to rounding)
    g = torch.Generator().manual_seed(0)
    hq, d, n = 2, 64, 511
    q = torch.randn(n, hq, d, generator=g).to(dtype).requires_grad_(True)
    k, v = (torch.randn(1, hq, d, generator=g).to(dtype).requires_grad_(True) for _ in range(2))
    dout = torch.randn(n, hq, d, generator=g).to(dtype)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens([n]), cu_seqlens([1]), n, 1)
    out.backward(dout)
    assert torch.equal(out, v.detach().expand(n, hq, d))
    exact = dout.double().sum(0, keepdim=True)  # float64 sums 511 half-precision values exactly
    assert torch.equal(v.grad, exact.to(dtype)), f"{max_err(v.grad, exact):.3e} from the exact sum"
    assert k.grad.abs().max() < 1e-4


@pytest.mark.slow  # ~5 s of CPU: the float64 and bf16 references form (L, L) scores
def test_causal_2048_gradients_within_twice_pytorch_low_precision_error(torch_path):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    n, hq, d = 2048, 1, 64
    q, k, v, dout = (torch.randn(n, hq, d, generator=g).to(dtype) for _ in range(4))
    cu = cu_seqlens([n])
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    flash_attn_varlen_func(*leaves, cu, cu, n, n, causal=True).backward(dout)
    scale = d ** -0.5
    grads64 = reference_attention(q, k, v, dout, cu, cu, scale, True)[2]
    grads_lp = lowp_attention(q, k, v, dout, cu, cu, scale, True)[2]
    for name, leaf, g64, g_lp in zip(("dq", "dk", "dv"), leaves, grads64, grads_lp):
        err, base = max_err(leaf.grad, g64), max_err(g_lp, g64)
        assert err <= 2 * base, f"{name}: error {err:.3e} > 2 x PyTorch's {dtype} error {base:.3e}"
