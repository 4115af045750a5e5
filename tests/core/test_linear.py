"""spell_core.models.linear: the few-row CPU product against a float64 reference, and where it
applies (inference, fp32, 2-32 rows, a large weight) and where it leaves F.linear alone."""
import pytest
import torch
import torch.nn.functional as F

from spell_core.models import linear as lin


@pytest.mark.parametrize("rows", [2, 7, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_match_a_float64_reference(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4864, 896, generator=g)
    x = torch.randn(rows, 896, generator=g)
    b = torch.randn(4864, generator=g) if bias else None
    want = x.double() @ w.double().t() + (b.double() if bias else 0)
    with torch.no_grad():
        got = lin.linear(x, w, b)
    assert got.shape == (rows, 4864) and got.dtype == torch.float32
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_the_transposed_product_is_used_only_where_it_was_measured_to_win(monkeypatch):
    calls = []
    real = torch.Tensor.t
    monkeypatch.setattr(torch.Tensor, "t", lambda self: calls.append(tuple(self.shape)) or real(self))
    big, small = torch.randn(4864, 896), torch.randn(896, 896)
    with torch.no_grad():
        lin.linear(torch.randn(8, 896), big)          # used
        lin.linear(torch.randn(1, 896), big)          # one row: F.linear
        lin.linear(torch.randn(129, 896), big)        # many rows: F.linear
        lin.linear(torch.randn(8, 896), small)        # small weight: F.linear
        lin.linear(torch.randn(8, 896).double(), big.double())  # not fp32: F.linear
    lin.linear(torch.randn(8, 896), big)              # gradient mode (training): F.linear
    assert calls == [(8, 896), (4864, 8)]  # x^T, then the product back


def test_gradient_mode_is_exactly_f_linear_and_the_module_keeps_nn_linear_keys():
    layer = lin.Linear(896, 4864, bias=True)
    x = torch.randn(8, 896, requires_grad=True)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias"} and isinstance(layer, torch.nn.Linear)
