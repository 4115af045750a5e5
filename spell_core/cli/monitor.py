"""What the user sees during a run: a progress bar per stage, one summary line per step,
`metrics.jsonl` and `metrics.png` in the run folder, GPU telemetry when there is a GPU.

    monitor = Monitor(out_dir, total_steps)
    with monitor.stage("responder", prompts=4, samples=32) as hook: generate(..., progress=hook)
    line = monitor.log_step(metrics)     # prints the summary, appends metrics.jsonl, redraws the plot
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from spell_core.cli.metrics_plot import plot_metrics
from spell_core.common.progress import progress_bar

METRICS_FILE = "metrics.jsonl"
QUESTIONS_FILE = "questions.jsonl"
PLOT_FILE = "metrics.png"
ROLES = ("questioner", "responder", "verifier")
# time_<name>_s metrics shown in the step line: generation stages (loop.py), then the update
STAGE_NAMES = (("Q", "questioner"), ("ground", "grounding"), ("R", "responder"), ("ground+R", "ground_respond"),
               ("V", "verifier"), ("update", "update"))


class GpuTelemetry:
    """Memory, utilisation and power of the current GPU through nvidia-ml-py. An empty dict
    without a GPU (silently), and on a GPU when the library is missing or NVML fails: then the
    reason is written once to `stream` (stderr), not at every step."""

    KEYS = ("gpu_memory_used_gib", "gpu_memory_total_gib", "gpu_utilization_pct", "gpu_power_w")

    def __init__(self, device_index: int | None = None, stream=None):
        self._handle = None
        self._stream = stream
        self._said = False
        try:
            import torch
            if not torch.cuda.is_available():
                return
        except Exception:
            return
        try:
            import pynvml
        except ImportError as err:
            self._say_once(f"pynvml cannot be imported ({err}); install nvidia-ml-py")
            return
        try:
            pynvml.nvmlInit()
            index = torch.cuda.current_device() if device_index is None else device_index
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as err:  # pynvml.NVMLError (no driver, no permission), ...: telemetry is optional
            self._handle = None
            self._say_once(f"NVML failed to start: {type(err).__name__}: {err}")

    def _say_once(self, why: str) -> None:
        if self._said:
            return
        self._said = True
        print(f"spell: no GPU telemetry in metrics.jsonl ({', '.join(self.KEYS)}): {why}",
              file=self._stream or sys.stderr, flush=True)

    def sample(self) -> dict:
        if self._handle is None:
            return {}
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
            util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            power = nvml.nvmlDeviceGetPowerUsage(self._handle)  # milliwatts
        except Exception as err:
            self._say_once(f"reading NVML failed: {type(err).__name__}: {err}")
            return {}
        return {"gpu_memory_used_gib": memory.used / 2**30, "gpu_memory_total_gib": memory.total / 2**30,
                "gpu_utilization_pct": float(util.gpu), "gpu_power_w": power / 1000.0}


class Monitor:
    def __init__(self, out_dir, total_steps: int, *, bars: bool = True, stream=None, plot: bool = True,
                 resume_step: int | None = None, report_to=(), config: dict | None = None):
        """resume_step: continuing a run from this step: metrics.jsonl keeps the lines of
        steps <= resume_step (a later line belongs to steps that are being redone).
        report_to: also send each step to these reporters ("tensorboard", "wandb";
        spell_core/cli/reporters.py); call close() at the end of the run."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.bars, self.plot_enabled = bars, plot
        self.stream = stream or sys.stderr
        self.telemetry = GpuTelemetry(stream=self.stream)
        self.history: list[dict] = []
        path = self.out / METRICS_FILE
        if resume_step is not None and path.exists():
            kept = _read_records(path, self.stream)
            self.history = [m for m in kept if m.get("step", 0) <= resume_step]
            _write_atomic(path, "".join(json.dumps(m) + "\n" for m in self.history))
            questions = self.out / QUESTIONS_FILE
            if questions.exists():
                kept = [q for q in _read_records(questions, self.stream) if q.get("step", 0) <= resume_step]
                _write_atomic(questions, "".join(json.dumps(q) + "\n" for q in kept))
        elif resume_step is None:
            for name in (METRICS_FILE, QUESTIONS_FILE):  # a fresh run in an old folder starts fresh logs
                (self.out / name).unlink(missing_ok=True)
        self._step_questions: list[dict] = []
        self.reporters = []
        if report_to:
            from spell_core.cli.reporters import open_reporters
            self.reporters = open_reporters(report_to, self.out, resume_step=resume_step, config=config)

    # --- progress bars ------------------------------------------------------------------

    def stage(self, name: str, prompts: int, samples: int):
        """A bar of generated tokens for one generation stage; yields the sampler's progress hook."""
        return progress_bar(name, prompts, samples, enabled=self.bars, stream=self.stream)

    @contextlib.contextmanager
    def update(self, trajectories: int):
        """A bar for the optimizer step (one tick when it is done)."""
        if not self.bars:
            yield
            return
        from tqdm import tqdm

        bar = tqdm(total=1, desc=f"{'update':<10}", unit="step", leave=False, file=self.stream,
                   postfix=f"{trajectories} trajectories", dynamic_ncols=True)
        try:
            yield
            bar.update(1)
        finally:
            bar.close()

    # --- after each step ----------------------------------------------------------------

    def log_questions(self, step: int, questions) -> None:
        """Append what became of every question of the step to questions.jsonl (the texts the
        model wrote are the first thing to read when rewards stay flat)."""
        records = [json.loads(json.dumps(question_record(step, q), default=_jsonable)) for q in questions]
        with open(self.out / QUESTIONS_FILE, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        self._step_questions = records  # sent to the reporters with the step's metrics
        for q in questions:
            print(question_line(q), file=sys.stdout, flush=True)

    def log_step(self, metrics: dict) -> str:
        """Print the step's summary line, append its metrics (plus GPU telemetry) to
        metrics.jsonl and redraw the plot. Returns the summary line."""
        record = {**metrics, **self.telemetry.sample()}
        self.history.append(record)
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        line = summary_line(record, self.total_steps)
        print(line, file=sys.stdout, flush=True)
        if self.plot_enabled:
            plot_metrics(self.history, self.out / PLOT_FILE)
        questions = [q for q in self._step_questions if q["step"] == record.get("step")]
        for reporter in self.reporters:
            reporter.log(record["step"], json.loads(json.dumps(record, default=_jsonable)), questions)
        self._step_questions = []
        return line

    def close(self) -> None:
        """Flush and close the reporters (TensorBoard files, the W&B run)."""
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def question_record(step: int, q) -> dict:
    """One question of a step (`spell_core.selfplay.rollout.Question`) as a JSON-able dict."""
    record = {"step": step, "id": q.id, "task_type": q.task_type, "cluster": q.cluster_id, "status": str(q.status),
              "reason": q.reason, "questioner_reward": q.reward, "questioner_output": q.sample.text}
    if q.task is not None:
        record.update(question=q.task.question, answer=q.task.answer, options=q.task.options)
    if q.responder is not None:
        record.update(responder_answers=q.responder.answers, rule_rewards=q.responder.rule_rewards,
                      verifier_majorities=q.responder.majorities, responder_rewards=q.responder.rewards)
    return record


QUESTION_WIDTH = 72  # characters of the question text shown in a question line


def question_line(q) -> str:
    """One question of a step for the console: its status, its text (truncated), how the
    responders fared (rewarded answers of G, answers the rule could not parse), how the
    verifiers agreed, and the questioner's reward."""
    text = (q.task.question if q.task is not None else q.sample.text).replace("\n", " ").strip()
    if len(text) > QUESTION_WIDTH:
        text = text[: QUESTION_WIDTH - 3].rstrip() + "..."
    parts = [f"  {q.id:<6} {q.task_type:<8} {str(q.status):<10}", repr(text) if text else "(empty)"]
    if q.responder is not None:
        rewards, answers = q.responder.rewards, q.responder.answers
        unparsed = sum(a is None for a in answers)
        parts.append(f"R {sum(r > 0 for r in rewards)}/{len(rewards)} rewarded"
                     + (f" ({unparsed} unparsable)" if unparsed else ""))
    if q.verifiers:
        agreement = sum(v.agreement for v in q.verifiers) / len(q.verifiers)
        parts.append(f"V {len(q.verifiers)} judged, agreement {agreement:.2f}")
    if q.reward is not None:
        parts.append(f"Q reward {q.reward:.2f}")
    elif q.reason:
        parts.append(q.reason[:60])
    return " | ".join(parts)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _kilo(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def summary_line(m: dict, total_steps: int | None = None) -> str:
    """One line per step: rewards per role, the question pass-rate histogram (number of
    responder groups with k of G answers rewarded, k = 0..G), kept groups, question
    outcomes, tokens generated and trained, step time."""
    step = f"step {m['step']}" + (f"/{total_steps}" if total_steps else "")
    rewards = " ".join(f"{role[0].upper()} {_fmt(m.get(f'reward_{role}'))}" for role in ROLES)
    hist = " ".join(str(c) for c in m.get("pass_rate_histogram", []))
    trained = m.get("train_tokens_trained", m.get("tokens_to_train", 0))
    parts = [
        step,
        f"reward {rewards}",
        f"pass@G hist [{hist}]",
        f"kept {m.get('kept_groups', 0)}/{m.get('responder_groups', 0)} groups",
        f"questions {m.get('questions', 0)} (bad_format {m.get('questions_bad_format', 0)}, "
        f"bad_ground {m.get('questions_bad_ground', 0)}, discarded {m.get('questions_discarded', 0)})",
        f"traj Q/R/V {m.get('trajectories_questioner', 0)}/{m.get('trajectories_responder', 0)}/"
        f"{m.get('trajectories_verifier', 0)}",
        f"tokens gen {_kilo(m.get('tokens_generated', 0))} trained {_kilo(trained)}",
    ]
    stages = [(short, m[f"time_{name}_s"]) for short, name in STAGE_NAMES if m.get(f"time_{name}_s")]  # those that ran
    if stages:
        parts.append("time " + " ".join(f"{short} {seconds:.0f}" for short, seconds in stages) + " s")
    cpu = f" (cpu {m['step_cpu_s']:.1f} s)" if "step_cpu_s" in m else ""  # below the wall time on a busy machine
    parts.append(f"{m.get('step_time_s', 0.0):.1f} s{cpu}")
    load = [(who, m.get(key)) for who, key in (("sample", "expert_load_imbalance"),
                                               ("train", "train_expert_load_imbalance")) if m.get(key) is not None]
    if load:  # MoE models: the busiest expert's load over the mean, worst layer
        parts.append("experts max/mean " + " ".join(f"{who} {value:.1f}" for who, value in load))
    if m.get("train_skipped"):
        parts.append(f"update skipped: {m.get('train_skip_reason')}")
    if "gpu_memory_used_gib" in m:
        parts.append(f"gpu {m['gpu_memory_used_gib']:.1f} GiB {m['gpu_utilization_pct']:.0f}% "
                     f"{m['gpu_power_w']:.0f} W")
    return " | ".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_records(path: Path, stream) -> list[dict]:
    """The JSON lines of a log being resumed. A last line cut short by a kill is dropped (and said);
    a bad line elsewhere is an error naming file and line."""
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if all(not rest.strip() for rest in lines[number:]):
                print(f"spell: {path}: dropped its last line, cut short by an interrupted write ({err}); that "
                      "step's record is rewritten when the step is redone", file=stream)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({err}); fix or delete that line, then "
                             "--resume again") from err
    return records
