"""The MoE kernels compile for Hopper (sm_90) as moe_experts launches them on a GPU (bf16 and
fp16 at a Qwen3-30B-A3B layer shape; fp32's own small tiles), without a GPU: no register spills,
shared memory within the limit, matmuls on wgmma, and 64-bit row offsets read from the PTX.
`pytest -s` prints each build (bench/aot_report.py --moe writes the same as a table)."""
import pytest
import torch

from tests.kernels.aot import HOPPER_SHARED_LIMIT
from tests.kernels.aot_launch import compile_launches_for_hopper, param_arithmetic
from tests.kernels.moe_aot import moe_launches

# per kernel, a row stride whose products with row ids must be 64-bit (P x 2I passes 2^31 at 1.4M pairs)
WIDE_STRIDES = {"_gate_up_swiglu_kernel": "stride_xt", "_grouped_matmul_kernel": "stride_cr",
                "_expert_weight_grad_kernel": "stride_ar", "_combine_kernel": "stride_yr",
                "_routing_weight_grad_kernel": "stride_yr"}
MATMULS = set(WIDE_STRIDES) - {"_combine_kernel", "_routing_weight_grad_kernel"}


@pytest.fixture(scope="module")
def builds():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPELL_KERNELS", "triton")
        labelled = [x for dtype in (torch.bfloat16, torch.float16, torch.float32) for x in moe_launches(dtype)]
    results = compile_launches_for_hopper([launch for _, launch in labelled])
    return [(label, result) for (label, _), result in zip(labelled, results)]


@pytest.mark.slow
def test_moe_kernels_compile_for_sm90_without_spills(builds):
    assert len(builds) == 3 * 11  # routing 2, forward 3, backward 6 per dtype
    for label, res in builds:
        print(f"sm_90 {label:55s} warps={res['num_warps']} stages={res['num_stages']} shared={res['shared']} B "
              f"registers={res['registers']} spill={res['spill_bytes']} B")
        assert res["shared"] <= HOPPER_SHARED_LIMIT, label
        assert res["spill_bytes"] == 0, f"{label}: {res['spill_bytes']} bytes of register spills"
        if res["kernel"] in MATMULS and "float32" not in label:
            assert "wgmma" in res["ptx"], f"{label}: the matmul did not lower to wgmma"


@pytest.mark.slow
def test_row_offsets_are_64_bit_in_the_ptx(builds):
    for label, res in builds:
        param = WIDE_STRIDES.get(res["kernel"])
        if param is None:
            continue
        found = param_arithmetic(res["ptx"], res["kernel"], res["signature"], param)
        assert found["wide"], f"{label}: no 64-bit arithmetic on {param}"
        assert not found["narrow"], f"{label}: 32-bit offset arithmetic on {param}: {found['narrow'][:3]}"
