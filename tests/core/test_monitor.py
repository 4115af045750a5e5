"""The monitor: metrics.jsonl, the plot, the summary line, GPU telemetry that stays silent
without a GPU or without NVML, and the progress hook fed by sampler events."""
import json
import sys
import types

import pytest

from spell_core.cli.monitor import GpuTelemetry, Monitor, progress_bar, summary_line
from spell_core.sampling.sampler import ProgressEvent


def metrics(step, **extra):
    return {"step": step, "reward_questioner": 0.1 * step, "reward_responder": 0.5, "reward_verifier": None,
            "pass_rate_histogram": [1, 2, 0, 1, 0], "kept_groups": 2, "responder_groups": 4, "questions": 6,
            "questions_bad_format": 1, "questions_bad_ground": 1, "questions_discarded": 0,
            "trajectories_questioner": 4, "trajectories_responder": 8, "trajectories_verifier": 4,
            "tokens_generated": 12345, "train_tokens_trained": 999, "step_time_s": 61.25, **extra}


def test_summary_line_reads_every_number():
    line = summary_line(metrics(3), total_steps=10)
    assert line == ("step 3/10 | reward Q 0.30 R 0.50 V - | pass@G hist [1 2 0 1 0] | kept 2/4 groups | "
                    "questions 6 (bad_format 1, bad_ground 1, discarded 0) | traj Q/R/V 4/8/4 | "
                    "tokens gen 12.3k trained 999 | 61.2 s")
    skipped = summary_line(metrics(1, train_skipped=True, train_skip_reason="non-finite loss (NaN/Inf)"))
    assert skipped.endswith("| update skipped: non-finite loss (NaN/Inf)")


def test_jsonl_and_png_after_two_steps_and_resume_truncation(tmp_path, capsys):
    monitor = Monitor(tmp_path, 3, bars=False)
    for step in (1, 2, 3):
        monitor.log_step(metrics(step))
    assert capsys.readouterr().out.count("step ") == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[1]["pass_rate_histogram"] == [1, 2, 0, 1, 0]
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "metrics.png")
    assert image.ndim == 3 and image.shape[0] > 100
    # resuming from step 2 drops the log of step 3 (it is redone); a fresh run starts a fresh log
    resumed = Monitor(tmp_path, 3, bars=False, resume_step=2)
    assert [m["step"] for m in resumed.history] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    Monitor(tmp_path, 3, bars=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_telemetry_is_empty_and_silent_on_cpu(capsys):
    assert GpuTelemetry().sample() == {}
    assert capsys.readouterr() == ("", "")


def _fake_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)


def test_telemetry_says_once_why_nvml_fails(monkeypatch, capsys):
    class NVMLError(Exception):
        pass

    def fail():
        raise NVMLError("Driver Not Loaded")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=fail)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda(monkeypatch)
    telemetry = GpuTelemetry()
    assert telemetry.sample() == {} and telemetry.sample() == {}
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "no GPU telemetry" in err and "NVMLError: Driver Not Loaded" in err and "gpu_power_w" in err


def test_telemetry_says_once_why_a_reading_fails(monkeypatch, capsys):
    class NVMLError(Exception):
        pass

    def fail(handle):
        raise NVMLError("GPU is lost")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetMemoryInfo=fail)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda(monkeypatch)
    telemetry = GpuTelemetry()
    assert [telemetry.sample() for _ in range(3)] == [{}, {}, {}]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reading NVML failed: NVMLError: GPU is lost" in err


def test_telemetry_without_pynvml_names_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    _fake_cuda(monkeypatch)
    assert GpuTelemetry().sample() == {}
    assert "install nvidia-ml-py" in capsys.readouterr().err


def test_telemetry_reads_nvml(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetPowerUsage=lambda h: 512_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    assert GpuTelemetry().sample() == {"gpu_memory_used_gib": 3.0, "gpu_memory_total_gib": 80.0,
                                       "gpu_utilization_pct": 97.0, "gpu_power_w": 512.0}


def test_progress_hook_counts_generated_tokens(capsys):
    import io
    stream = io.StringIO()
    with progress_bar("responder", prompts=2, samples=8, stream=stream) as hook:
        hook(ProgressEvent("prefill", 1000, 0.5, 8, 0))
        hook(ProgressEvent("decode", 8, 0.1, 8, 0))
        hook(ProgressEvent("decode", 6, 0.1, 6, 0))
    text = stream.getvalue()
    assert "responder" in text
    with progress_bar("x", 1, 1, enabled=False) as hook:
        assert hook is None


@pytest.mark.parametrize("value", [None, float("nan")])
def test_missing_rewards_print_a_dash(value):
    assert "reward Q - R - V -" in summary_line(metrics(1, reward_questioner=value, reward_responder=value))


def test_step_line_shows_the_time_of_each_stage():
    line = summary_line(metrics(2, time_questioner_s=41.6, time_grounding_s=3.2, time_responder_s=120.4,
                                time_verifier_s=88.0, time_update_s=30.5, step_time_s=284.0, step_cpu_s=101.26))
    assert line.endswith("| tokens gen 12.3k trained 999 | time Q 42 ground 3 R 120 V 88 update 30 s | 284.0 s (cpu 101.3 s)")


def test_question_lines_say_what_was_asked_and_how_the_roles_fared(tmp_path, capsys):
    from spell_core.roles import Status, Task
    from spell_core.selfplay.rollout import Question, ResponderGroup, Sample, VerifierGroup

    def sample(text=""):
        return Sample([1], [0.0], text)

    long_question = "Which character says 'To be, or not to be' and in which act of the play does this happen, exactly?"
    good = Question("s0r0q0", "doc_qa", "hamlet", ("hamlet",), [1], sample(), Status.OK,
                    task=Task("doc_qa", long_question, "Hamlet"), reward=0.61)
    good.responder = ResponderGroup("s0r0q0", [1], [sample()] * 4, ["Hamlet", None, "Horatio", "Hamlet"],
                                    [1.0, 0.0, 0.0, 1.0], [None] * 4, [1.0, 0.0, 0.0, 1.0])
    good.verifiers = [VerifierGroup("s0r0q0", 1, [1], [sample()] * 4, [True, True, False, None], 1, 0.0,
                                    [1, 1, 0, -1]),
                      VerifierGroup("s0r0q0", 2, [1], [sample()] * 4, [False] * 4, 0, 0.0, [1] * 4)]
    bad = Question("s0r0q1", "doc_mc", "sonnets", ("sonnets",), [1], sample("I cannot write\na question"),
                   Status.BAD_FORMAT, reason="no JSON object found")
    monitor = Monitor(tmp_path, 1, bars=False, plot=False)
    monitor.log_questions(1, [good, bad])
    lines = capsys.readouterr().out.splitlines()
    # agreement over the parsable judgments (as released, docs/fidelity.md): (2 of 3 agree with YES
    # + 4 of 4 with NO) / 2 judged answers = 0.83
    assert lines == [
        "  s0r0q0 doc_qa   ok         | \"Which character says 'To be, or not to be' and in which act of the pl...\" | "
        "R 2/4 rewarded (1 unparsable) | V 2 judged, agreement 0.83 | Q reward 0.61",
        "  s0r0q1 doc_mc   bad_format | 'I cannot write a question' | no JSON object found",
    ]
    assert len((tmp_path / "questions.jsonl").read_text().splitlines()) == 2
