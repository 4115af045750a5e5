"""`python -m spell_core.eval`'s CPU threads: by default the idle cores (as `run` counts them), not 1
(which halved an evaluation on an idle 2-core machine); --threads wins; torch's setting is restored."""
import torch

from spell_core import eval as spell_eval
from spell_core.common import cpu_threads


def _threads_seen(monkeypatch, argv_threads, idle):
    seen = []
    monkeypatch.setattr(cpu_threads, "idle_core_threads", lambda: (idle, f"{idle} idle"))
    monkeypatch.setattr(spell_eval, "_evaluate_and_report",
                        lambda args, items, ks, budget, device: seen.append(torch.get_num_threads()) or 0)
    args = spell_eval.build_parser().parse_args(["--data", "x.jsonl", "--device", "cpu"] + argv_threads)
    before = torch.get_num_threads()
    assert spell_eval._run(args, [], [1], None) == 0
    assert torch.get_num_threads() == before
    return seen[0]


def test_default_is_the_idle_cores_and_threads_option_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _threads_seen(monkeypatch, [], idle=3) == 3
        assert _threads_seen(monkeypatch, ["--threads", "2"], idle=3) == 2
    finally:
        torch.set_num_threads(before)
