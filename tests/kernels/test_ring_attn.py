"""Ring attention on 2 and 4 gloo processes against single-process attention.

One spawn per world size runs every case; the oracle is spell_kernels/reference.py in float64 on
the whole (unsharded) batch, and the baseline error is that of the same reference in the
case's dtype. Shards are cut and reassembled with positions built here by hand, so the
comparison does not rely on the sharding helpers under test (tests/kernels/gloo_ranks.py).
"""
import os

import pytest
import torch
import torch.distributed as dist

from spell_kernels import reference, ring_attn
from spell_kernels.ring_attn import (ring_flash_attn_varlen_func, zigzag_cu_seqlens, zigzag_pad, zigzag_shard,
                                     zigzag_unpad, zigzag_unshard)
from tests.kernels.gloo_ranks import padded_lengths, run_on_gloo_ranks, shard_positions

# lengths before padding to a multiple of 2 x world_size; GQA as (query heads, KV heads)
CASES = {
    "causal_one_sequence": dict(lengths=[48], heads=(2, 2), head_dim=16, causal=True, dtype=torch.float32),
    "causal_varlen_gqa_4_2": dict(lengths=[5, 13, 0, 1, 30], heads=(4, 2), head_dim=16, causal=True,
                                  dtype=torch.float32),
    "causal_gqa_9_3_scale": dict(lengths=[17, 40], heads=(9, 3), head_dim=8, causal=True, dtype=torch.float32,
                                 softmax_scale=0.3),
    "full_varlen_gqa_9_3": dict(lengths=[7, 24, 3], heads=(9, 3), head_dim=8, causal=False, dtype=torch.float32),
    "full_one_sequence_gqa_2_1": dict(lengths=[32], heads=(2, 1), head_dim=16, causal=False, dtype=torch.float32),
    "causal_varlen_fp64": dict(lengths=[9, 22], heads=(4, 2), head_dim=8, causal=True, dtype=torch.float64),
    "causal_varlen_bf16": dict(lengths=[11, 21], heads=(4, 2), head_dim=32, causal=True, dtype=torch.bfloat16),
    # the GPU path's kernels (Triton attention and LSE merge), interpreted on CPU: slow, so on 2
    # ranks only (which already meet both off-diagonal cases: src < rank and src > rank)
    "causal_varlen_triton": dict(lengths=[5, 12], heads=(4, 2), head_dim=16, causal=True, dtype=torch.float32,
                                 kernels="triton", world_sizes=(2,)),
}
TOLERANCE_FACTOR = 3  # ring error <= 3 x (error of the reference in the same dtype) + floor


def error_floor(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-7  # float64: the reference itself has no error


def cu_from_lengths(lengths):
    return torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)


def make_inputs(case, world_size, seed):
    lengths = padded_lengths(case["lengths"], world_size)
    total, (hq, hkv), d = sum(lengths), case["heads"], case["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(total, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    return dict(lengths=lengths, q=q, k=k, v=v, dout=dout)


def _ring_rank(rank, world_size, inputs_path):
    """One rank: every case through ring attention; this rank's shards."""
    results = {}
    for name, data in torch.load(inputs_path).items():
        case = CASES[name]
        lengths, dtype = data["lengths"], case["dtype"]
        local = torch.tensor(shard_positions(lengths, rank, world_size), dtype=torch.long)
        cu_local = cu_from_lengths([n // world_size for n in lengths])
        max_local = max(n // world_size for n in lengths)
        q, k, v = (data[x][local].to(dtype).requires_grad_(True) for x in ("q", "k", "v"))
        os.environ["SPELL_KERNELS"] = case.get("kernels", "auto")  # TRITON_INTERPRET=1 comes from conftest
        out = ring_flash_attn_varlen_func(q, k, v, cu_local, max_local, softmax_scale=case.get("softmax_scale"),
                                          causal=case["causal"])
        out.backward(data["dout"][local].to(dtype))
        results[name] = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)

    # helpers: shard, local cu_seqlens, unshard (all_gather) of a packed batch
    data = torch.load(inputs_path)["causal_varlen_gqa_4_2"]
    cu_global = cu_from_lengths(data["lengths"])
    shard = zigzag_shard(data["q"], cu_global, rank, world_size)
    results["helpers"] = dict(shard=shard, cu_local=zigzag_cu_seqlens(cu_global, world_size),
                              unshard=zigzag_unshard(shard, cu_global))

    # bad input is refused on every rank before any communication
    q = torch.zeros(6, 2, 8)
    try:
        ring_flash_attn_varlen_func(q, q, q, torch.tensor([0, 3, 6], dtype=torch.int32), 3)
        results["odd_length_error"] = ""
    except ValueError as err:
        results["odd_length_error"] = str(err)
    return results


def max_error(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def oracle(data, case, dtype):
    """Output and gradients of single-process attention on the whole batch in `dtype`."""
    cu = cu_from_lengths(data["lengths"])
    q, k, v, dout = (data[x].to(dtype) for x in ("q", "k", "v", "dout"))
    scale, causal = case.get("softmax_scale"), case["causal"]
    out, _ = reference.attention_varlen_forward(q, k, v, cu, cu, scale, causal)
    dq, dk, dv = reference.attention_varlen_backward(dout, q, k, v, cu, cu, scale, causal)
    return dict(out=out, dq=dq, dk=dk, dv=dv)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_attention_matches_single_process(world_size, tmp_path):
    cases = {name: case for name, case in CASES.items() if world_size in case.get("world_sizes", (world_size,))}
    inputs = {name: make_inputs(case, world_size, seed=i) for i, (name, case) in enumerate(cases.items())}
    oracles = {name: (oracle(inputs[name], case, torch.float64), oracle(inputs[name], case, case["dtype"]))
               for name, case in cases.items()}
    inputs_path = str(tmp_path / "inputs.pt")
    torch.save(inputs, inputs_path)
    shards = run_on_gloo_ranks(_ring_rank, world_size, tmp_path, inputs_path)

    failures = []
    for name, case in cases.items():
        data = inputs[name]
        exact, baseline = oracles[name]
        for key in ("out", "dq", "dk", "dv"):
            ring = torch.empty_like(exact[key], dtype=case["dtype"])
            for r in range(world_size):
                ring[shard_positions(data["lengths"], r, world_size)] = shards[r][name][key]
            err, base_err = max_error(ring, exact[key]), max_error(baseline[key], exact[key])
            if not err <= TOLERANCE_FACTOR * base_err + error_floor(case["dtype"]):
                failures.append(f"{name} {key}: error {err:.3g} vs reference-in-{case['dtype']} {base_err:.3g}")
    assert not failures, f"ring of {world_size} differs from single-process attention:\n" + "\n".join(failures)

    data = inputs["causal_varlen_gqa_4_2"]
    lengths = data["lengths"]
    for r in range(world_size):
        helpers = shards[r]["helpers"]
        assert torch.equal(helpers["shard"], data["q"][shard_positions(lengths, r, world_size)])
        assert torch.equal(helpers["unshard"], data["q"])
        cu_local, max_local = helpers["cu_local"]
        assert cu_local.tolist() == cu_from_lengths([n // world_size for n in lengths]).tolist()
        assert max_local == max(lengths) // world_size
        assert "multiple of 2 x world_size" in shards[r]["odd_length_error"]


# ---- single process: ring of one, helpers, input checks -------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_ring_of_one_is_plain_attention(causal):
    assert not dist.is_initialized()
    case = dict(lengths=[5, 0, 12], heads=(6, 2), head_dim=8, causal=causal, dtype=torch.float32)
    data = make_inputs(case, world_size=1, seed=7)
    q, k, v = (data[x].float().requires_grad_(True) for x in ("q", "k", "v"))
    cu = cu_from_lengths(data["lengths"])
    out = ring_flash_attn_varlen_func(q, k, v, cu, 12, causal=causal)
    out.backward(data["dout"].float())
    (exact, baseline) = (oracle(data, case, dtype) for dtype in (torch.float64, torch.float32))
    for key, got in dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad).items():
        err, base_err = max_error(got, exact[key]), max_error(baseline[key], exact[key])
        assert err <= TOLERANCE_FACTOR * base_err + 1e-7, f"{key}: error {err:.3g} vs reference {base_err:.3g}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_zigzag_shard_takes_chunks_r_and_2r_minus_1_minus_r(world_size):
    lengths = padded_lengths([3, 0, 9, 16], world_size)
    cu = cu_from_lengths(lengths)
    x = torch.arange(sum(lengths) * 2).reshape(-1, 2)
    for rank in range(world_size):
        assert torch.equal(zigzag_shard(x, cu, rank, world_size), x[shard_positions(lengths, rank, world_size)])
    cu_local, max_local = zigzag_cu_seqlens(cu, world_size)
    assert cu_local.dtype == torch.int32
    assert cu_local.tolist() == cu_from_lengths([n // world_size for n in lengths]).tolist()
    assert max_local == max(lengths) // world_size


def test_zigzag_shard_by_hand():
    # one sequence of 8 tokens on 2 ranks: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    x, cu = torch.arange(8), torch.tensor([0, 8], dtype=torch.int32)
    assert zigzag_shard(x, cu, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_shard(x, cu, 1, 2).tolist() == [2, 3, 4, 5]


def test_zigzag_pad_and_unpad():
    x = torch.arange(1, 20, dtype=torch.float32)[:, None]  # lengths 5, 0, 13, 1
    cu = cu_from_lengths([5, 0, 13, 1])
    padded, cu_padded = zigzag_pad(x, cu, world_size=2, value=-1)
    assert cu_padded.tolist() == [0, 8, 8, 24, 28]
    assert cu_padded.dtype == cu.dtype
    expected = [1, 2, 3, 4, 5, -1, -1, -1] + list(range(6, 19)) + [-1, -1, -1] + [19, -1, -1, -1]
    assert padded.flatten().tolist() == expected
    assert torch.equal(zigzag_unpad(padded, cu_padded, cu), x)


def test_trailing_padding_leaves_causal_attention_of_real_tokens_unchanged():
    gen = torch.Generator().manual_seed(3)
    cu = cu_from_lengths([5, 11])
    q, k, v = (torch.randn(16, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    (qp, cu_p), (kp, _), (vp, _) = (zigzag_pad(t, cu, world_size=4) for t in (q, k, v))
    out_padded, _ = reference.attention_varlen_forward(qp, kp, vp, cu_p, cu_p, None, True)
    out, _ = reference.attention_varlen_forward(q, k, v, cu, cu, None, True)
    torch.testing.assert_close(zigzag_unpad(out_padded, cu_p, cu), out, rtol=0, atol=1e-12)


def _attn_args(**change):
    args = dict(q=torch.zeros(8, 4, 8), k=torch.zeros(8, 2, 8), v=torch.zeros(8, 2, 8),
                cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), max_seqlen=8)
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, message", [
    (dict(cu_seqlens=torch.tensor([0, 8])), TypeError, "int32"),
    (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "rise from 0"),
    (dict(k=torch.zeros(6, 2, 8)), ValueError, "same tokens"),
    (dict(k=torch.zeros(8, 3, 8), v=torch.zeros(8, 3, 8)), ValueError, "dividing q's"),
    (dict(v=torch.zeros(8, 2, 8, dtype=torch.float64)), TypeError, "one floating dtype"),
    (dict(q=torch.zeros(8, 32)), ValueError, "packed"),
    (dict(max_seqlen=4), ValueError, "max_seqlen"),
])
def test_bad_input_is_refused_with_a_clear_error(change, error, message):
    with pytest.raises(error, match=message):
        ring_flash_attn_varlen_func(**_attn_args(**change))


def test_shard_refuses_lengths_not_divisible_by_2r():
    with pytest.raises(ValueError, match="zigzag_pad"):
        zigzag_shard(torch.zeros(6), torch.tensor([0, 6], dtype=torch.int32), 0, 2)


def test_spell_kernels_exports_the_ring_api():
    import spell_kernels

    for name in ("ring_flash_attn_varlen_func", "zigzag_shard", "zigzag_unshard", "zigzag_pad", "zigzag_unpad",
                 "zigzag_cu_seqlens"):
        assert getattr(spell_kernels, name) is getattr(ring_attn, name)
