"""Ahead-of-time builds for Hopper (sm_90) of Triton kernels exactly as their launchers call them.

`compile_for_hopper` (aot.py) takes hand-written signatures; the code it reports then lacks the
specialisation the JIT applies at run time (16-byte aligned pointers and integers divisible by
16 marked `tt.divisibility = 16`, integers equal to 1 turned into constants, i32 or i64 by
value), so it is not the code that will run. Here the launcher itself runs (in the test
process, under the interpreter) with the kernels swapped for recorders; each recorded call is
then compiled in a subprocess without TRITON_INTERPRET through Triton's own JIT binder
(`create_function_from_signature` + `JITFunction._pack_args`, what `kernel[grid](...)` does
before compiling), so signature, constants and hints are derived from the real arguments.

    with record_launches(decode_attn, ["_split_partial_kernel"]) as launches:
        decode_attn.decode_attn_shared_prefix(...)        # realistic shapes, CPU tensors
    results = compile_launches_for_hopper(launches)        # one dict per launch, as compile_for_hopper's,
                                                           # plus "signature" and "divisible_by_16"

The tensors only lend their dtype and their address modulo 16: a small CPU stand-in with the
same alignment replaces each one, so realistic strides need no realistic memory.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from spell_kernels._triton import tl, triton

_REPO = Path(__file__).resolve().parents[2]  # the subprocess imports modules by name from here

_SCRIPT = r"""
import contextlib, importlib, io, json, re, sys
import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
backend = make_backend(TARGET)


def stand_in(desc):
    if isinstance(desc, dict) and "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        base = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        assert base.data_ptr() % 16 == 0
        return base[desc["align"] // itemsize:]
    return desc


out = []
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    args = [stand_in(a) for a in launch["args"]]
    kwargs = {k: stand_in(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = False
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
    names = [p.name for p in fn.params]
    divisible = [names[path[0]] for path, a in attrs.items() if ["tt.divisibility", 16] in a]
    out.append({"kernel": launch["kernel"], "shared": compiled.metadata.shared,
                "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                "ptx": compiled.asm["ptx"], "signature": signature,
                "divisible_by_16": divisible,
                "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": int(spill.group(1)) if spill else None})
print("AOT-JSON" + json.dumps(out))
"""


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "align": value.data_ptr() % 16}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, module_name, kernel, launches):
        self.module_name, self.kernel, self.launches = module_name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"module": self.module_name, "kernel": self.kernel,
                                  "grid": [int(g) for g in (grid if isinstance(grid, tuple) else (grid,))],
                                  "args": [_describe(a) for a in args],
                                  "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return launch


@contextlib.contextmanager
def record_launches(module, kernels):
    """Within the block, calls of module.<kernel>[grid](...) are recorded (not run) into the
    yielded list. Outputs the kernels would write stay as allocated (garbage)."""
    launches = []
    saved = {name: getattr(module, name) for name in kernels}
    try:
        for name in kernels:
            setattr(module, name, _Recorder(module.__name__, name, launches))
        yield launches
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def compile_launches_for_hopper(launches, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # registers/spills from a fresh ptxas run
    payload = [{k: v for k, v in launch.items() if k != "grid"} for launch in launches]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(payload), env=env, cwd=_REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation for sm_90 failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-JSON"))
    return json.loads(line[len("AOT-JSON"):])


# --- 64-bit offsets, read from the PTX ----------------------------------------------------

_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+(.*?);", re.M)
_REG = re.compile(r"%r[d]?\d+")
_WIDE = ("mul.wide.", "mad.wide.")
_ARITH = ("mul.", "mad.", "add.", "sub.", "shl.")


def param_arithmetic(ptx, kernel, signature, param):
    """How the PTX of `kernel` does arithmetic with the integer argument `param`.

    Follows the registers the argument is loaded into through moves and sign/zero extensions,
    and sorts the multiplies, multiply-adds, adds and shifts that take one of them as an operand
    into "wide" (64-bit results: mul.wide / mad.wide of the 32-bit value, or any 64-bit op on
    its extension) and "narrow" (32-bit results: an offset that wraps past 2^31). Returns
    {"wide": [instructions], "narrow": [instructions]}."""
    params = [name for name, ty in signature.items() if ty != "constexpr"]
    if param not in params:
        raise ValueError(f"{param} is not a runtime argument of {kernel} (constexpr or specialised to 1?)")
    label = f"[{kernel}_param_{params.index(param)}]"
    body = ptx[ptx.index(f".entry {kernel}("):]
    narrow_regs, wide_regs = set(), set()
    found = {"wide": [], "narrow": []}
    for op, operands in _INSTR.findall(body):
        regs = _REG.findall(operands)
        dst, srcs = (regs[0], regs[1:]) if regs else (None, [])
        if op.startswith("ld.param") and label in operands:
            (wide_regs if dst.startswith("%rd") else narrow_regs).add(dst)
            continue
        uses_narrow = any(r in narrow_regs for r in srcs)
        uses_wide = any(r in wide_regs for r in srcs)
        if not (uses_narrow or uses_wide):
            continue
        line = f"{op} {operands}"
        if op.startswith("mov.") or op.startswith("cvt."):
            (wide_regs if dst.startswith("%rd") else narrow_regs).add(dst)
        elif op.startswith(_WIDE) or (op.startswith(_ARITH) and uses_wide):
            found["wide"].append(line)
        elif op.startswith(_ARITH):
            found["narrow"].append(line)
    return found


@triton.jit
def offsets_control_kernel(src, dst, stride_src, stride_dst, n_cols, BLOCK: tl.constexpr):
    """A control for param_arithmetic: the load's row offset is 32-bit (row * stride_src wraps
    past 2^31), the store's is 64-bit."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(src + row * stride_src + cols, mask=cols < n_cols)
    tl.store(dst + row.to(tl.int64) * stride_dst + cols, x, mask=cols < n_cols)
