"""The compile report's checks on every shipped flash-attention kernel and config, built for
sm_90 without a GPU (bench/aot_report.py):
- no register spills, shared memory within Hopper's 227 KiB, matmuls on wgmma;
- row offsets are 64-bit: one segment of more than 2^31 / (heads * head_dim) tokens must not
  wrap around. Proven on the PTX: every use of a row stride (elements from one token to the
  next) widens it to 64 bits first, so no product row * stride is formed in 32-bit arithmetic.
  A 32-bit control kernel shows the check can fail."""
import os
import re

import pytest
import triton
import triton.language as tl

from bench.aot_report import analyse, shipped_specs
from tests.kernels.aot import HOPPER_SHARED_LIMIT, compile_for_hopper_with_sass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW_STRIDES = {"stride_qt", "stride_kt", "stride_vt", "stride_ot", "stride_dot", "stride_dkt", "stride_dvt",
               "stride_dqt", "stride_lh", "stride_t"}
# instructions that read a 32-bit stride without forming a 32-bit product with it
_WIDENING = ("cvt.s64.s32", "cvt.u64.u32", "mul.wide.s32", "mul.wide.u32", "mad.wide.s32", "mad.wide.u32")


@triton.jit
def _rows_32bit(X, Y, stride_t, BLOCK: tl.constexpr):  # control: the old, overflowing form
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + rows * stride_t, tl.load(X + rows * stride_t))


@triton.jit
def _rows_64bit(X, Y, stride_t, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + rows.to(tl.int64) * stride_t, tl.load(X + rows.to(tl.int64) * stride_t))


def narrow_stride_uses(ptx, signature):
    """{stride name: [PTX instructions that use it in 32-bit arithmetic]} and the set of row
    strides found, for the row-stride parameters of one compiled kernel."""
    params = []  # kernel parameters in PTX order: a 2-D TMA descriptor is the CUtensorMap + shape + strides
    for name, ty in signature.items():
        if ty.startswith("tensordesc"):
            params += [name] + [None] * 2 * (ty.count(",") + 1)
        elif ty != "constexpr":
            params.append(name)
    narrow, found = {}, set()
    for index, name in enumerate(params):
        if name not in ROW_STRIDES:
            continue
        load = re.search(rf"ld\.param\.b32\s+(%r\d+), \[\w+_param_{index}\];", ptx)
        if load is None:
            continue  # parameter unused in this variant
        found.add(name)
        reg = load.group(1)
        uses = [ln.strip() for ln in ptx.splitlines() if re.search(rf"{reg}\b", ln) and "ld.param" not in ln]
        narrow[name] = [u for u in uses if not u.startswith(_WIDENING)]
        assert uses, f"{name} loaded but never used"
    return narrow, found


def _spec(kernel):
    return dict(module="tests.kernels.test_attn_report", path=ROOT, kernel=kernel,
                signature={"X": "*fp16", "Y": "*fp16", "stride_t": "i32", "BLOCK": "constexpr"},
                constexprs={"BLOCK": 128}, divisible_by_16=["X", "Y", "stride_t"], num_warps=4, num_stages=1)


@pytest.fixture(scope="module")
def built():
    """{label: (spec, result)} for the shipped kernels (bf16, fp16; D = 64, 128; causal, plus the
    shared-prefix variant, bf16, D = 128) and the two control kernels: one compilation run."""
    cases = [(data_type, d, False) for data_type in ("bf16", "fp16") for d in (64, 128)] + [("bf16", 128, True)]
    specs = [(f"{label} {data_type} D={d}{' parent' if parent else ''}", spec) for data_type, d, parent in cases
             for label, spec in shipped_specs(data_type, d, has_parent=parent)]
    specs += [("control 32-bit", _spec("_rows_32bit")), ("control 64-bit", _spec("_rows_64bit"))]
    results = compile_for_hopper_with_sass([s for _, s in specs])
    return {label: (spec, res) for (label, spec), res in zip(specs, results)}


def test_shipped_configs_fit_hopper_without_spills(built):
    for label, (spec, res) in built.items():
        if label.startswith("control"):
            continue
        a = analyse(res)
        print(f"{label:32s} registers={a['registers']} spill={a['spill_bytes']} B shared={a['shared'] / 1024:.1f} KiB "
              f"loops={a['loops']} tma={a['tma']}")
        assert a["spill_bytes"] == 0, f"{label} spills {a['spill_bytes']} bytes per thread"
        assert a["shared"] <= HOPPER_SHARED_LIMIT, f"{label} needs {a['shared']} B of shared memory"
        assert a["wgmma"], f"{label}: matmuls did not lower to wgmma"
        assert a["loops"], f"{label}: no loop with a matmul found in its {a['counted_in']}"
        assert a["tma"] == ("TMA" in label), f"{label}: TMA loads {'missing' if a['tma'] else 'unexpected'}"


def test_flash_attention_row_offsets_are_64_bit(built):
    verdicts = {label: narrow_stride_uses(res["ptx"], spec["signature"]) for label, (spec, res) in built.items()}
    narrow32, found32 = verdicts.pop("control 32-bit")
    assert found32 == {"stride_t"} and narrow32["stride_t"], "the check must flag 32-bit row * stride products"
    narrow64, found64 = verdicts.pop("control 64-bit")
    assert found64 == {"stride_t"} and narrow64 == {"stride_t": []}

    for label, (narrow, found) in verdicts.items():
        # through TMA, K/V rows are descriptor coordinates (token indices) and the strides unused
        assert ({"stride_qt"} if "TMA" in label else {"stride_qt", "stride_kt", "stride_vt"}) <= found, (label, found)
        assert all(not uses for uses in narrow.values()), f"{label}: 32-bit row offsets {narrow}"
