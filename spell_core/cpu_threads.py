"""How many torch threads a CPU run uses by default: the cores nobody else is using.

On a 2-core machine an idle second core nearly halves a step; on a busy one a second thread
waits for a core and makes every matrix product slower than one thread would. So the default is
the number of cores minus the load average (rounded), at least 1, shared among the local ranks
of a torchrun job, and never more than torch's own default (a caller that set
torch.set_num_threads(1), such as the test suite, keeps 1).
"""
from __future__ import annotations

import os

__all__ = ["idle_core_threads"]


def idle_core_threads(cores: int | None = None, load: float | None = None, local_ranks: int | None = None,
                      cap: int | None = None) -> tuple[int, str]:
    """(threads, why) for this process; arguments default to what the machine reports."""
    import torch

    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_ranks is None else local_ranks
    cap = torch.get_num_threads() if cap is None else cap
    idle = max(1, round(cores - load))
    threads = max(1, min(cap, idle // max(1, local_ranks)))
    why = f"{cores} cores, load average {load:.1f}"
    if local_ranks > 1:
        why += f", {local_ranks} ranks on this machine"
    if threads == cap and cap < idle // max(1, local_ranks):
        why += f", torch's limit {cap}"
    return threads, why
