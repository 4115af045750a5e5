"""`python -m spell_core.run` end to end on a tiny random Llama, the model's outputs scripted
(tests/core/scripted.py `random_play`, log-probs the model's own): metrics, plot and
checkpoints; resume equals an uninterrupted run; SIGINT saves and exits; SIGKILL in the
middle of a checkpoint write leaves the previous checkpoint as the loadable latest."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spell_core.sampling import sampler

from spell_core.training import train_state
from spell_core.run import main
from tests.core.scripted import make_tiny_corpus, make_tiny_model, random_play, scripted_generate

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("time_", "step_time_s", "train_step_time_s", "cpu_", "step_cpu", "offload_s")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from spell_core.models.assets import resolve_model

    model = make_tiny_model(tmp_path_factory.mktemp("tiny-model"), resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")
    return model, corpus


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(sampler, "generate", scripted_generate(random_play, real_logprobs=True))


def argv(assets, out, *extra):
    model, corpus = assets
    return ["--model", str(model), "--corpus", str(corpus), "--out", str(out), "--ctx", "2k", "--device", "cpu",
            "--questions", "3", "--group-size", "3", "--max-new-tokens", "64", "--seed", "5", "--no-progress",
            *extra]


def metrics_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in metrics]


def weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def test_two_steps_write_metrics_plot_summary_and_checkpoints(assets, scripted, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "2", "--save-every", "1")) == 0
    stdout = capsys.readouterr().out
    summaries = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [s.split(" | ")[0] for s in summaries] == ["step 1/2", "step 2/2"]
    assert all("reward Q " in s and "pass@G hist [" in s and "kept " in s and "tokens gen" in s for s in summaries)
    lines = metrics_lines(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert len(m["pass_rate_histogram"]) == 3 + 1 and sum(m["pass_rate_histogram"]) == m["responder_groups"]
        assert m["questions"] == 3 * m["rounds"]
        assert "train_loss" in m or m["train_skipped"]
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["step"] for q in questions] == [1] * lines[0]["questions"] + [2] * lines[1]["questions"]
    assert sum(q["status"] == "bad_format" for q in questions) == sum(m["questions_bad_format"] for m in lines)
    # one console line per question, each naming its id and status, before its step's summary
    shown = [line.split()[:3] for line in stdout.splitlines() if line.startswith("  s") and " | " in line]
    assert shown == [[f"s{q['step'] - 1}r0q{i}", q["task_type"], q["status"]]
                     for i, q in zip(list(range(3)) * 2, questions)]
    assert stdout.index("  s0r0q2 ") < stdout.index("step 1/2") < stdout.index("  s1r0q0 ")
    assert all(" | time Q " in s for s in summaries)
    assert all(len(q["responder_rewards"]) == 3 for q in questions if q["status"] == "ok")
    png = (out / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    assert matplotlib.image.imread(out / "metrics.png").ndim == 3
    latest = train_state.find_latest(out)
    assert latest.name == "step-000002"
    # the saved model is an HF checkpoint transformers loads
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(latest)
    assert hf.config.num_hidden_layers == 2
    extra = json.loads((latest / "state.json").read_text())["extra"]
    assert extra["self_play"]["steps_done"] == 2 and extra["metrics"]["step"] == 2


def test_resume_equals_an_uninterrupted_run(assets, scripted, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    rounds = ("--save-every", "10", "--kept-groups", "1", "--max-rounds", "4")  # every step trains
    assert main(argv(assets, straight, "--steps", "2", *rounds)) == 0
    assert main(argv(assets, split, "--steps", "1", *rounds)) == 0
    assert main(argv(assets, split, "--steps", "2", "--resume", *rounds)) == 0
    assert "resumed     from" in capsys.readouterr().out
    a, b = metrics_lines(straight), metrics_lines(split)
    assert [m["step"] for m in b] == [1, 2]
    assert all(m["trajectories_responder"] > 0 for m in a)  # both steps trained
    assert without_timing(a) == without_timing(b)
    wa, wb = weights(train_state.find_latest(straight)), weights(train_state.find_latest(split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = json.loads((train_state.find_latest(straight) / "state.json").read_text())["extra"]["self_play"]
    eb = json.loads((train_state.find_latest(split) / "state.json").read_text())["extra"]["self_play"]
    assert ea == eb


def test_offload_while_sampling_changes_nothing_but_where_the_state_waits(assets, scripted, tmp_path):
    """--offload-while-sampling on (AdamW's moments parked while the loop samples; the model is fp32
    on a CPU, so its weights stay): the checkpoint's weights and optimizer state and the metrics
    are bitwise those of the run without it."""
    plain, moved = tmp_path / "plain", tmp_path / "moved"
    rounds = ("--steps", "2", "--save-every", "10", "--kept-groups", "1", "--max-rounds", "4")  # every step trains
    assert main(argv(assets, plain, *rounds)) == 0
    assert main(argv(assets, moved, *rounds, "--offload-while-sampling", "on")) == 0
    a, b = metrics_lines(plain), metrics_lines(moved)
    assert all(m["trajectories_responder"] > 0 for m in a)
    assert "offload_bytes" not in a[0] and b[0]["offload_bytes"] == 0 < b[1]["offload_bytes"]  # moments from step 2
    assert without_timing(a) == [{k: v for k, v in m.items() if k != "offload_bytes"} for m in without_timing(b)]
    wa, wb = weights(train_state.find_latest(plain)), weights(train_state.find_latest(moved))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(train_state.find_latest(run) / "optimizer.pt") for run in (plain, moved))
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    assert all(torch.equal(oa["state"][i][key], ob["state"][i][key]) for i in oa["state"] for key in oa["state"][i])


def test_resume_without_a_checkpoint_is_a_clear_error(assets, scripted, tmp_path, capsys):
    assert main(argv(assets, tmp_path / "empty", "--steps", "1", "--resume")) == 1
    assert "--resume: no complete checkpoint in" in capsys.readouterr().err


def test_zero_steps_and_the_reduced_cpu_defaults_note(assets, tmp_path, capsys):
    model, corpus = assets
    assert main(["--model", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "reduced CPU defaults" in out and "--ctx 16k" in out and "--group-size 8" in out
    assert "--steps 0: nothing to train" in out


def _spawn(assets, out, env_extra, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen([sys.executable, "-m", "tests.core.scripted", *argv(assets, out, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}):\n{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.1)


def test_sigint_finishes_cleanly_with_a_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    process = _spawn(assets, out, {"SPELL_TEST_SLEEP": "0.2"}, "--steps", "50", "--save-every", "100")
    _wait_for(lambda: (out / "metrics.jsonl").exists(), process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    done = len(metrics_lines(out))
    assert f"SIGINT: stopped after step {done} and saved" in stdout
    latest = train_state.find_latest(out)
    assert latest is not None and latest.name == f"step-{done:06d}"
    assert "Traceback" not in stderr


@pytest.mark.parametrize("where", ["weights", "marker"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_loadable(assets, tmp_path, where, scripted):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    process = _spawn(assets, out, {"SPELL_TEST_PAUSE": f"{where}:2:{marker}"}, "--steps", "5", "--save-every", "1")
    _wait_for(marker.exists, process)
    process.kill()  # SIGKILL, in the middle of writing checkpoint 2
    process.communicate(timeout=60)
    latest = train_state.find_latest(out)
    assert latest is not None and latest.name == "step-000001"
    from spell_core.models.model import load_pretrained
    model, _ = load_pretrained(assets[0])
    step, extra = train_state.load(latest, model)
    assert step == 1 and extra["self_play"]["steps_done"] == 1
    if where == "weights":
        return
    # and the run resumes from it
    assert main(argv(assets, out, "--steps", "2", "--resume")) == 0
    assert train_state.find_latest(out).name == "step-000002"
    assert [m["step"] for m in metrics_lines(out)] == [1, 2]


def test_nan_update_is_reported_and_the_run_continues(assets, scripted, tmp_path, monkeypatch, capsys):
    from spell_core.training.trainer import Trainer

    def nan_step(self, trajectories):
        return {"skipped": True, "skip_reason": "non-finite loss (NaN/Inf): update skipped", "loss": float("nan")}
    monkeypatch.setattr(Trainer, "train_step", nan_step)
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "1", "--kept-groups", "1", "--max-rounds", "4")) == 0
    captured = capsys.readouterr()
    assert "step 1: non-finite loss (NaN/Inf): update skipped; the run continues" in captured.err
    summary = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert len(summary) == 1 and summary[0].endswith("update skipped: non-finite loss (NaN/Inf): update skipped")
    assert [m["train_skipped"] for m in metrics_lines(out)] == [True]
    assert "spell: done: 1 steps" in captured.out


def test_out_of_memory_names_the_knobs_and_keeps_the_last_state(assets, scripted, tmp_path, monkeypatch, capsys):
    from spell_core.training.trainer import Trainer

    def oom(self, trajectories):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(Trainer, "train_step", oom)
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "1", "--kept-groups", "1", "--max-rounds", "4")) == 1
    err = capsys.readouterr().err
    assert "Tried to allocate 20.00 GiB" in err
    assert all(knob in err for knob in ("--micro-batch-tokens", "--kv-budget-tokens", "--gradient-checkpointing",
                                        "--group-size", "--max-new-tokens"))
    latest = train_state.find_latest(out)  # the state before the failed step: step 0, as it started
    assert latest.name == "step-000000"
    assert json.loads((latest / "state.json").read_text())["extra"]["self_play"]["steps_done"] == 0
