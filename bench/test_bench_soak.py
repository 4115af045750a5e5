"""A short run of bench/kill_resume_soak.py (the full one: 20 cycles, `python bench/kill_resume_soak.py`):
kill -9 at random moments, --resume, at most one step lost, every kept checkpoint loadable.
On demand (bench/ is outside the CI suite): 1-2 minutes."""
import pytest

from bench.kill_resume_soak import soak


@pytest.mark.slow
def test_kill_minus_nine_and_resume_lose_at_most_one_step(tmp_path):
    lines = []
    result = soak(cycles=2, steps=3, workdir=tmp_path, seed=3, report=lines.append)
    assert result["max_steps_lost"] <= 1 and result["checkpoints"][-1] == 3
    assert len(lines) == result["kills"] >= 1
