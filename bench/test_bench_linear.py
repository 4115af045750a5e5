"""The few-row CPU linear (spell_core.models.linear) beside F.linear, in the same run: the default
model's decode-step products (MLP 896 x 4864 and back, the 151,936-row LM head) at 4, 8, 32 and
128 rows (live samples), fp32, the threads torch has. Ratios only; timings never fail a test.

    PYTHONPATH=.:kernels python -m pytest -s bench/test_bench_linear.py --benchmark-enable
"""
import pytest
import torch
import torch.nn.functional as F

from spell_core.models.linear import linear

SHAPES = {"mlp_up": (4864, 896), "mlp_down": (896, 4864), "lm_head": (151936, 896)}


@pytest.mark.parametrize("rows", [4, 8, 32, 128])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["f_linear", "spell_linear"])
def test_decode_linear(benchmark, variant, shape, rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*SHAPES[shape], generator=g)
    x = torch.randn(rows, SHAPES[shape][1], generator=g)
    fn = F.linear if variant == "f_linear" else linear
    benchmark.group = f"{shape} rows={rows}"
    with torch.no_grad():
        out = benchmark(fn, x, w)
        reference = x.double() @ w.double().t()
    assert ((out.double() - reference).abs().max() / reference.abs().max()).item() < 1e-5
