"""`--report-to tensorboard,wandb`: each step's metrics and questions, also sent to TensorBoard
and/or Weights & Biases (metrics.jsonl and questions.jsonl stay the source of truth).

Every number of a metrics.jsonl line is a scalar under its own name, in a section named after
its kind: `reward/reward_responder`, `train/train_loss`, `time/step_time_s`,
`tokens/tokens_generated`, `gpu/gpu_power_w`, `eval/...`, and `selfplay/...` for the counts of
the step (questions, groups, trajectories). Booleans are 0/1, a list is one scalar per entry
(`reward/pass_rate_histogram/0`, ...); None and strings are left out. The step's questions
are a text panel (TensorBoard) or a table (W&B) named `questions`.

TensorBoard writes `<out>/tensorboard`; a resumed run purges the steps after its checkpoint,
so the redone steps are not shown twice. W&B writes `<out>/wandb`, offline when WANDB_MODE says
so or when no API key is set (never a login prompt); a resumed run continues the same W&B run
(id kept in `<out>/wandb_run.json`). W&B takes each step once and cannot rewind an offline run:
a step redone after a resume keeps the values first sent, and the run says so when it resumes
(metrics.jsonl and TensorBoard hold the redone values).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import uuid
from pathlib import Path

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # reporter -> package it needs (and its extra)
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb_run.json"
QUESTION_COLUMNS = ("id", "task_type", "cluster", "status", "question", "answer", "questioner_reward",
                    "responder_rewards")


class ReporterError(ValueError):
    """A reporter that cannot be used; the message says what to install or change."""


def parse_report_to(text: str) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "none" -> (). Checks that the packages
    are installed, so a missing one stops the run before the model loads."""
    names = [name.strip().lower() for name in str(text).split(",") if name.strip()]
    if names == ["none"] or not names:
        return ()
    if "none" in names:
        raise ReporterError(f"--report-to {text}: 'none' cannot be combined with a reporter")
    unknown = [name for name in names if name not in EXTRAS]
    if unknown:
        raise ReporterError(f"--report-to: unknown reporter {unknown[0]!r}; use tensorboard, wandb (comma-separated, "
                            "several at once) or none")
    for name in dict.fromkeys(names):
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise ReporterError(f"--report-to {name} needs the {EXTRAS[name]!r} package: "
                                f"pip install 'spell[{EXTRAS[name]}]'")
    return tuple(dict.fromkeys(names))


def section(key: str) -> str:
    """The section a metrics.jsonl key is shown in."""
    if key.startswith("gpu_"):
        return "gpu"
    if key.startswith("eval_"):
        return "eval"
    if key.startswith("time_") or key.endswith("time_s"):
        return "time"
    if key.startswith(("tokens_", "train_tokens_")):
        return "tokens"
    if key.startswith("reward_") or key == "pass_rate_histogram":
        return "reward"
    if key.startswith("train_"):
        return "train"
    return "selfplay"


def scalars(record: dict) -> dict[str, float]:
    """Tag -> value for every number of one metrics.jsonl line (the step itself excepted)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        tag = f"{section(key)}/{key}"
        if isinstance(value, (list, tuple)):
            out.update({f"{tag}/{i}": float(v) for i, v in enumerate(value) if _is_number(v)})
        elif _is_number(value):
            out[tag] = float(value)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value))


def question_rows(records: list[dict]) -> list[list]:
    """One row per question (QUESTION_COLUMNS), as strings, numbers or None."""
    rows = []
    for record in records:
        row = [record.get(column) for column in QUESTION_COLUMNS]
        rows.append([json.dumps(v) if isinstance(v, (list, dict)) else v for v in row])
    return rows


def open_reporters(names, out_dir, *, resume_step: int | None = None, config: dict | None = None) -> list:
    classes = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [classes[name](out_dir, resume_step=resume_step, config=config) for name in names]


class TensorBoardReporter:
    def __init__(self, out_dir, *, resume_step: int | None = None, config: dict | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ReporterError("--report-to tensorboard needs the 'tensorboard' package: "
                                "pip install 'spell[tensorboard]'") from None
        self.dir = Path(out_dir) / TENSORBOARD_DIR
        if resume_step is None and self.dir.exists():  # a fresh run in an old folder, as metrics.jsonl
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step: readers drop what earlier sessions wrote for the steps this one redoes
        self.writer = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)
        if config is not None and resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, record: dict, questions: list[dict]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if questions:
            self.writer.add_text("questions", _markdown_table(questions), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _markdown_table(questions: list[dict]) -> str:
    def cell(value) -> str:
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(QUESTION_COLUMNS) + " |", "|" + "---|" * len(QUESTION_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in question_rows(questions)]
    return "\n".join(lines)


class WandbReporter:
    def __init__(self, out_dir, *, resume_step: int | None = None, config: dict | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        try:
            import wandb
        except ImportError:
            raise ReporterError("--report-to wandb needs the 'wandb' package: pip install 'spell[wandb]'") from None
        self.out = Path(out_dir)
        self.state_path = self.out / WANDB_RUN_FILE
        state = {}
        if resume_step is not None and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        self.run_id = state.get("id") or uuid.uuid4().hex[:12]
        self.last_step = int(state.get("last_step", 0))
        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "spell"), id=self.run_id, resume="allow", dir=str(self.out),
            mode=mode, config=config, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, init_timeout=120, disable_git=True, save_code=False,
                                    x_disable_stats=True, x_disable_meta=True))  # gpu/ metrics come from the monitor
        self.mode = mode
        self._save_state()
        if resume_step is not None and self.last_step > resume_step:
            print(redone_steps_note(self.run_id, resume_step, self.last_step), file=sys.stderr)

    def log(self, step: int, record: dict, questions: list[dict]) -> None:
        if step <= self.last_step:  # redone after a resume: W&B already has this step
            return
        import wandb

        data = dict(scalars(record))
        if questions:
            data["questions"] = wandb.Table(columns=list(QUESTION_COLUMNS), data=question_rows(questions))
        self.run.log(data, step=step)
        self.last_step = step
        self._save_state()

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits until the run file is written (finish alone returns before)

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(json.dumps({"id": self.run_id, "last_step": self.last_step, "mode": self.mode}) + "\n")
        os.replace(tmp, self.state_path)


def redone_steps_note(run_id: str, resume_step: int, last_step: int) -> str:
    """What a resumed run tells the user when W&B already holds steps it will redo."""
    steps = f"step {last_step}" if last_step == resume_step + 1 else f"steps {resume_step + 1}-{last_step}"
    return (f"spell: note: W&B run {run_id} already holds {steps} from before the checkpoint of step {resume_step}; "
            f"W&B takes a step once, so it keeps those first values while metrics.jsonl and TensorBoard get the "
            f"redone {steps}; W&B's new values start at step {last_step + 1}")


def _has_wandb_key() -> bool:
    """An API key in WANDB_API_KEY or ~/.netrc (as `wandb login` stores it), looked up without
    asking anyone."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
