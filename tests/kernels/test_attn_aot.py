"""Every Triton kernel of flash_attn.py compiles for Hopper (sm_90) at the block sizes shipped in
GPU_CONFIGS, for fp16 and bf16 and each supported head dim, within Hopper's shared memory."""
import pytest
import torch

from spell_kernels import flash_attn as fa
from tests.kernels.aot import HOPPER_SHARED_LIMIT, compile_for_hopper, kernel_signature, runtime_aligned

HEAD_DIMS = (64, 80, 96, 128)
MAX_SPILL_BYTES = 32
_CUDA = torch.device("cuda")  # only selects the GPU table; nothing runs on a GPU


def _specs(data_type, head_dim, causal, has_parent):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[data_type]
    common = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=fa._block_d(head_dim), CAUSAL=causal,
                  HAS_PARENT=has_parent, PRECISION=fa._precision(dtype))
    specs = []
    for kernel, kind in (("_attn_fwd", "fwd"), ("_bwd_dkdv", "dkdv"), ("_bwd_dq", "dq")):
        cfg = fa._config(kind, head_dim, _CUDA, dtype)
        constexprs = dict(common, BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_N=cfg.pop("BLOCK_N"), USE_TMA=False,
                          ATOMIC_DQ=False)
        fn = getattr(fa, kernel)
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        specs.append(dict(module="spell_kernels.flash_attn", kernel=kernel,
                          signature=kernel_signature(fn, data_type, constexprs), constexprs=constexprs,
                          divisible_by_16=runtime_aligned(fn, constexprs), **cfg))
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=fa._block_d(head_dim), BLOCK=fa.PREPROCESS_BLOCK)
    specs.append(dict(module="spell_kernels.flash_attn", kernel="_bwd_preprocess",
                      signature=kernel_signature(fa._bwd_preprocess, data_type, constexprs), constexprs=constexprs,
                      divisible_by_16=runtime_aligned(fa._bwd_preprocess, constexprs), num_warps=4, num_stages=1))
    return specs


def _labelled(specs, label):
    return [dict(spec, label=label) for spec in specs]  # extra keys are ignored by the compiler script


def _check(specs):
    results = compile_for_hopper(specs)
    for spec, res in zip(specs, results):
        c = spec["constexprs"]
        print(f"sm_90 {spec['label']:18s} {res['kernel']:16s} D={c['HEAD_DIM']:3d} BLOCK_M={c.get('BLOCK_M', '-')} "
              f"BLOCK_N={c.get('BLOCK_N', '-')} warps={res['num_warps']} stages={spec['num_stages']} "
              f"shared={res['shared']} B ({res['shared'] / 1024:.1f} KiB) registers={res['registers']} "
              f"spill={res['spill_bytes']} B")
        assert res["shared"] <= HOPPER_SHARED_LIMIT, f"{res['kernel']} needs {res['shared']} B of shared memory"
        assert ".target sm_90" in res["ptx"]
        if spec["label"].startswith("fp32"):
            continue  # fp32 on a GPU is a checking path (3xTF32 dots): it may spill
        # a few spilled registers outside the hot loop are tolerable; more means a config that will be slow
        assert res["spill_bytes"] is not None and res["spill_bytes"] <= MAX_SPILL_BYTES, res["spill_bytes"]
        if res["kernel"] != "_bwd_preprocess":
            assert "wgmma" in res["ptx"], "matmuls did not lower to Hopper's tensor cores (wgmma)"


@pytest.mark.parametrize("data_type", ["fp16", "bf16"])
def test_varlen_kernels_compile_for_hopper(data_type):
    _check([s for d in HEAD_DIMS for s in _labelled(_specs(data_type, d, causal=True, has_parent=False),
                                                     f"{data_type} causal")])


def test_variant_kernels_compile_for_hopper():
    # the parent-range and non-causal variants add loops or drop masks, not tiles: bf16, head dim
    # 128 (the largest tiles); fp32 inputs have their own small configs (GPU_CONFIGS_FP32)
    _check(_labelled(_specs("bf16", 128, causal=True, has_parent=True)[:3], "bf16 causal+parent")
           + _labelled(_specs("bf16", 128, causal=False, has_parent=False)[:3], "bf16 non-causal")
           + _labelled(_specs("fp32", 128, causal=True, has_parent=True), "fp32 causal+parent"))
