"""The decode and LSE-merge Triton kernels compile for Hopper (sm_90) as their launchers call them
at realistic shapes, without a GPU: the launchers run with the kernels recorded (aot_launch.py),
and each call is built with the specialisation the JIT applies at run time (divisibility hints,
constant 1s). Checked: shared memory within Hopper's, no register spills, tensor-core MMA in the
split kernel, and 64-bit row offsets, read from the PTX. `pytest -s` prints each build."""
import re

import pytest
import torch

from spell_kernels import decode_attn, lse_merge
from tests.kernels.aot import HOPPER_SHARED_LIMIT
from tests.kernels import aot_launch
from tests.kernels.aot_launch import compile_launches_for_hopper, param_arithmetic, record_launches

# (dtype, query heads, KV heads, head dim, groups, samples per group). The default model (9 / 3
# heads, D = 64) with G = 8: 24 rows per KV head -> BLOCK_M 32; 32 / 4 heads at D = 128 with G = 8:
# 64 rows -> BLOCK_M 64, the largest tile; fp16 at D = 128. Each decode call launches the prefix
# split, the own-range split (BLOCK_M 16) and the combine.
DECODE_CASES = [(torch.bfloat16, 9, 3, 64, 2, 8), (torch.bfloat16, 32, 4, 128, 2, 8), (torch.float16, 12, 4, 128, 1, 4)]
# (dtype, tokens, heads, head dim) of merge_attn_states (ring attention's and the decode fallback's merges)
MERGE_CASES = [(torch.bfloat16, 3000, 32, 128), (torch.float16, 3000, 9, 64)]
PREFIX_LEN, OWN_LEN = 4000, 37

# Arguments multiplied by a row index (token, query, cache slot, split): 64-bit products. The head
# strides multiply a head index (< heads) and stay 32-bit.
ROW_STRIDES = {
    "_split_partial_kernel": ["stride_qb", "stride_kn", "stride_vn", "stride_ps", "stride_pb", "stride_ls",
                              "stride_lb"],
    "_combine_splits_kernel": ["stride_ps", "stride_pb", "stride_ls", "stride_lb", "stride_ob"],
    "_merge_kernel": ["stride_ot", "stride_oh", "stride_lh", "stride_lt", "stride_bt", "stride_bh", "stride_blh",
                      "stride_blt"],
}


def _decode_launches(dtype, hq, hkv, d, groups, samples):
    b = groups * samples
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    slots = groups * PREFIX_LEN + b * 64
    k_cache, v_cache = (torch.zeros(slots, hkv, d, dtype=dtype) for _ in range(2))
    prefix_start = torch.arange(groups, dtype=torch.int32) * PREFIX_LEN
    prefix_len = torch.full((groups,), PREFIX_LEN, dtype=torch.int32)
    cu = torch.arange(groups + 1, dtype=torch.int32) * samples
    own_start = groups * PREFIX_LEN + torch.arange(b, dtype=torch.int32) * 64
    own_len = torch.full((b,), OWN_LEN, dtype=torch.int32)
    with record_launches(decode_attn, ["_split_partial_kernel", "_combine_splits_kernel"]) as launches:
        decode_attn.decode_attn_shared_prefix(q, k_cache, v_cache, prefix_start, prefix_len, cu, own_start, own_len)
    names = ["prefix split", "own split", "combine"]
    return [(f"{name} {str(dtype)[6:]} {hq}/{hkv} heads D={d}", launch) for name, launch in zip(names, launches)]


def _merge_launches(dtype, tokens, heads, d):
    out = torch.zeros(tokens, heads, d, dtype=dtype)
    lse = torch.zeros(heads, tokens)
    with record_launches(lse_merge, ["_merge_kernel"]) as launches:
        lse_merge.merge_attn_states(out, lse, out, lse)
    return [(f"merge {str(dtype)[6:]} T={tokens} H={heads} D={d}", launches[0])]


def _control_launch():
    src = torch.zeros(4, 96, dtype=torch.bfloat16)
    with record_launches(aot_launch, ["offsets_control_kernel"]) as rec:
        aot_launch.offsets_control_kernel[(4,)](src, src, src.stride(0), src.stride(0), 96, BLOCK=128)
    return [("control", rec[0])]


@pytest.fixture(scope="module")
def builds():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPELL_KERNELS", "triton")
        labelled = [x for case in DECODE_CASES for x in _decode_launches(*case)]
        labelled += [x for case in MERGE_CASES for x in _merge_launches(*case)]
    labelled += _control_launch()
    results = compile_launches_for_hopper([launch for _, launch in labelled])
    return [(label, launch, result) for (label, launch), result in zip(labelled, results)]


@pytest.mark.slow
def test_decode_and_merge_kernels_compile_for_hopper_as_launched(builds):
    for label, launch, res in builds:
        if label == "control":
            continue
        kw = launch["kwargs"]
        print(f"sm_90 {label:36s} {res['kernel']:22s} BLOCK_M={kw.get('BLOCK_M', '-')} REP={kw.get('REP', '-')} "
              f"warps={res['num_warps']} shared={res['shared']} B registers={res['registers']} "
              f"spill={res['spill_bytes']} B; divisible by 16: {', '.join(res['divisible_by_16'])}")
        assert 0 <= res["shared"] <= HOPPER_SHARED_LIMIT, label
        assert ".target sm_90" in res["ptx"], label
        assert res["spill_bytes"] == 0, f"{label}: {res['spill_bytes']} bytes of register spills"
        # the runtime hints are there: every tensor is a fresh (aligned) allocation
        tensors = [n for n, ty in res["signature"].items() if ty.startswith("*")]
        assert set(tensors) <= set(res["divisible_by_16"]), label
        if res["kernel"] == "_split_partial_kernel":
            assert "mma" in res["ptx"], f"{label}: the split kernel's tl.dot should lower to tensor-core MMA"
            assert {"stride_kn", "stride_vn", "head_dim", "split_len"} <= set(res["divisible_by_16"]), label
            # with the hints K/V blocks stream into shared memory in 16-byte copies
            assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", res["ptx"]), label


@pytest.mark.slow
def test_row_offsets_are_64_bit_in_the_ptx(builds):
    for label, _, res in builds:
        if label == "control":
            continue
        for param in ROW_STRIDES[res["kernel"]]:
            if res["signature"][param] == "constexpr":
                continue  # equal to 1 at this launch: the JIT made it a constant, nothing to multiply
            found = param_arithmetic(res["ptx"], res["kernel"], res["signature"], param)
            assert found["wide"], f"{label}: no 64-bit arithmetic on {param}"
            assert not found["narrow"], f"{label}: 32-bit offset arithmetic on {param}: {found['narrow']}"


@pytest.mark.slow
def test_offset_check_sees_32_bit_arithmetic(builds):
    (_, _, res), = [b for b in builds if b[0] == "control"]
    load = param_arithmetic(res["ptx"], res["kernel"], res["signature"], "stride_src")
    store = param_arithmetic(res["ptx"], res["kernel"], res["signature"], "stride_dst")
    assert load["narrow"] and not load["wide"], load
    assert store["wide"] and not store["narrow"], store
