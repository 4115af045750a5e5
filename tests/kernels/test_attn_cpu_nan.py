"""A NaN in a query surfaces on the CPU attention path as it does in SDPA (a NaN output row),
instead of the zero row PyTorch's blocked CPU flash op returns."""
import math

import torch
import torch.nn.functional as F

from spell_kernels import attn_cpu


def _sdpa(q, k, v, scale):
    """SDPA (math path, float64) of one causal segment, (L, H, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=scale)
    return out.transpose(0, 1)


def test_a_nan_query_gives_a_nan_row_as_in_sdpa():
    g = torch.Generator().manual_seed(0)
    lengths, heads, dim = (5, 7), 2, 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=g) for _ in range(3))
    q[6, 1, 3] = math.nan  # segment 2, row 1, head 1
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out, lse = attn_cpu.varlen_forward(q, k, v, cu, cu, 0.3, True)
    expected = torch.cat([_sdpa(q[a:b].double(), k[a:b].double(), v[a:b].double(), 0.3)
                          for a, b in ((0, 5), (5, 12))])
    assert torch.equal(out.isnan().any(-1), expected.isnan().any(-1))  # exactly row 6 of head 1
    assert out.isnan().any(-1).sum() == 1 and bool(out[6, 1].isnan().all())
    assert bool(lse[1, 6].isnan()) and int(lse.isnan().sum()) == 1
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite].double(), expected[finite], atol=1e-5, rtol=1e-5)
