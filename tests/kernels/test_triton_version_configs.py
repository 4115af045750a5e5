"""Backward configs per Triton version: under Triton 3.6 (the GPU image's) 3.7.1's dk/dv configs
spill, so `_config` takes GPU_CONFIGS_BEFORE_TRITON_3_7 there (bench/results/aot.md). The AOT
compile tests check the shipped configs under whichever Triton runs them:
    PYTHONPATH=/path/to/triton36:.:kernels python -m pytest tests/kernels/test_attn_aot.py"""
import pytest
import torch

from spell_kernels import flash_attn as fa

CUDA = torch.device("cuda")  # only selects the GPU table


@pytest.mark.parametrize("version, stages", [((3, 6), 2), ((3, 7), 3), ((4, 0), 3)])
def test_dkdv_at_d128_takes_the_config_of_the_triton_version(monkeypatch, version, stages):
    monkeypatch.setattr(fa, "triton_version", lambda: version)
    for kind in ("dkdv", "dkdv_atomic"):
        cfg = fa._config(kind, 128, CUDA, torch.bfloat16)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]) == (32, 128, 8, stages)


def test_triton_3_6_changes_only_the_backward(monkeypatch):
    monkeypatch.setattr(fa, "triton_version", lambda: (3, 6))
    old = {kind: fa.GPU_CONFIGS[kind][128] for kind in ("fwd", "fwd_tma", "dq")}
    assert {kind: fa._config(kind, 128, CUDA, torch.bfloat16) for kind in old} == old
    assert fa._config("dkdv", 64, CUDA, torch.float16) == dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)
    assert fa._config("dkdv", 128, CUDA, torch.float32) == fa.GPU_CONFIGS_FP32["dkdv"][128]  # fp32: its own table


def test_the_installed_version_is_read():
    import triton
    assert fa.triton_version() == tuple(int(x) for x in triton.__version__.split(".")[:2])
