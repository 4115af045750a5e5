"""bench/gpu_first_contact.sh, the one command for a GPU machine's first minutes, run on CPU
(DRY_RUN=1: every stage through the Triton interpreter at tiny shapes), so that it cannot rot
before a GPU runs it: every stage passes and writes its verdict, key numbers and log tail to
$OUT/summary.md; a failing or overrunning stage is reported and the next one still runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_first_contact.sh"


def run_script(tmp_path, **env):
    environ = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
                   DRY_RUN="1", **env)
    done = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=900)
    return done, (tmp_path / "out" / "summary.md").read_text()


def test_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    done, summary = run_script(tmp_path)
    verdicts = dict(re.findall(r"^## (\w+): (\w+)", summary, re.M))
    assert verdicts == dict.fromkeys(["env", "kernels", "run", "attention", "logprob", "sampler", "moe"], "PASS"), \
        summary + done.stdout + done.stderr
    assert done.returncode == 0
    for line in ("- torch:", "- checks: 6 passed, 0 failed", "- metrics: loss ", "- weights changed:",
                 "- bf16 matmul peak:", "- fused:", "- ours, eager:", "- transformers generate",
                 "- T=16 grouped GEMM: fwd "):
        assert line in summary, line
    assert "0 stage(s) not passed" in summary
    for stage in verdicts:
        assert (tmp_path / "out" / "logs" / f"{stage}.log").stat().st_size > 0


def test_a_failing_or_overrunning_stage_is_reported_and_the_next_one_runs(tmp_path):
    done, summary = run_script(tmp_path, STAGES="nonsense env", STAGE_TIMEOUT_S="1")
    assert re.search(r"^## nonsense: FAIL .*exit 1\)", summary, re.M), summary
    assert "usage:" in summary  # the log's tail
    assert re.search(r"^## env: TIMEOUT \(\d+ s of 1 s", summary, re.M), summary
    assert "2 stage(s) not passed" in summary and done.returncode != 0
