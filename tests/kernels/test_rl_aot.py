"""The RL kernels (fused linear log-prob row passes) compile for Hopper (sm_90) with the
block sizes shipped for CUDA; shared memory per program is printed (pytest -s)."""
import pytest

from spell_kernels import logprob

from .aot import HOPPER_SHARED_LIMIT, compile_for_hopper

_COMMON = {"targets_ptr": "*i64", "lse_ptr": "*fp32", "n_vocab": "i32", "stride_row": "i64", "ignore_index": "i64",
           "BLOCK_V": "constexpr", "WITH_ENTROPY": "constexpr"}
_STATS = {"logits_ptr": None, "logp_ptr": "*fp32", "entropy_ptr": "*fp32"}
_GRAD = {"logits_ptr": None, "entropy_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_entropy_ptr": "*fp32"}


def _spec(kernel, args, logits_dtype, with_entropy):
    signature = {**args, **_COMMON, "logits_ptr": f"*{logits_dtype}"}
    return dict(module="spell_kernels.logprob", kernel=kernel, signature=signature,
                constexprs={"BLOCK_V": logprob._BLOCK_V, "WITH_ENTROPY": with_entropy},
                num_warps=logprob._NUM_WARPS)


@pytest.mark.slow
def test_logprob_kernels_compile_for_sm90():
    specs = [_spec(kernel, args, dtype, with_entropy)
             for kernel, args in (("_logprob_stats_kernel", _STATS), ("_logprob_grad_kernel", _GRAD))
             for dtype in ("bf16", "fp16", "fp32") for with_entropy in (False, True)]
    results = compile_for_hopper(specs)
    assert len(results) == len(specs)
    for spec, result in zip(specs, results):
        logits, entropy = spec["signature"]["logits_ptr"], spec["constexprs"]["WITH_ENTROPY"]
        label = f"{result['kernel']} logits={logits} entropy={entropy}"
        print(f"sm_90 {label}: shared memory {result['shared']} B, {result['num_warps']} warps")
        assert result["num_warps"] == logprob._NUM_WARPS
        assert result["shared"] <= HOPPER_SHARED_LIMIT
        assert f".entry {result['kernel']}" in result["ptx"]
        assert "ld.global" in result["ptx"]
        if result["kernel"] == "_logprob_grad_kernel":
            assert "st.global" in result["ptx"]
