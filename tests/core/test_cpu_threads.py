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


def _stat(jiffies: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat text for CPUs {n: (user, idle)}: the aggregate line, then one line per CPU."""
    total_user = sum(u for u, _ in jiffies.values())
    total_idle = sum(i for _, i in jiffies.values())
    lines = [f"cpu  {total_user} 0 0 {total_idle} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {u} 0 0 {i} 0 0 0 0 0 0" for n, (u, i) in sorted(jiffies.items())]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 9", "btime 1", "processes 7"]) + "\n"


def test_a_spinner_on_one_of_two_allowed_cpus_of_sixteen_is_one_busy_core(tmp_path, monkeypatch):
    """A machine reporting 16 CPUs, this process pinned to CPUs 2 and 3, a spinner on CPU 3 for
    the whole window (100 of 100 jiffies busy) and a spinner on CPU 9, outside the affinity. Busy
    is 1.0 core by hand (CPU 3's share 1, CPU 2's 0; CPU 9 does not count), so 2 - 1 = 1 thread.
    The aggregate `cpu` line says 200 of 1,600 jiffies busy, 1/8 of the machine; times 2 cores
    that is 0.25 busy and round(1.75) = 2 threads: the bug this test catches."""
    from spell_core.common import cpu_threads

    before = {n: (1000, 5000) for n in range(16)}
    after = {n: (1000, 5100) for n in range(16)}
    after[3] = (1100, 5000)
    after[9] = (1100, 5000)
    stat = tmp_path / "stat"
    stat.write_text(_stat(before))
    monkeypatch.setattr(cpu_threads, "PROC_STAT", str(stat), raising=False)
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {2, 3})
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: stat.write_text(_stat(after)))

    assert cpu_threads.busy_between(_stat(before), _stat(after), {2, 3}) == 1.0
    assert cpu_threads.busy_between(_stat(before), _stat(after), {2, 3, 9}) == 2.0
    assert cpu_threads.busy_between(_stat(before), _stat(after), {0, 1}) == 0.0
    assert cpu_threads.idle_core_threads(local_ranks=1, cap=16) == (1, "2 cores, 1.0 busy")


def test_each_allowed_cpu_counts_by_its_own_busy_share(tmp_path, monkeypatch):
    """CPU 0 busy 30 of 40 jiffies (a tickless CPU sees fewer), CPU 5 busy 50 of 200: 0.75 + 0.25
    = 1.0 core, where pooling the jiffies would give 2 x 80 / 240 = 0.67."""
    from spell_core.common import cpu_threads
    from spell_core.common.cpu_threads import busy_cores, cpu_jiffies

    before = _stat({0: (0, 0), 5: (0, 0), 7: (0, 0)})
    after = _stat({0: (30, 10), 5: (50, 150), 7: (200, 0)})
    assert cpu_jiffies(after) == {0: (30.0, 40.0), 5: (50.0, 200.0), 7: (200.0, 200.0)}
    stat = tmp_path / "stat"
    stat.write_text(before)
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: stat.write_text(after))
    assert busy_cores({0, 5}, window_s=0.5, stat_path=str(stat)) == (1.0, "busy")


def test_without_sched_getaffinity_the_core_count_is_os_cpu_count(monkeypatch):
    """macOS has no os.sched_getaffinity: the run falls back to os.cpu_count() instead of failing."""
    import os

    from spell_core.common import cpu_threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_threads.usable_cores() == 6
    threads, why = cpu_threads.idle_core_threads(busy=1.0, local_ranks=1, cap=8)
    assert (threads, why) == (5, "6 cores, 1.0 busy")
