"""The CPU run's default thread count: idle cores, worked by hand."""
import torch

from spell_core.common.cpu_threads import idle_core_threads


def test_idle_cores_minus_the_busy_ones_shared_by_local_ranks_and_capped_by_torch():
    assert idle_core_threads(cores=2, busy=0.1, local_ranks=1, cap=2) == (2, "2 cores, 0.1 busy")
    assert idle_core_threads(cores=2, busy=1.2, local_ranks=1, cap=2)[0] == 1  # round(0.8) = 1
    assert idle_core_threads(cores=2, busy=6.0, local_ranks=1, cap=2)[0] == 1  # never 0
    assert idle_core_threads(cores=16, busy=4.4, local_ranks=1, cap=16)[0] == 12  # round(11.6)
    threads, why = idle_core_threads(cores=16, busy=0.0, local_ranks=4, cap=16)
    assert threads == 4 and why == "16 cores, 0.0 busy, 4 ranks on this machine"
    threads, why = idle_core_threads(cores=8, busy=0.0, local_ranks=1, cap=3)
    assert threads == 3 and why.endswith("torch's limit 3")


def test_a_caller_that_set_one_thread_keeps_one():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert idle_core_threads(cores=64, busy=0.0, local_ranks=1)[0] == 1
    finally:
        torch.set_num_threads(before)


def test_busy_cores_counts_a_spinning_process(tmp_path):
    """A child that spins on one core for the whole window shows as at least half a core busy."""
    import subprocess
    import sys

    from spell_core.common.cpu_threads import busy_cores
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        import time
        time.sleep(0.5)
        busy, how = busy_cores(cores=2, window_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert how == "busy" and 0.5 <= busy <= 2.05


def test_without_sched_getaffinity_the_core_count_is_os_cpu_count(monkeypatch):
    """macOS has no os.sched_getaffinity: the run falls back to os.cpu_count() instead of failing."""
    import os

    from spell_core.common import cpu_threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_threads.usable_cores() == 6
    threads, why = cpu_threads.idle_core_threads(busy=1.0, local_ranks=1, cap=8)
    assert (threads, why) == (5, "6 cores, 1.0 busy")
