"""The decode and LSE-merge Triton kernels compile for Hopper (sm_90) at the shipped launch
configurations, without a GPU; prints each one's shared memory."""
import pytest

from spell_kernels import decode_attn
from tests.kernels.aot import HOPPER_SHARED_LIMIT, compile_for_hopper

DTYPES = {"fp16": "*fp16", "bf16": "*bf16"}


def _split_spec(dtype, head_dim, block_m, rep):
    ptr = DTYPES[dtype]
    signature = {name: ptr for name in ("Q", "K", "V")}
    signature.update({"OutPart": "*fp32", "LsePart": "*fp32", "KeyStart": "*i32", "KeyLen": "*i32", "CuQ": "*i32"})
    for name in ("stride_qb", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_ps",
                 "stride_pb", "stride_ph", "stride_ls", "stride_lb", "first_split", "split_len", "num_m_blocks",
                 "head_dim"):
        signature[name] = "i32"
    signature["qk_scale_log2"] = "fp32"
    constexprs = dict(REP=rep, BLOCK_M=block_m, BLOCK_N=decode_attn.BLOCK_N, BLOCK_D=head_dim, DOT_PRECISION="tf32")
    signature.update({name: "constexpr" for name in constexprs})
    return dict(module="spell_kernels.decode_attn", kernel="_split_partial_kernel", signature=signature,
                constexprs=constexprs, num_warps=decode_attn.NUM_WARPS, num_stages=decode_attn.NUM_STAGES,
                label=f"split {dtype} D={head_dim} BLOCK_M={block_m} REP={rep}")


def _combine_spec(dtype, head_dim, block_h):
    signature = {"OutPart": "*fp32", "LsePart": "*fp32", "Out": DTYPES[dtype], "Lse": "*fp32"}
    for name in ("num_splits", "num_heads", "head_dim", "stride_ps", "stride_pb", "stride_ph", "stride_ls",
                 "stride_lb", "stride_ob", "stride_oh", "stride_lse_h"):
        signature[name] = "i32"
    constexprs = dict(BLOCK_H=block_h, BLOCK_D=head_dim)
    signature.update({name: "constexpr" for name in constexprs})
    return dict(module="spell_kernels.decode_attn", kernel="_combine_splits_kernel", signature=signature,
                constexprs=constexprs, num_warps=decode_attn.NUM_WARPS,
                label=f"combine {dtype} D={head_dim} BLOCK_H={block_h}")


def _merge_spec(dtype, head_dim):
    signature = {"Out": DTYPES[dtype], "Lse": "*fp32", "OutB": DTYPES[dtype], "LseB": "*fp32",
                 "MergedOut": "*fp32", "MergedLse": "*fp32"}
    for name in ("num_rows", "num_heads", "head_dim", "stride_ot", "stride_oh", "stride_lh", "stride_lt",
                 "stride_bt", "stride_bh", "stride_blh", "stride_blt"):
        signature[name] = "i32"
    constexprs = dict(BLOCK_R=4096 // head_dim, BLOCK_D=head_dim)  # as _merge_triton picks them
    signature.update({name: "constexpr" for name in constexprs})
    return dict(module="spell_kernels.lse_merge", kernel="_merge_kernel", signature=signature,
                constexprs=constexprs, num_warps=4, label=f"merge {dtype} D={head_dim}")


# the default model (9/3 heads, D=64, G=8 samples: 24 rows -> BLOCK_M 32), the largest tiles,
# the own-range launch (BLOCK_M 16), in both half types
SPECS = (
    [_split_spec("bf16", 64, 32, 3), _split_spec("bf16", 128, 64, 8), _split_spec("fp16", 128, 16, 3)]
    + [_combine_spec("bf16", d, 16) for d in (64, 128)]
    + [_merge_spec("bf16", 128)]
)


@pytest.mark.slow
def test_decode_kernels_compile_for_hopper():
    labels = [spec.pop("label") for spec in SPECS]
    results = compile_for_hopper(SPECS)
    for label, result in zip(labels, results):
        print(f"sm_90 {label}: shared memory {result['shared']} bytes, {result['num_warps']} warps")
        assert 0 <= result["shared"] <= HOPPER_SHARED_LIMIT, label
        assert ".target sm_90" in result["ptx"], label
    split_ptx = [r["ptx"] for label, r in zip(labels, results) if label.startswith("split")]
    assert all("mma" in ptx for ptx in split_ptx), "the split kernel's tl.dot should lower to tensor-core MMA"
