"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90) without a GPU.

The test process runs with TRITON_INTERPRET=1, under which @triton.jit yields interpreted
functions that cannot be compiled, so compilation happens in a fresh subprocess without it.

    specs = [dict(module="spell_kernels.flash_attn", kernel="_fwd_kernel",
                  signature={"Q": "*fp16", ..., "BLOCK_M": "constexpr"},
                  constexprs={"BLOCK_M": 128, ...}, num_warps=8, num_stages=3,
                  divisible_by_16=["Q", "stride_qt", ...])]   # optional, as the launcher specialises
    results = compile_for_hopper(specs)   # one dict per spec: shared, num_warps, ptx,
                                          # registers, spill_bytes (per thread, from ptxas -v)

`kernel_signature` and `runtime_aligned` build a spec's signature and aligned arguments for the
kernels of spell_kernels/flash_attn.py from their argument names (tests/kernels/test_attn_aot.py
and bench/aot_report.py use them).
"""
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import contextlib, importlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

request = json.load(sys.stdin)
out = []
for spec in request["specs"]:
    if spec.get("path"):
        sys.path.insert(0, spec["path"])
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    # optional: argument names the launcher would specialise as divisible by 16 (aligned pointers, strides)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible_by_16", [])}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=attrs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2)}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
    result = {"kernel": spec["kernel"], "shared": compiled.metadata.shared,
              "num_warps": compiled.metadata.num_warps, "ptx": compiled.asm["ptx"],
              "registers": int(regs.group(1)) if regs else None,
              "spill_bytes": int(spill.group(1)) if spill else None}
    if request["sass"]:
        try:
            result["sass"] = compiled.asm["sass"]
        except Exception:  # no cuobjdump in this Triton wheel: PTX only
            result["sass"] = None
    out.append(result)
print("AOT-JSON" + json.dumps(out))
"""

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def _compile(specs, sass, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # registers/spills from a fresh ptxas run
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps({"specs": specs, "sass": sass}), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation for sm_90 failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-JSON"))
    return json.loads(line[len("AOT-JSON"):])


def compile_for_hopper(specs, timeout=600):
    return _compile(specs, sass=False, timeout=timeout)


def compile_for_hopper_with_sass(specs, timeout=900):
    """As compile_for_hopper, and each result also has "sass" (cuobjdump -sass of the cubin, None
    when the Triton wheel ships no cuobjdump). A spec may name "path", a folder put on sys.path
    before its module is imported (kernels that are not in an installed package, e.g. bench/)."""
    return _compile(specs, sass=True, timeout=timeout)


# flash_attn.py's kernel arguments by name: fp32 statistics, int32 offsets, float and int scalars;
# any other non-constexpr argument points to data of the spec's data type.
_FP32_POINTERS = {"Lse", "Delta", "M", "D", "dQacc"}
_INT_POINTERS = {"cu_q", "cu_k", "Parent", "child_ptr", "child_seg", "order"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}
_INT_SCALAR_PREFIXES = ("stride_", "n_heads", "total_", "n_ctx", "H", "n_blocks")


def kernel_signature(fn, data_type, constexprs, descriptors=None):
    """Triton signature of a flash_attn kernel from its argument names (pointers to data in
    data_type, fp32 statistics, int32 offsets and strides); descriptors: name -> block shape."""
    descriptors = descriptors or {}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = f"tensordesc<{data_type}[{', '.join(map(str, descriptors[name]))}]>"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name.startswith(_INT_SCALAR_PREFIXES):
            signature[name] = "i32"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        else:
            signature[name] = "*" + data_type
    return signature


def runtime_aligned(fn, constexprs, descriptors=()):
    """What the JIT specialises at real shapes: 16-byte aligned pointers and strides that are
    multiples of 16 (head dims 64-128); not token counts or the lse row stride (= total tokens)."""
    return [n for n in fn.arg_names if n not in constexprs and n not in _FLOAT_SCALARS and n not in descriptors
            and not n.startswith(("n_heads", "total_", "n_blocks")) and n != "stride_lh"]
