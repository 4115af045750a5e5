"""decode_attn_shared_prefix against each sample's full sequence run through the float64
reference attention (its last, causal row), on the Triton path (interpreter) and the
PyTorch path."""
import math

import pytest
import torch
import torch.nn.functional as F

from spell_kernels import decode_attn_shared_prefix, reference

# (prefix length, own lengths of the group's samples) per group; a plain sequence is a group of one
LAYOUTS = {
    "groups": [(150, [1, 4, 9]), (1, [3]), (0, [2, 5]), (67, [1])],
    "edge": [(0, [1]), (1, [1, 1]), (130, [0, 2])],  # own_len 0: the query sees the prefix only
}


def _make_cache(layout, hq, hkv, d, dtype, seed=0):
    """A scattered KV pool holding every sample's sequence [prefix + own], with gaps and the
    groups in reverse slot order, plus per-sample float64 full sequences for the oracle."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(p + sum(own) for p, own in layout) + 3 * len(layout) + 5
    k_cache = torch.randn(total, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(total, hkv, d, generator=gen).to(dtype)
    q = torch.randn(sum(len(own) for _, own in layout), hq, d, generator=gen).to(dtype)
    prefix_start, prefix_len, cu, own_start, own_len, sequences = [], [], [0], [], [], []
    slot = 5
    for plen, owns in reversed(layout):  # reversed: slot order need not follow query order
        prefix_start.insert(0, slot)
        prefix_len.insert(0, plen)
        slot += plen + 3
        starts = []
        for olen in owns:
            starts.append(slot)
            slot += olen
        own_start[:0] = starts
    for plen, owns in layout:
        cu.append(cu[-1] + len(owns))
        own_len += owns
    for g, (plen, owns) in enumerate(layout):
        for i in range(len(owns)):
            b = cu[g] + i
            slots = list(range(prefix_start[g], prefix_start[g] + plen)) + \
                list(range(own_start[b], own_start[b] + own_len[b]))
            sequences.append(slots)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    tables = (as_t(prefix_start), as_t(prefix_len), as_t(cu), as_t(own_start), as_t(own_len))
    return q, k_cache, v_cache, tables, sequences


def _full_sequence_last_rows(q, k_cache, v_cache, sequences, hq, dtype=torch.float64):
    """Oracle: each sample's whole sequence with causal attention (float64 reference); the
    decode query is the sequence's last position, whose row is returned."""
    rows = []
    for b, slots in enumerate(sequences):
        n = len(slots)
        if n == 0:
            rows.append(torch.zeros(1, hq, q.shape[-1], dtype=dtype))
            continue
        gen = torch.Generator().manual_seed(1000 + b)
        # earlier positions' queries are arbitrary: causality must keep them out of the last row
        q_seq = torch.cat([torch.randn(n - 1, hq, q.shape[-1], generator=gen, dtype=dtype), q[b:b + 1].to(dtype)])
        k_seq, v_seq = k_cache[slots].to(dtype), v_cache[slots].to(dtype)
        cu = torch.tensor([0, n], dtype=torch.int32)
        out, _ = reference.attention_varlen_forward(q_seq, k_seq, v_seq, cu, cu, causal=True)
        rows.append(out[-1:])
    return torch.cat(rows)


def _low_precision_attention(q, k_cache, v_cache, sequences):
    """PyTorch's own error in the low dtype: the same attention with every op in that dtype."""
    rows = []
    for b, slots in enumerate(sequences):
        rep = q.shape[1] // k_cache.shape[1]
        k = k_cache[slots].transpose(0, 1).repeat_interleave(rep, 0)  # (Hq, L, D)
        v = v_cache[slots].transpose(0, 1).repeat_interleave(rep, 0)
        s = (q[b][:, None, :] @ k.transpose(1, 2)) * (1.0 / math.sqrt(q.shape[-1]))
        rows.append((torch.softmax(s, -1) @ v)[:, 0][None])
    return torch.cat(rows)


def _check(out, q, k_cache, v_cache, sequences, dtype):
    hq = q.shape[1]
    expected = _full_sequence_last_rows(q, k_cache, v_cache, sequences, hq)
    assert out.shape == q.shape and out.dtype == dtype
    err = (out.double() - expected).abs().max().item()
    if dtype in (torch.float32, torch.float64):
        assert err < (1e-5 if dtype == torch.float32 else 1e-12), err
    else:
        baseline = (_low_precision_attention(q, k_cache, v_cache, sequences).double() - expected).abs().max().item()
        assert err <= 2 * baseline + 1e-5, (err, baseline)


HEADS = [(9, 3, 64), (8, 1, 128)]


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["groups", "edge"])
def test_triton_matches_full_sequences(triton_path, hq, hkv, d, dtype, layout):
    q, k_cache, v_cache, tables, sequences = _make_cache(LAYOUTS[layout], hq, hkv, d, dtype)
    out = decode_attn_shared_prefix(q, k_cache, v_cache, *tables)
    _check(out, q, k_cache, v_cache, sequences, dtype)


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["groups", "edge"])
@pytest.mark.parametrize("impl", ["cpu_flash_op", "matmul_fallback"])
def test_torch_path_matches_full_sequences(torch_path, monkeypatch, hq, hkv, d, dtype, layout, impl):
    import spell_kernels.decode_attn as decode_mod
    if impl == "matmul_fallback":  # what the PyTorch path runs off CPU
        monkeypatch.setattr(decode_mod, "_attend", decode_mod._attend_matmul)
    q, k_cache, v_cache, tables, sequences = _make_cache(LAYOUTS[layout], hq, hkv, d, dtype, seed=1)
    out = decode_attn_shared_prefix(q, k_cache, v_cache, *tables)
    _check(out, q, k_cache, v_cache, sequences, dtype)


@pytest.mark.parametrize("path", ["triton_path", "torch_path", "matmul_fallback"])
def test_long_prefix_many_splits_lse_and_hints(request, path, monkeypatch):
    """A prefix long enough for several splits (Triton) or several chunks (the PyTorch path's
    matmul fallback, used off CPU); lse against the reference's; max_* hints give the same
    result as the synced call."""
    import spell_kernels.decode_attn as decode_mod
    request.getfixturevalue("triton_path" if path == "triton_path" else "torch_path")
    if path == "matmul_fallback":
        monkeypatch.setattr(decode_mod, "PREFIX_CHUNK", 128)
        monkeypatch.setattr(decode_mod, "_attend", decode_mod._attend_matmul)
    layout = [(700, [2, 3]), (300, [1])]
    q, k_cache, v_cache, tables, sequences = _make_cache(layout, 4, 2, 64, torch.float32, seed=2)
    out, lse = decode_attn_shared_prefix(q, k_cache, v_cache, *tables, softmax_scale=0.3, return_lse=True)
    hinted = decode_attn_shared_prefix(q, k_cache, v_cache, *tables, softmax_scale=0.3,
                                       max_group_queries=2, max_prefix_len=700, max_own_len=3)
    for b, slots in enumerate(sequences):
        cu = torch.tensor([0, len(slots)], dtype=torch.int32)
        ref_out, ref_lse = reference.attention_varlen_forward(
            q[b:b + 1].double(), k_cache[slots].double(), v_cache[slots].double(), torch.tensor([0, 1]), cu,
            softmax_scale=0.3)
        torch.testing.assert_close(out[b:b + 1].double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, b:b + 1].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(hinted, out, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["triton_path", "torch_path"])
def test_query_without_keys_gets_zero(request, path):
    request.getfixturevalue(path)
    layout = [(0, [0]), (5, [1])]
    q, k_cache, v_cache, tables, _ = _make_cache(layout, 2, 1, 64, torch.float32)
    out, lse = decode_attn_shared_prefix(q, k_cache, v_cache, *tables, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[:, 0]).all()
    assert torch.isfinite(lse[:, 1]).all()


def test_matches_sdpa_on_sample_copies(torch_path):
    """The naive sampler path: every sample holds its own copy of prefix + own KV (SDPA, GQA)."""
    layout = [(40, [3, 1, 2])]
    q, k_cache, v_cache, tables, sequences = _make_cache(layout, 9, 3, 64, torch.float32, seed=3)
    out = decode_attn_shared_prefix(q, k_cache, v_cache, *tables)
    for b, slots in enumerate(sequences):
        k = k_cache[slots].transpose(0, 1)[None]
        v = v_cache[slots].transpose(0, 1)[None]
        expected = F.scaled_dot_product_attention(q[b][None, :, None], k, v, enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(cu_group_queries=torch.tensor([0, 2], dtype=torch.int32)), "cu_group_queries must be a 1-D"),
    (dict(cu_group_queries=torch.tensor([0, 2, 3], dtype=torch.int32)), "rise from 0 to the number of queries"),
    (dict(prefix_len=torch.tensor([500, 1], dtype=torch.int32)), "end within the cache"),
    (dict(own_len=torch.tensor([1.0, 1.0, 1.0, 1.0])), "own_len must be a 1-D integer"),
    (dict(k_cache=torch.randn(60, 2, 64)), "query heads"),
])
def test_bad_input_errors(torch_path, bad, match):
    layout = [(10, [1, 2]), (5, [1, 1])]
    q, k_cache, v_cache, tables, _ = _make_cache(layout, 3, 3, 64, torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, **dict(zip(
        ["prefix_start", "prefix_len", "cu_group_queries", "own_start", "own_len"], tables)))
    if "k_cache" in bad:
        args["v_cache"] = bad["k_cache"]
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        decode_attn_shared_prefix(**args)
