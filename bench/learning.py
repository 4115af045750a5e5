"""Does self-play make the model better? Held-out pass@k before and after K self-play steps (issue 21).

    python bench/learning.py --out runs/learning [--steps K] [--lr LR] [--questions Q] ...
    (make learning ARGS="--out runs/learning --steps K")

1. evaluates the model (default: the engine's default) on the held-out set
   (bench/heldout/wonderland.jsonl; `--eval-data FILE` adds any benchmark-format file, each
   scored the same way before and after): greedy (n = 1, temperature 0) and sampled (n =
   `--eval-n`, temperature `--eval-temperature`), with `python -m spell_core.eval`;
2. runs K steps of `python -m spell_core.run` with `--eval-data` validation on the held-out set
   (or `--val-items` of it) at step 0 and every `--val-every` steps, `--val-n` samples each, its
   pass@k in the run's metrics.jsonl; validation answers are as long as the run's responses
   (`--max-new-tokens`), so its curve and the before/after numbers are two protocols;
3. evaluates the final checkpoint the same way, and compares each pair with
   `python -m spell_core.eval --compare` (paired bootstrap 95 % interval);
4. prints the final checkpoint's path; `bench/learning_report.py OUT` then draws the curves and
   writes the before/after table.

The folder OUT holds everything:
    learning.json        the settings, every command run, its time, the comparisons
    data/                the evaluation files used (a subset with --eval-items)
    eval/<data>-<mode>/  before.json, after.json (spell_core.eval results; mode: greedy or sampled),
                         compare.txt (the --compare table) and compare.png
    logs/                every command's output
    run/                 the self-play run folder (metrics.jsonl, questions.jsonl, checkpoints/)

An OUT that holds files is never overwritten: --overwrite moves it aside whole first
(OUT.replaced-DATE-TIME), the engine's rule for run folders.

`--budget-minutes M` estimates the whole experiment before starting (seconds per evaluation
question and minutes per step: the defaults below, measured on the 2-core machine, or the
`--eval-seconds-per-question` / `--step-minutes` you give) and refuses a plan that does not fit,
naming the largest K that does; after the first evaluation it re-estimates with the measured
speed and lowers K to fit (said loudly) rather than overrun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from spell_core.cli import arg_types

HERE = Path(__file__).resolve().parent
POSITIVE, COUNT = arg_types.count(1), arg_types.count(0)
DEFAULT_HELDOUT = HERE / "heldout" / "wonderland.jsonl"
# Costs of the default model on the 2-core machine, to plan a run before anything is measured.
# An evaluation question is prefill-bound (its ~1.6k-token document): 26 s greedy, 40-45 s with
# 4 samples at T = 0.7 (idle machine, 2 threads, 2026-12-07; bench/results/learning.md), so 33 s
# a question and mode on average; the n samples of a question share its prefill. A self-play
# step at the CPU defaults (8 questions, G = 4): 9.4 min for the first, 3.5-5 min once answers
# are brief (3-step sweeps at 5e-6 and 2e-6): 5.5 min on average, scaled linearly with --questions.
EVAL_SECONDS_PER_QUESTION = 33.0
STEP_MINUTES = 5.5
STEP_QUESTIONS = 8


class LearningError(ValueError):
    """Bad options or inputs; the message names the option and what to do."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/learning.py",
                                description="held-out pass@k before and after K self-play steps (issue 21)")
    p.add_argument("--out", required=True, help="experiment folder (see the module docstring)")
    p.add_argument("--overwrite", action="store_true",
                   help="an --out that holds files is moved aside whole (OUT.replaced-DATE-TIME) first")
    p.add_argument("--model", default=None, help="starting model (default: the engine's default)")
    p.add_argument("--heldout", default=str(DEFAULT_HELDOUT),
                   help=f"the held-out file, also the run's validation data (default: {DEFAULT_HELDOUT})")
    p.add_argument("--eval-data", action="append", default=[], metavar="FILE",
                   help="another benchmark-format file to score before and after (repeatable)")
    p.add_argument("--eval-items", type=POSITIVE, default=None,
                   help="use only this many questions of each evaluation file, taken in turn from each task "
                        "type and rule and spread over the file (JSON Lines files) (default: all)")
    p.add_argument("--eval-n", type=POSITIVE, default=4, help="samples per question, sampled mode (default: 4)")
    p.add_argument("--eval-temperature", type=float, default=0.7, help="sampled mode temperature (default: 0.7)")
    p.add_argument("--eval-max-new-tokens", type=POSITIVE, default=512,
                   help="answer length of the before/after evaluations (default: 512)")
    p.add_argument("--no-sampled", action="store_true", help="greedy evaluation only (no n-sample pass)")
    p.add_argument("--steps", type=COUNT, default=10, help="K: self-play steps (default: 10)")
    p.add_argument("--lr", default=None, help="learning rate (default: the engine's, 2e-6)")
    p.add_argument("--questions", type=POSITIVE, default=None, help="questions per round (default: the engine's CPU "
                                                                     "default, 8)")
    p.add_argument("--group-size", type=POSITIVE, default=None, help="G (default: the engine's CPU default, 4)")
    p.add_argument("--kept-groups", type=POSITIVE, default=None, help="N kept groups (default: the engine's)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=None, help="the run's response length (default: "
                                                                          "the engine's CPU default, 160)")
    p.add_argument("--val-every", type=POSITIVE, default=2, help="steps between validations during the run "
                                                                  "(default: 2)")
    p.add_argument("--val-n", type=POSITIVE, default=1, help="samples per question in validation (default: 1)")
    p.add_argument("--val-items", type=POSITIVE, default=None,
                   help="validation questions (a subset of the held-out file, as --eval-items) (default: those "
                        "of the evaluation)")
    p.add_argument("--seed", type=int, default=3, help="seed of the run and the evaluations (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every command (default: each "
                                                              "command's own)")
    p.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for spell_core.run, e.g. --run-arg=--ctx=1024 (repeatable)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="refuse a plan estimated to take longer; lower K after the first evaluation if needed")
    p.add_argument("--eval-seconds-per-question", type=float, default=EVAL_SECONDS_PER_QUESTION,
                   help=f"planning cost of one question in one evaluation (default: {EVAL_SECONDS_PER_QUESTION})")
    p.add_argument("--step-minutes", type=float, default=STEP_MINUTES,
                   help=f"planning guess per step at {STEP_QUESTIONS} questions (default: {STEP_MINUTES})")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    return p


# --- data ----------------------------------------------------------------------------------

def balanced_subset(lines: list[str], count: int) -> list[str]:
    """`count` JSON lines taken in turn from each task type, and within a type from each of its
    rules where the items name one (the held-out set's copy and speaker questions are both
    doc_qa), kinds in first-seen order: a small subset still covers every kind. Within a kind the
    picks are spread evenly over its items, not its first ones: the held-out set runs through the
    book in order, and its first speaker questions all come from chapters where only Alice speaks."""
    kinds: dict[tuple[str, str], list[str]] = defaultdict(list)
    for line in lines:
        item = json.loads(line)
        kinds[item.get("type", ""), item.get("rule", "")].append(line)
    items = list(kinds.values())
    quotas = [0] * len(items)
    while sum(quotas) < count and any(q < len(kind) for q, kind in zip(quotas, items)):
        for i, kind in enumerate(items):
            if quotas[i] < len(kind) and sum(quotas) < count:
                quotas[i] += 1
    picks = [[kind[(2 * j + 1) * len(kind) // (2 * quota)] for j in range(quota)]
             for kind, quota in zip(items, quotas)]
    return [pick[j] for j in range(max(quotas, default=0)) for pick in picks if j < len(pick)]


def prepare_data(path: str, count: int | None, folder: Path, name: str) -> Path:
    """The evaluation file: `path` itself, or its balanced subset written under `folder`."""
    source = Path(path)
    if not source.is_file():
        raise LearningError(f"{path}: no such file (--heldout / --eval-data take a benchmark file that "
                            "python -m spell_core.eval reads)")
    if count is None:
        return source
    if source.suffix.lower() != ".jsonl":
        raise LearningError(f"{path}: --eval-items / --val-items take subsets of JSON Lines files only; pass the "
                            "whole file (leave the option out) or a .jsonl")
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.jsonl"
    target.write_text("".join(line + "\n" for line in balanced_subset(lines, count)))
    return target


def count_questions(path: Path, subset: int | None = None) -> int:
    """Questions in an evaluation file, or in its `subset` (what --dry-run plans without writing it)."""
    from spell_core.evaluation.benchmarks import load_eval_data

    total = len(load_eval_data(path))
    return total if subset is None else min(total, subset)


# --- the plan ------------------------------------------------------------------------------

def eval_modes(args) -> list[tuple[str, list[str]]]:
    modes = [("greedy", ["--n", "1", "--k", "1", "--temperature", "0"])]
    if not args.no_sampled:
        ks = "1" if args.eval_n == 1 else f"1,{args.eval_n}"
        modes.append(("sampled", ["--n", str(args.eval_n), "--k", ks, "--temperature", str(args.eval_temperature)]))
    return modes


def eval_command(args, data: Path, model: str | None, mode_args: list[str], out: Path) -> list[str]:
    command = [sys.executable, "-m", "spell_core.eval", "--data", str(data), "--out", str(out), *mode_args,
               "--max-new-tokens", str(args.eval_max_new_tokens), "--seed", str(args.seed), "--no-progress"]
    if model:
        command += ["--model", model]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return command


def run_command(args, folder: Path, steps: int, validation: Path) -> list[str]:
    command = [sys.executable, "-m", "spell_core.run", "--out", str(folder), "--steps", str(steps),
               "--seed", str(args.seed), "--save-every", str(max(steps, 1)), "--eval-data", str(validation),
               "--eval-every", str(args.val_every), "--eval-n", str(args.val_n), "--no-progress"]
    for option in ("model", "lr", "questions", "group_size", "kept_groups", "max_new_tokens", "threads"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    return command + list(args.run_arg)


def estimate_minutes(args, eval_questions: int, val_questions: int, steps: int, seconds_per_question: float) -> dict:
    evaluation = 2 * eval_questions * len(eval_modes(args)) * seconds_per_question / 60
    validations = (steps // args.val_every + 1) * val_questions * seconds_per_question / 60
    training = steps * args.step_minutes * (args.questions or STEP_QUESTIONS) / STEP_QUESTIONS
    return {"evaluations": evaluation, "validations": validations, "steps": training,
            "total": evaluation + validations + training}


def steps_that_fit(args, eval_questions: int, val_questions: int, seconds_per_question: float, budget: float,
                   spent: float = 0.0) -> int:
    steps = 0
    while estimate_minutes(args, eval_questions, val_questions, steps + 1, seconds_per_question)["total"] + spent \
            <= budget and steps < 10_000:
        steps += 1
    return steps


# --- running -------------------------------------------------------------------------------

def run_logged(command: list[str], log: Path, record: list) -> float:
    """Run a command, its output to the console and to `log`; its seconds. Its wall and CPU seconds and
    peak resident set go into `record`. A failure stops the experiment with the command and the log named."""
    print("$ " + " ".join(command), flush=True)
    began = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            f.write(line)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak resident set and CPU time
        process.returncode = code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    record.append({"command": command, "seconds": round(seconds, 1), "log": str(log), "exit": code,
                   "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # kB on Linux
                   "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)})
    if code != 0:
        raise LearningError(f"{command[2]} failed (exit {code}); its output is in {log}")
    return seconds


def claim_folder(out: Path, overwrite: bool) -> None:
    from spell_core.cli.run_folder import archive

    if out.exists() and not out.is_dir():
        raise LearningError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LearningError(f"--out {out} holds an earlier experiment; pass --overwrite to move it aside "
                                "(OUT.replaced-DATE-TIME) or another --out")
        print(f"--overwrite: the earlier {out} moved to {archive(out)}")
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except LearningError as err:
        print(f"learning: error: {err}", file=sys.stderr)
        return 1


def _main(args) -> int:
    out = Path(args.out)
    if not args.dry_run:
        claim_folder(out, args.overwrite)
    data_folder = out / "data"
    files = [("heldout", args.heldout)] + [(Path(p).stem, p) for p in args.eval_data]
    names = [name for name, _ in files]
    if len(set(names)) != len(names) or "validation" in names:
        raise LearningError(f"evaluation files need distinct names other than 'validation' ({', '.join(names)}): "
                            "rename one")
    if args.dry_run:
        data = {name: Path(path) for name, path in files}
        validation = Path(args.heldout)
    else:
        data = {name: prepare_data(path, args.eval_items, data_folder, name) for name, path in files}
        val_items = args.val_items or args.eval_items
        validation = prepare_data(args.heldout, val_items, data_folder, "validation")
    eval_questions = sum(count_questions(p, args.eval_items if args.dry_run else None) for p in data.values())
    val_questions = count_questions(validation, (args.val_items or args.eval_items) if args.dry_run else None)
    plan = estimate_minutes(args, eval_questions, val_questions, args.steps, args.eval_seconds_per_question)
    print(f"plan: {eval_questions} evaluation questions x {len(eval_modes(args))} modes, before and after; "
          f"{args.steps} steps with {val_questions} validation questions every {args.val_every}; estimated "
          f"{plan['total']:.0f} min ({plan['evaluations']:.0f} evaluation, {plan['validations']:.0f} validation, "
          f"{plan['steps']:.0f} steps)")
    if args.budget_minutes is not None and plan["total"] > args.budget_minutes:
        fit = steps_that_fit(args, eval_questions, val_questions, args.eval_seconds_per_question, args.budget_minutes)
        raise LearningError(f"the plan needs ~{plan['total']:.0f} min, over --budget-minutes {args.budget_minutes:g}; "
                            f"--steps {fit} fits (or fewer --eval-items, a larger --val-every)")
    if args.dry_run:
        return 0
    record = {"settings": vars(args), "data": {k: str(v) for k, v in data.items()}, "validation": str(validation),
              "plan_minutes": plan, "commands": []}
    commands = record["commands"]
    began = time.perf_counter()
    save_record(out, record)  # rewritten after each phase: a failed experiment still says what ran
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    eval_seconds = evaluate_all(args, data, args.model, out / "eval", "before", logs, commands)
    measured = eval_seconds / max(eval_questions * len(eval_modes(args)), 1)  # model loads included
    record["eval_seconds_per_question"] = round(measured, 2)
    steps = args.steps
    if args.budget_minutes is not None:
        spent = (time.perf_counter() - began) / 60
        fit = steps_that_fit(args, eval_questions, val_questions, measured, args.budget_minutes, spent - plan_eval_half(
            args, eval_questions, measured))
        if fit < steps:
            print(f"learning: WARNING: measured {measured:.1f} s per evaluation question; only {fit} of {steps} steps "
                  f"fit --budget-minutes {args.budget_minutes:g}: running {fit}", file=sys.stderr, flush=True)
            steps = fit
    record["steps"] = steps
    save_record(out, record)
    run_folder = out / "run"
    final = None
    if steps:
        from spell_core.training.train_state import find_latest

        run_logged(run_command(args, run_folder, steps, validation), logs / "run.log", commands)
        final = find_latest(run_folder)
    model_after = str(final) if final is not None else args.model
    record["final_checkpoint"] = str(final) if final is not None else None
    save_record(out, record)
    evaluate_all(args, data, model_after, out / "eval", "after", logs, commands)
    record["comparisons"] = compare_all(args, data, out, logs, commands)
    record["minutes"] = round((time.perf_counter() - began) / 60, 2)
    save_record(out, record)
    print(f"\nfinal checkpoint: {final if final is not None else '(no step ran: the starting model)'}")
    print(f"experiment folder: {out} ({record['minutes']:.1f} min); report: python bench/learning_report.py {out}")
    return 0


def save_record(out: Path, record: dict) -> None:
    (out / "learning.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


def plan_eval_half(args, eval_questions: int, seconds_per_question: float) -> float:
    """Minutes of one side (before or after) of the evaluations: the estimate counts both, and
    the 'before' side has been spent already."""
    return estimate_minutes(args, eval_questions, 0, 0, seconds_per_question)["evaluations"] / 2


def evaluate_all(args, data: dict[str, Path], model: str | None, folder: Path, side: str, logs: Path,
                 commands: list) -> float:
    """Every file in every mode, results in folder/<data>-<mode>/<side>.json; the seconds taken."""
    seconds = 0.0
    for name, path in data.items():
        for mode, mode_args in eval_modes(args):
            (folder / f"{name}-{mode}").mkdir(parents=True, exist_ok=True)
            result = folder / f"{name}-{mode}" / f"{side}.json"
            seconds += run_logged(eval_command(args, path, model, mode_args, result),
                                  logs / f"eval-{name}-{mode}-{side}.log", commands)
    return seconds


def compare_all(args, data: dict[str, Path], out: Path, logs: Path, commands: list) -> dict:
    """`spell_core.eval --compare before.json after.json` for every file and mode (its table in
    compare.txt, its plot compare.png); the numbers themselves, from the same function, for the
    report."""
    from spell_core.evaluation.compare import compare, load_results

    found = {}
    for name in data:
        for mode, _ in eval_modes(args):
            folder = out / "eval" / f"{name}-{mode}"
            before, after = folder / "before.json", folder / "after.json"
            run_logged([sys.executable, "-m", "spell_core.eval", "--compare", str(before), str(after), "--out",
                        str(folder / "compare.png")], folder / "compare.txt", commands)
            found[f"{name}-{mode}"] = compare(load_results(before), load_results(after), names=("before", "after"))
    return found


if __name__ == "__main__":
    sys.exit(main())
