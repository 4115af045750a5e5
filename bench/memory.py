"""Peak memory of one run, for the benches' memory columns: run each variant in a fresh
process (`run_json`), measure there (`time_and_peak`), print the variants side by side
(`print_table`).

CPU: the resident set's high-water mark (VmHWM). A child process inherits its parent's mark
(ru_maxrss survives fork + exec, and pytest's is large), so the mark is reset through
/proc/self/clear_refs (Linux >= 4.0) once the inputs exist, and the peak is reported as the
rise above the level at that moment. torch's CPU tensors are plain malloc, so the resident set
sees them (tracemalloc would not). CUDA: torch.cuda.max_memory_allocated, reset the same way.

glibc keeps freed blocks below its mmap threshold resident for reuse, and raises that threshold
(up to 32 MiB) each time a larger block is freed, so a step's resident peak can sit well above its
live bytes. Children run with MALLOC_ENV get every block of 64 KiB or more from mmap and give it
back on free: their resident set then follows the live tensors (bench/results/plan.md measured
both within 2 % of each other). `live_tensor_peak` counts the live bytes themselves.
"""
import gc
import json
import os
import subprocess
import sys
import time

import torch

MiB = 2**20
# glibc malloc: blocks >= 64 KiB from mmap (returned on free), no heap top kept, one arena
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
_RESET_SLACK = 4 * MiB  # after a reset the mark may sit this far above the level read just before


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(device: str = "cpu") -> int:
    """Set the peak back to the current level; returns that level in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak resident set ({err}): CPU peak memory needs Linux's "
                           "/proc/self/clear_refs; run the memory benches on Linux") from err
    level, mark = status_bytes("VmRSS"), status_bytes("VmHWM")
    if mark - level > _RESET_SLACK:
        raise RuntimeError(f"the peak resident set stayed at {mark / MiB:.0f} MiB after a reset to "
                           f"{level / MiB:.0f} MiB: its peaks would be floored")
    return level


def peak_bytes(device: str = "cpu") -> int:
    """The peak since the last reset_peak, in bytes (absolute, not a rise)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")


def time_and_peak(run, reps: int = 1, device: str = "cpu") -> dict:
    """Call run() `reps` times: the first call's peak rise above the level before it, and the wall
    and CPU seconds of every call. Allocate the inputs (and warm up) before calling this."""
    gc.collect()
    base = reset_peak(device)
    times, cpu_times = [], []
    for rep in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if rep == 0:
            peak = peak_bytes(device) - base
    return {"peak_extra_bytes": int(peak), "best_s": min(times), "best_cpu_s": min(cpu_times), "times_s": times}


def live_tensor_peak(run) -> dict:
    """Call run() once under torch.profiler with profile_memory: the exact peak rise of the bytes
    PyTorch's CPU allocator has handed out and not yet taken back (every tensor, and every buffer
    an op allocates through it; not malloc calls of other libraries), and the op that reached it.
    The allocator's running total carries over from earlier profiled calls (frees outside the
    profiler are not counted), so the rise is taken from its value before the first event."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], [(node, ()) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, parents = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size, " / ".join(parents[-2:])))
        stack.extend((child, parents + (node.name,)) for child in node.children)
    if not events:
        return {"live_peak_bytes": 0, "live_peak_at": ""}
    events.sort(key=lambda e: e[0])
    base = events[0][1] - events[0][2]
    _, total, _, where = max(events, key=lambda e: e[1])
    return {"live_peak_bytes": int(max(0, total - base)), "live_peak_at": where}


def run_json(argv: list[str], env: dict | None = None, label: str = "") -> dict:
    """Run `python *argv` in a fresh process and return the last JSON line it prints, or
    {"error": the last line of its stderr} when it fails. The test-only kernel switches
    (SPELL_KERNELS, TRITON_INTERPRET) are not passed on; `env` adds variables."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("SPELL_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env={**child_env, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"{label or argv[0]} failed"])[-1]}
    return json.loads(lines[-1])


def print_table(results: dict[str, dict], baseline, columns) -> None:
    """One row per variant, then each column's ratio to the row's baseline.

    results: variant -> measurement (or {"error": ...}); baseline: one variant's name, or a
    dict variant -> its baseline's name; columns: (key, header, divisor) triples, a key absent
    from a row printed as '-'."""
    baseline_of = baseline if isinstance(baseline, dict) else {v: baseline for v in results if v != baseline}
    columns = [c for c in columns if any(c[0] in r for r in results.values())]
    width = max([len("variant")] + [len(v) for v in results]) + 2
    print("\n" + "variant".rjust(width) + "".join(h.rjust(max(12, len(h) + 2)) for _, h, _ in columns)
          + "   ratio to baseline: " + ", ".join(h for _, h, _ in columns))
    for name, row in results.items():
        if "error" in row:
            print(f"{name.rjust(width)}  error: {row['error']}")
            continue
        cells = "".join((f"{row[k] / d:.3f}" if d == 1 else f"{row[k] / d:.0f}").rjust(max(12, len(h) + 2))
                        if k in row else "-".rjust(max(12, len(h) + 2)) for k, h, d in columns)
        base = results.get(baseline_of.get(name, ""), {})
        if base and "error" not in base:
            ratios = [f"{row[k] / base[k]:.2f}x" if k in row and base.get(k) else "-" for k, _, _ in columns]
            cells += f"   {' '.join(r.rjust(7) for r in ratios)}  (vs {baseline_of[name]})"
        print(name.rjust(width) + cells)
