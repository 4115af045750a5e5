"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90) without a GPU.

The test process runs with TRITON_INTERPRET=1, under which @triton.jit yields interpreted
functions that cannot be compiled, so compilation happens in a fresh subprocess without it.

    specs = [dict(module="spell_kernels.flash_attn", kernel="_fwd_kernel",
                  signature={"Q": "*fp16", ..., "BLOCK_M": "constexpr"},
                  constexprs={"BLOCK_M": 128, ...}, num_warps=8, num_stages=3,
                  divisible_by_16=["Q", "stride_qt", ...])]   # optional, as the launcher specialises
    results = compile_for_hopper(specs)   # one dict per spec: shared, num_warps, ptx,
                                          # registers, spill_bytes (per thread, from ptxas -v)
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

out = []
for spec in json.load(sys.stdin):
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
    out.append({"kernel": spec["kernel"], "shared": compiled.metadata.shared,
                "num_warps": compiled.metadata.num_warps, "ptx": compiled.asm["ptx"],
                "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": int(spill.group(1)) if spill else None})
print("AOT-JSON" + json.dumps(out))
"""

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def compile_for_hopper(specs, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # registers/spills from a fresh ptxas run
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation for sm_90 failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-JSON"))
    return json.loads(line[len("AOT-JSON"):])


_REPORT_SCRIPT = r"""
import contextlib, importlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

out = []
for spec in json.load(sys.stdin):
    if spec.get("path"):
        sys.path.insert(0, spec["path"])
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible_by_16", [])}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=attrs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2)}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
    try:
        sass = compiled.asm["sass"]
    except Exception as e:  # no cuobjdump in this Triton wheel: PTX only
        sass = None
    out.append({"kernel": spec["kernel"], "shared": compiled.metadata.shared,
                "num_warps": compiled.metadata.num_warps, "ptx": compiled.asm["ptx"], "sass": sass,
                "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": int(spill.group(1)) if spill else None})
print("AOT-JSON" + json.dumps(out))
"""


def compile_for_hopper_with_sass(specs, timeout=900):
    """As compile_for_hopper, and each result also has "sass" (cuobjdump -sass of the cubin, None
    when the Triton wheel ships no cuobjdump). A spec may name "path", a folder put on sys.path
    before its module is imported (kernels that are not in an installed package, e.g. bench/)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    proc = subprocess.run([sys.executable, "-c", _REPORT_SCRIPT], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation for sm_90 failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-JSON"))
    return json.loads(line[len("AOT-JSON"):])
