"""How many torch threads a CPU run uses by default: the cores nobody else is using.

On a 2-core machine an idle second core nearly halves a step; on a busy one a second thread
waits for a core and makes every matrix product slower than one thread would. So the default is
the number of idle cores (rounded), at least 1, shared among the local ranks of a torchrun job,
and never more than torch's own default (a caller that set torch.set_num_threads(1), such as the
test suite, keeps 1). Idle cores are measured over half a second from the /proc/stat lines of
the CPUs this process may use (its affinity: a container pinned to 2 of 64 cores counts those 2,
each by its own busy share); the load average lags by a minute, so right after an install it
would still count the installer.
"""
from __future__ import annotations

import os
import time

__all__ = ["idle_core_threads", "busy_cores", "busy_between", "cpu_jiffies", "usable_cores"]


PROC_STAT = "/proc/stat"


def cpu_jiffies(stat_text: str) -> dict[int, tuple[float, float]]:
    """{cpu number: (busy, total) jiffies since boot} from the per-CPU lines `cpuN` of /proc/stat's
    text. guest and guest_nice are left out: the kernel already counts them in user and nice."""
    out = {}
    for line in stat_text.splitlines():
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        fields = [float(x) for x in values[:8]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        out[int(name[3:])] = (sum(fields) - idle, sum(fields))
    return out


def busy_between(before: str, after: str, cpus) -> float:
    """Cores' worth of work between two readings of /proc/stat, over the CPUs `cpus` only: the
    busy share of each of them, summed (a CPU missing from either reading counts as idle)."""
    t0, t1 = cpu_jiffies(before), cpu_jiffies(after)
    busy = 0.0
    for cpu in cpus:
        if cpu in t0 and cpu in t1 and t1[cpu][1] > t0[cpu][1]:
            busy += (t1[cpu][0] - t0[cpu][0]) / (t1[cpu][1] - t0[cpu][1])
    return busy


def busy_cores(cpus=None, window_s: float = 0.5, stat_path: str | None = None) -> tuple[float, str]:
    """(cores' worth of work running now on the CPUs this process may use, how it was measured):
    /proc/stat's per-CPU lines over `window_s`, else the 1-minute load average (no /proc: macOS).
    cpus: CPU numbers (default: this process's affinity)."""
    path = PROC_STAT if stat_path is None else stat_path
    try:
        cpus = allowed_cpus() if cpus is None else set(cpus)
        with open(path) as f:
            before = f.read()
        time.sleep(window_s)
        with open(path) as f:
            after = f.read()
        readings = cpu_jiffies(before), cpu_jiffies(after)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0], "load average"
    if cpus is None or not any(c in readings[0] and c in readings[1] for c in cpus):
        return os.getloadavg()[0], "load average"
    return busy_between(before, after, cpus), "busy"


def allowed_cpus() -> set[int] | None:
    """The CPU numbers this process may run on, or None where the OS has no affinity (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity where the OS has one (macOS has none)."""
    cpus = allowed_cpus()
    return len(cpus) if cpus is not None else os.cpu_count() or 1


def idle_core_threads(cores: int | None = None, busy: float | None = None, local_ranks: int | None = None,
                      cap: int | None = None) -> tuple[int, str]:
    """(threads, why) for this process; arguments default to what the machine reports."""
    import torch

    cores = usable_cores() if cores is None else cores
    cap = torch.get_num_threads() if cap is None else cap
    if cap == 1 and busy is None:
        return 1, "torch's limit 1"  # nothing to measure
    how = "busy"
    if busy is None:
        busy, how = busy_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_ranks is None else local_ranks
    share = max(1, round(cores - busy)) // max(1, local_ranks)
    threads = max(1, min(cap, share))
    why = f"{cores} cores, {busy:.1f} {how}"
    if local_ranks > 1:
        why += f", {local_ranks} ranks on this machine"
    if cap < share:
        why += f", torch's limit {cap}"
    return threads, why
