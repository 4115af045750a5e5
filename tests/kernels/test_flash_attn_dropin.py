"""flash_attn_varlen_func / flash_attn_func as drop-ins for flash-attn 2: the positional call
flash-attn's users write means the same here. The oracle is flash-attn's documented semantics
(flash_attn_interface.py docstrings), worked in float64 in this file: GQA head h reads KV head
h // (Hq // Hkv); the causal mask is aligned to the bottom-right corner (query i of Lq sees key
j <= i + Lk - Lq); a row that sees no key outputs 0; softmax_lse (Hq, total_q) is the
natural-log logsumexp of the scaled scores."""
import math

import pytest
import torch

from spell_kernels import flash_attn_func, flash_attn_varlen_func


def _flash_attn_semantics(q, k, v, lens_q, lens_k, scale, causal):
    """float64 (out, lse) per flash-attn's docstrings, segment by segment, head by head."""
    q, k, v = (t.double() for t in (q, k, v))
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float64)
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k):
        for h in range(hq):
            kh = h // (hq // hkv)
            s = q[sq:sq + lq, h] @ k[sk:sk + lk, kh].T * scale
            if causal:
                i = torch.arange(lq)[:, None]
                j = torch.arange(lk)[None, :]
                s = s.masked_fill(j > i + lk - lq, -math.inf)
            row_lse = torch.logsumexp(s, dim=1)
            seen = torch.isfinite(row_lse)
            p = torch.where(seen[:, None], torch.exp(s - row_lse[:, None]), 0.0)
            out[sq:sq + lq, h] = p @ v[sk:sk + lk, kh]
            lse[h, sq:sq + lq] = row_lse
        sq, sk = sq + lq, sk + lk
    return out, lse


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_positional_call_as_flash_attn(causal):
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k = [3, 1, 6], [5, 4, 6]  # Lq < Lk in two segments: bottom-right alignment matters
    q = torch.randn(sum(lens_q), 4, 16, generator=g)
    k = torch.randn(sum(lens_k), 2, 16, generator=g)
    v = torch.randn(sum(lens_k), 2, 16, generator=g)
    scale = 0.3
    # every argument of flash_attn.flash_attn_varlen_func, positionally, in flash-attn's order:
    # q k v cu_q cu_k max_q max_k dropout_p softmax_scale causal window_size softcap alibi_slopes
    # deterministic return_attn_probs block_table
    out, lse, probs = flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), 6, 6, 0.0, scale, causal,
                                             (-1, -1), 0.0, None, False, True, None)
    ref_out, ref_lse = _flash_attn_semantics(q, k, v, lens_q, lens_k, scale, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert probs is None
    # the short positional form most callers use (dropout_p 8th, softmax_scale 9th, causal 10th)
    short = flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), 6, 6, 0.0, scale, causal)
    torch.testing.assert_close(short.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_positional_call_as_flash_attn(causal):
    g = torch.Generator().manual_seed(1)
    batch, lq, lk = 2, 3, 5
    q = torch.randn(batch, lq, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(batch, lk, 3, 8, generator=g, requires_grad=True)
    v = torch.randn(batch, lk, 3, 8, generator=g, requires_grad=True)
    # flash_attn.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
    #                            alibi_slopes, deterministic, return_attn_probs)
    out, lse, probs = flash_attn_func(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, True)
    flat = [t.detach().reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    ref_out, ref_lse = _flash_attn_semantics(*flat, [lq] * batch, [lk] * batch, 8 ** -0.5, causal)
    assert out.shape == (batch, lq, 6, 8) and lse.shape == (batch, 6, lq) and probs is None
    torch.testing.assert_close(out.detach().double(), ref_out.view(batch, lq, 6, 8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.view(6, batch, lq).transpose(0, 1), atol=1e-5, rtol=1e-5)
    # gradients flow through the batched wrapper like through the reference
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = _flash_attn_semantics(*(t.reshape(-1, *t.shape[2:]) for t in (q64, k64, v64)),
                                [lq] * batch, [lk] * batch, 8 ** -0.5, causal)[0]
    dout = torch.randn(batch, lq, 6, 8, generator=g)
    out.backward(dout)
    ref.backward(dout.double().view(-1, 6, 8))
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


_UNSUPPORTED = [("dropout_p", 0.1), ("window_size", (4, 0)), ("softcap", 30.0), ("alibi_slopes", torch.ones(2))]


@pytest.mark.parametrize("fn, argument, value", [("varlen", a, v) for a, v in _UNSUPPORTED]
                         + [("varlen", "block_table", torch.zeros(1, 1))]  # flash_attn_func has none
                         + [("batched", a, v) for a, v in _UNSUPPORTED])
def test_unsupported_non_defaults_name_the_argument(fn, argument, value):
    q = torch.randn(4, 2, 8)
    if fn == "batched":
        call = lambda **kw: flash_attn_func(q[None], q[None], q[None], **kw)  # noqa: E731
    else:
        cu = _cu([4])
        call = lambda **kw: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, **kw)  # noqa: E731
    with pytest.raises(NotImplementedError, match=argument):
        call(**{argument: value})
    call(**{argument: {"dropout_p": 0.0, "window_size": (-1, -1), "softcap": 0.0}.get(argument)})  # defaults pass
