"""The RL kernels (the fused linear log-prob row passes, also behind policy_loss) compile for Hopper
(sm_90) as their launchers call them, without a GPU: the row passes run on a chunk of logits of a
real vocabulary with the kernels recorded (aot_launch.py), and each call is built with the
specialisation the JIT applies at run time (divisibility hints, i32/i64 by value). Checked:
shared memory, no register spills, global loads/stores, and the 64-bit row offset (row x row
stride passes 2^31 once a chunk holds more than 2^31 logits), read from the PTX. `pytest -s`
prints each build."""
import pytest
import torch

from spell_kernels import logprob
from tests.kernels.aot import HOPPER_SHARED_LIMIT
from tests.kernels.aot_launch import compile_launches_for_hopper, param_arithmetic, record_launches

VOCAB = 151936  # Qwen2.5 / Qwen3
ROWS = 8  # the chunk's row count only sizes the grid


def _launches(dtype, with_entropy):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(ROWS, VOCAB, generator=gen).to(dtype)  # one chunk of logits, as _Chunks holds it on CUDA
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    lse, entropy, g_logp, g_entropy = (torch.zeros(ROWS) for _ in range(4))
    with record_launches(logprob, ["_logprob_stats_kernel", "_logprob_grad_kernel"]) as launches:
        logprob._row_stats_(z, targets, -100, with_entropy, True, None)
        logprob._row_grad_(z, targets, lse, entropy, g_logp, g_entropy if with_entropy else None, -100, True, None)
    return [(f"{launch['kernel']} logits={str(dtype)[6:]} entropy={with_entropy}", launch) for launch in launches]


@pytest.fixture(scope="module")
def builds():
    labelled = [x for dtype in (torch.bfloat16, torch.float16, torch.float32) for with_entropy in (False, True)
                for x in _launches(dtype, with_entropy)]
    results = compile_launches_for_hopper([launch for _, launch in labelled])
    return [(label, result) for (label, _), result in zip(labelled, results)]


@pytest.mark.slow
def test_logprob_kernels_compile_for_sm90_as_launched(builds):
    assert len(builds) == 12
    for label, res in builds:
        print(f"sm_90 {label:50s} warps={res['num_warps']} shared={res['shared']} B registers={res['registers']} "
              f"spill={res['spill_bytes']} B; divisible by 16: {', '.join(res['divisible_by_16'])}")
        assert res["num_warps"] == logprob._NUM_WARPS
        assert res["shared"] <= HOPPER_SHARED_LIMIT
        assert res["spill_bytes"] == 0, f"{label}: {res['spill_bytes']} bytes of register spills"
        assert f".entry {res['kernel']}" in res["ptx"]
        # with the hints the logits stream in 16-byte vectors (without them: one element per load)
        assert "ld.global.v4.b32" in res["ptx"], f"{label}: logits loads are not 16-byte vectors"
        if res["kernel"] == "_logprob_grad_kernel":
            assert "st.global.v4.b32" in res["ptx"], f"{label}: logit-gradient stores are not 16-byte vectors"
        # the runtime hints: aligned pointers, and the vocabulary (a multiple of 16) as size and row stride
        tensors = {n for n, ty in res["signature"].items() if ty.startswith("*")}
        assert tensors | {"n_vocab", "stride_row"} <= set(res["divisible_by_16"]), label
        assert res["signature"]["stride_row"] == "i32" and res["signature"]["ignore_index"] == "i32"


@pytest.mark.slow
def test_row_offset_is_64_bit_in_the_ptx(builds):
    for label, res in builds:
        found = param_arithmetic(res["ptx"], res["kernel"], res["signature"], "stride_row")
        assert found["wide"], f"{label}: no 64-bit arithmetic on stride_row"
        assert not found["narrow"], f"{label}: 32-bit offset arithmetic on stride_row: {found['narrow']}"
