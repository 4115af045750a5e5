"""How many torch threads a CPU run uses by default: the cores nobody else is using.

On a 2-core machine an idle second core nearly halves a step; on a busy one a second thread
waits for a core and makes every matrix product slower than one thread would. So the default is
the number of idle cores (rounded), at least 1, shared among the local ranks of a torchrun job,
and never more than torch's own default (a caller that set torch.set_num_threads(1), such as the
test suite, keeps 1). Idle cores are measured over half a second from /proc/stat: the load
average lags by a minute, so right after an install it would still count the installer.
"""
from __future__ import annotations

import os
import time

__all__ = ["idle_core_threads", "busy_cores"]


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(cores: int, window_s: float = 0.5) -> tuple[float, str]:
    """(cores' worth of work running now, how it was measured): /proc/stat over `window_s`, else
    the 1-minute load average (no /proc: macOS)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(window_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0], "load average"
    if total1 <= total0:
        return os.getloadavg()[0], "load average"
    return cores * (busy1 - busy0) / (total1 - total0), "busy"


def usable_cores() -> int:
    """CPUs this process may run on: its affinity where the OS has one (macOS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
        busy, how = busy_cores(cores)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_ranks is None else local_ranks
    share = max(1, round(cores - busy)) // max(1, local_ranks)
    threads = max(1, min(cap, share))
    why = f"{cores} cores, {busy:.1f} {how}"
    if local_ranks > 1:
        why += f", {local_ranks} ranks on this machine"
    if cap < share:
        why += f", torch's limit {cap}"
    return threads, why
