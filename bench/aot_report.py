"""Compile report for Hopper without a GPU: every shipped flash-attention kernel and config
(head dim 64 and 128; bf16 and fp16; causal) built for sm_90 ahead of time, beside the
algorithm of Triton's fused-attention tutorial (bench/tutorial_attn.py) built the same way.

    .venv/bin/python bench/aot_report.py            # prints the markdown table
    .venv/bin/python bench/aot_report.py --out bench/results/aot.md
    .venv/bin/python bench/aot_report.py --kernels moe   # the MoE kernels only (tests/kernels/moe_aot.py)

Per kernel: registers and spilled bytes per thread (ptxas -v), shared memory per block, whether
matmuls lowered to wgmma and loads to TMA, and instructions per thread per loop step: the SASS
instructions (cuobjdump ships with the Triton wheel; PTX when it does not) of each innermost
loop that holds a matmul, the lightest (unmasked blocks) and heaviest (masked / diagonal) one.
One SASS instruction is issued once per warp, so the count is per thread and per key (or
query) block the loop consumes. Compilation runs in a subprocess without TRITON_INTERPRET
(tests/kernels/aot.py).
"""
import argparse
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from spell_kernels import flash_attn as fa  # noqa: E402
from tests.kernels.aot import (HOPPER_SHARED_LIMIT, compile_for_hopper_with_sass, kernel_signature,  # noqa: E402
                               runtime_aligned)

HEAD_DIMS = (64, 128)
DATA_TYPES = ("bf16", "fp16")
_CUDA = torch.device("cuda")  # only selects the GPU config table; nothing runs on a GPU


def _torch_dtype(data_type):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[data_type]


def shipped_specs(data_type, head_dim, causal=True, has_parent=False):
    """Specs of the kernels flash_attn.py launches for this dtype/head dim on an sm_90 GPU, as
    (label, spec) pairs (the variants flash_attn.aot_variants lists)."""
    dtype = _torch_dtype(data_type)
    out = []
    for label, kernel, kind, extra, descriptors in fa.aot_variants(head_dim, dtype):
        fn = getattr(fa, kernel)
        cfg = fa._config(kind, head_dim, _CUDA, dtype)
        constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=fa._block_d(head_dim), CAUSAL=causal,
                          HAS_PARENT=has_parent, PRECISION=fa._precision(dtype),
                          BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_N=cfg.pop("BLOCK_N"), **extra)
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        descriptors = {k: [constexprs["BLOCK_N"], constexprs["BLOCK_D"]] for k in descriptors}
        spec = dict(module="spell_kernels.flash_attn", kernel=kernel,
                    signature=kernel_signature(fn, data_type, constexprs, descriptors), constexprs=constexprs,
                    divisible_by_16=runtime_aligned(fn, constexprs, descriptors), **cfg)
        out.append((label, spec))
    return out


def tutorial_specs(data_type, head_dim):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import tutorial_attn as tut
    fwd = dict(tut.FWD_CONFIG[head_dim])
    bm, bn = fwd.pop("BLOCK_M"), fwd.pop("BLOCK_N")
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, STAGE=3)
    signature = dict(sm_scale="fp32", M="*fp32", desc_q=f"tensordesc<{data_type}[{bm}, {head_dim}]>",
                     desc_k=f"tensordesc<{data_type}[{bn}, {head_dim}]>",
                     desc_v=f"tensordesc<{data_type}[{bn}, {head_dim}]>",
                     desc_o=f"tensordesc<{data_type}[{bm}, {head_dim}]>", n_ctx="i32",
                     HEAD_DIM="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", STAGE="constexpr")
    path = os.path.join(ROOT, "bench")
    specs = [("tutorial fwd", dict(module="tutorial_attn", path=path, kernel="tut_attn_fwd", signature=signature,
                                   constexprs=constexprs, divisible_by_16=["M", "n_ctx"], **fwd))]
    bwd = dict(tut.BWD_CONFIG)
    constexprs = {k: bwd.pop(k) for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "MASK_SLICE")}
    constexprs["HEAD_DIM"] = head_dim
    signature = {}
    for name in tut.tut_attn_bwd.arg_names:
        signature[name] = ("constexpr" if name in constexprs else "fp32" if name == "sm_scale"
                           else "i32" if name.startswith("stride") or name in ("H", "n_ctx")
                           else "*fp32" if name in ("M", "D") else "*" + data_type)
    aligned = [n for n in tut.tut_attn_bwd.arg_names if n not in constexprs and n != "sm_scale"]
    specs.append(("tutorial bwd", dict(module="tutorial_attn", path=path, kernel="tut_attn_bwd", signature=signature,
                                       constexprs=constexprs, divisible_by_16=aligned, **bwd)))
    return specs


# ----------------------------------------------------------------------------- analysis

def _sass_lines(sass):
    """(kind, text) per line of Triton's SASS listing: ("label", name) for "LBB3:", ("insn", text)
    for an instruction line ("<control codes>\t<instruction>;"); cuobjdump's own layout
    ("/*0230*/ INSN ;" and ".L_x_3:") is read too."""
    out = []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.?L[\w.]+):\s*$", line)
        if label:
            out.append(("label", label.group(1)))
            continue
        insn = re.match(r"^(?:[-\w:]+\t|\s*/\*[0-9a-f]{4,}\*/\s+)(.*?)\s*;", line)
        if insn:
            out.append(("insn", insn.group(1)))
    return out


def sass_loops(sass, matmul="HGMMA"):
    """Instruction counts of the innermost loops (conditional backward branch to an earlier
    label) that contain a matmul: a list of ints, one per loop, in program order."""
    lines = _sass_lines(sass)
    label_at = {text: i for i, (kind, text) in enumerate(lines) if kind == "label"}
    loops = []
    for i, (kind, text) in enumerate(lines):
        # a loop closes with a conditional backward branch; the unconditional ones jump back
        # from out-of-line blocks (e.g. the retry of an mbarrier wait) and are not loops
        if kind != "insn" or "BRA" not in text or not text.startswith("@"):
            continue
        target = re.search(r"BRA\s+`?\(?(\.?L[\w.]+)", text)
        if target and label_at.get(target.group(1), i) < i:
            loops.append((label_at[target.group(1)], i))
    with_mm = [(a, b) for a, b in loops if any(k == "insn" and matmul in t for k, t in lines[a:b + 1])]
    innermost = [(a, b) for a, b in with_mm if not any(a < c and d <= b and (c, d) != (a, b) for c, d in with_mm)]
    return [sum(1 for k, _ in lines[a:b + 1] if k == "insn") for a, b in innermost]


def _ptx_loops(ptx, matmul="wgmma.mma_async"):
    """PTX fallback: instructions of each basic-block range that a backward branch closes."""
    body = [ln.strip() for ln in ptx.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(body) if re.match(r"^\$L__BB\d+_\d+:$", ln)}
    loops = []
    for i, ln in enumerate(body):
        m = re.match(r"^(@%p\d+\s+)?bra(\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and labels.get(m.group(3), i) < i:
            loops.append((labels[m.group(3)], i))
    with_mm = [(a, b) for a, b in loops if any(matmul in x for x in body[a:b + 1])]
    innermost = [(a, b) for a, b in with_mm if not any(a < c and d <= b and (c, d) != (a, b) for c, d in with_mm)]
    return [sum(1 for x in body[a:b + 1] if x and x.endswith(";") and not x.startswith("//")) for a, b in innermost]


def analyse(result):
    """Report fields of one compiled kernel (a result of compile_for_hopper_with_sass)."""
    ptx, sass = result["ptx"], result.get("sass")
    loops = sass_loops(sass) if sass else _ptx_loops(ptx)
    return dict(registers=result["registers"], spill_bytes=result["spill_bytes"], shared=result["shared"],
                wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                loops=loops, counted_in="SASS" if sass else "PTX")


def build(specs):
    """(label, spec, analysis) for each (label, spec)."""
    results = compile_for_hopper_with_sass([spec for _, spec in specs])
    return [(label, spec, analyse(res)) for (label, spec), res in zip(specs, results)]


def markdown(rows):
    head = ("| kernel | dtype | D | blocks (M×N) | warps | stages | registers | spill B | shared KiB "
            "| wgmma | TMA | insns/loop step (light / heavy) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for label, spec, a, data_type in rows:
        c = spec["constexprs"]
        blocks = (f"{c.get('BLOCK_M', c.get('BLOCK_M1'))}×{c.get('BLOCK_N', c.get('BLOCK_N1'))}"
                  if "BLOCK_M" in c or "BLOCK_M1" in c else "—")
        loops = a["loops"]
        steps = f"{min(loops)} / {max(loops)}" if loops else "—"
        lines.append(f"| {label} | {data_type} | {c.get('HEAD_DIM')} | {blocks} | {spec.get('num_warps')} "
                     f"| {spec.get('num_stages')} | {a['registers']} | {a['spill_bytes']} | {a['shared'] / 1024:.1f} "
                     f"| {'yes' if a['wgmma'] else 'no'} | {'yes' if a['tma'] else 'no'} | {steps} |")
    return "\n".join(lines)


def report(head_dims=HEAD_DIMS, data_types=DATA_TYPES, tutorial=True):
    rows = []
    for data_type in data_types:
        for d in head_dims:
            specs = list(shipped_specs(data_type, d)) + (tutorial_specs(data_type, d) if tutorial else [])
            rows += [(label, spec, a, data_type) for label, spec, a in build(specs)]
    return rows


def moe_report(data_types=("bf16", "fp16", "fp32")):
    """(label, result) per MoE kernel launch of one forward + backward at a Qwen3-30B-A3B layer shape,
    as moe_experts launches them on a GPU (tests/kernels/moe_aot.py), built for sm_90."""
    from tests.kernels.aot_launch import compile_launches_for_hopper
    from tests.kernels.moe_aot import moe_launches
    os.environ["SPELL_KERNELS"] = "triton"  # the launchers' Triton branch, recorded (not run) on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    labelled = [x for d in data_types for x in moe_launches(dtypes[d])]
    results = compile_launches_for_hopper([launch for _, launch in labelled])
    return [(label, res) for (label, _), res in zip(labelled, results)]


def moe_markdown(rows):
    lines = ["| MoE kernel (T 4096, H 2048, I 768, E 128, k 8) | warps | stages | registers | spill B | shared KiB "
             "| wgmma |", "|---|---|---|---|---|---|---|"]
    for label, res in rows:
        lines.append(f"| {label} | {res['num_warps']} | {res['num_stages']} | {res['registers']} | {res['spill_bytes']} "
                     f"| {res['shared'] / 1024:.1f} | {'yes' if 'wgmma' in res['ptx'] else 'no'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--dtypes", nargs="+", default=list(DATA_TYPES))
    parser.add_argument("--kernels", choices=("all", "attention", "moe"), default="all")
    args = parser.parse_args()
    tables, over = [], []
    if args.kernels in ("all", "attention"):
        rows = report(args.head_dims, args.dtypes)
        tables.append(markdown(rows))
        over += [label for label, _, a, _ in rows if a["shared"] > HOPPER_SHARED_LIMIT]
    if args.kernels in ("all", "moe"):
        moe_rows = moe_report(args.dtypes + (["fp32"] if "fp32" not in args.dtypes else []))
        tables.append(moe_markdown(moe_rows))
        over += [label for label, res in moe_rows if res["shared"] > HOPPER_SHARED_LIMIT]
    table = "\n\n".join(tables)
    print(table)
    if over:
        print("over Hopper's shared memory:", over)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
