"""kill -9 + --resume soak (issue 15): a run on a tiny random Llama with scripted outputs
(tests/core/scripted.py) is killed with SIGKILL at a random moment, any phase (start-up,
model load, generation, update, checkpoint save), then resumed, CYCLES times; then it runs to
the end. After every kill:
  - every kept checkpoint loads (weights, optimizer state, random states);
  - at most one logged step is lost (the newest checkpoint is at most one step behind the
    last line of metrics.jsonl);
  - metrics.jsonl holds steps 1..k once each after the next resume.
At the end metrics.jsonl holds exactly steps 1..STEPS and no temporary folder is left.

    python bench/kill_resume_soak.py --cycles 20            # about 10 minutes on 2 busy CPU cores
bench/test_bench_soak.py runs 2 cycles of it (pytest bench/test_bench_soak.py; not in the CI suite).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _argv(model, corpus, out, steps):
    return ["--model", str(model), "--corpus", str(corpus), "--out", str(out), "--ctx", "2k", "--device", "cpu",
            "--questions", "3", "--group-size", "3", "--max-new-tokens", "32", "--seed", "5", "--no-progress",
            "--steps", str(steps), "--save-every", "1", "--kept-groups", "1", "--max-rounds", "2"]


def _spawn(argv, log):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPELL_TEST_SLEEP": "0.05"}
    return subprocess.Popen([sys.executable, "-m", "tests.core.scripted", *argv], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _continue(out: Path) -> list[str]:
    """--resume; --overwrite when the killed run had saved nothing yet (nothing to resume)."""
    from spell_core.training import train_state

    if train_state.find_latest(out) is not None:
        return ["--resume"]
    return ["--overwrite"] if out.exists() else []


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().split("\n"):
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line cut by the kill: the resume drops it
    return steps


PHASES = ("start-up", "a step", "a save")


def _wait_for_phase(phase: str, out: Path, process, rng: random.Random, timeout: float = 300) -> None:
    """start-up: up to 3 s after the run took the folder (model and corpus loading, resume);
    a step: a random moment after the next checkpoint (logging, generation, update, save);
    a save: as soon as a checkpoint's temporary folder appears, or a moment after."""
    deadline = time.monotonic() + timeout
    if phase == "start-up":
        time.sleep(rng.uniform(0.0, 3.0))
        return
    if phase == "a step":
        from spell_core.training import train_state

        first = train_state.find_latest(out)
        while train_state.find_latest(out) == first and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 4.0))
        return
    root = out / "checkpoints"
    while process.poll() is None and time.monotonic() < deadline:
        if root.is_dir() and any(p.name.startswith(".step-") for p in root.iterdir()):
            time.sleep(rng.uniform(0.0, 0.2))
            return
        time.sleep(0.005)


def check_checkpoints(out: Path, model_folder: Path) -> list[int]:
    """Load every kept checkpoint into a fresh model and optimizer; their steps."""
    import torch

    from spell_core.training import train_state
    from spell_core.models.model import load_pretrained

    steps = []
    for step, folder in train_state.list_checkpoints(out):
        model, _ = load_pretrained(model_folder)
        optimizer = torch.optim.AdamW(model.parameters())
        loaded, extra = train_state.load(folder, model, optimizer)
        assert loaded == step and extra["self_play"]["steps_done"] == step, folder
        steps.append(step)
    return steps


def soak(cycles: int, steps: int, workdir: Path, seed: int = 0, report=print) -> dict:
    from spell_core.training import train_state
    from spell_core.models.assets import resolve_model
    from tests.core.scripted import make_tiny_corpus, make_tiny_model

    rng = random.Random(seed)
    model = make_tiny_model(workdir / "model", resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(workdir / "corpus")
    out = workdir / "run"
    log_path = workdir / "log.txt"
    lost_max, kills = 0, 0
    for cycle in range(cycles):
        with open(log_path, "a") as log:
            process = _spawn(_argv(model, corpus, out, steps) + _continue(out), log)
            lock = out / ".spell-run.lock"
            deadline = time.monotonic() + 120
            while not (lock.exists() and lock.read_text().strip() == str(process.pid)):  # it owns the folder
                if process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            phase = rng.choice(PHASES)
            _wait_for_phase(phase, out, process, rng)
            finished = process.poll() is not None
            process.send_signal(signal.SIGKILL)
            process.wait()
        if finished:
            if process.returncode != 0:
                raise AssertionError(f"cycle {cycle}: the run failed ({process.returncode}); see {log_path}")
            report(f"cycle {cycle + 1}: the run had already finished")
            break
        kills += 1
        kept = check_checkpoints(out, model)
        logged = _logged_steps(out)
        lost = (max(logged) if logged else 0) - (kept[-1] if kept else 0)
        assert lost <= 1, f"cycle {cycle}: {lost} steps lost (logged {logged}, checkpoints {kept})"
        lost_max = max(lost_max, lost)
        report(f"cycle {cycle + 1}: killed ({phase}); checkpoints {kept} all load; logged up to step "
               f"{max(logged) if logged else 0}; lost {max(lost, 0)} step(s)")
    # to the end, unkilled
    with open(log_path, "a") as log:
        process = _spawn(_argv(model, corpus, out, steps) + _continue(out), log)
        assert process.wait(timeout=900) == 0, f"the final run failed; see {log_path}"
    final = _logged_steps(out)
    assert final == list(range(1, steps + 1)), f"metrics.jsonl steps {final}"
    kept = check_checkpoints(out, model)
    assert kept[-1] == steps, kept
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden, f"temporary folders left: {hidden}"
    return {"kills": kills, "max_steps_lost": lost_max, "checkpoints": kept}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30, help="steps of the run (more than the cycles reach)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spell-soak-") as tmp:
        started = time.perf_counter()
        result = soak(args.cycles, args.steps, Path(tmp), args.seed)
        print(f"soak: {result['kills']} kill -9 + --resume cycles, at most {result['max_steps_lost']} step lost, "
              f"every kept checkpoint loadable, steps 1..{args.steps} logged once each "
              f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
