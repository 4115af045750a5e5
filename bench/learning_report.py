"""The report of a finished `bench/learning.py` experiment, and the format-health table of a sweep.

    python bench/learning_report.py OUT [--png FILE] [--md FILE]
        curves (OUT/learning.png): reward per role, pass@G histogram, question format health,
        held-out pass@k per validation; and the before/after table (paired bootstrap 95 %
        intervals, recomputed from OUT/eval/*/before.json and after.json by spell_core's
        `compare`) as a Markdown section for bench/results/learning.md (printed, or --md FILE).
        The conclusion sentence is left to whoever reads the numbers.

    python bench/learning_report.py --sweep RUN [RUN ...] [--md FILE]
        per step of each run (an experiment folder or a `spell_core.run` folder): lr, format health
        (bad_format share of the questions, responder answers the rule could parse, judged answers
        whose verifier majority was a verdict, tokens generated) beside the rewards and the number
        of trajectories per role; the pilot in issue 21 broke the roles' formats at lr 1e-5 within
        5 steps, so a sweep is read for that first.

Format health, from the run's metrics.jsonl and questions.jsonl:
    bad_format      questions_bad_format / questions (metrics.jsonl)
    R parsed        responder answers with an extracted answer / all responder answers
    V verdict       judged answers (a parsed responder answer) whose verifier majority is YES or NO,
                    not unparsable / judged answers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROLES = ("questioner", "responder", "verifier")


class ReportError(ValueError):
    """A folder that is not a finished experiment or run; the message says what is missing."""


# --- reading -------------------------------------------------------------------------------

def run_folder(folder: Path) -> Path:
    """The spell_core.run folder: FOLDER/run of an experiment, or FOLDER itself."""
    for candidate in (folder / "run", folder):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    raise ReportError(f"{folder}: no metrics.jsonl (in it or in {folder / 'run'}); pass a bench/learning.py "
                      "experiment folder or a spell_core.run --out folder")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_steps(history: list[dict]) -> list[dict]:
    """metrics.jsonl lines of training steps (not the step-0 validation line)."""
    return [m for m in history if "questions" in m]


def format_health(metrics: dict, questions: list[dict]) -> dict:
    """The step's format health (module docstring) from its metrics line and its questions."""
    step = [q for q in questions if q.get("step") == metrics["step"]]
    answers = [a for q in step for a in (q.get("responder_answers") or [])]
    judged = [(a, m) for q in step for a, m in zip(q.get("responder_answers") or [], q.get("verifier_majorities") or [])
              if a is not None]
    total = metrics.get("questions") or 0
    return {
        "bad_format": metrics.get("questions_bad_format", 0) / total if total else float("nan"),
        "responder_parsed": sum(a is not None for a in answers) / len(answers) if answers else float("nan"),
        "verifier_verdict": sum(m is not None for _, m in judged) / len(judged) if judged else float("nan"),
        "tokens_generated": metrics.get("tokens_generated", 0),
    }


def run_lr(folder: Path) -> str:
    """The run's learning rate as its config.json or the experiment's learning.json holds it."""
    for path in (folder.parent / "learning.json", folder / "learning.json"):
        if path.is_file():
            lr = json.loads(path.read_text()).get("settings", {}).get("lr")
            if lr:
                return str(lr)
    config = folder / "config.json"
    if config.is_file():
        text = json.loads(config.read_text())
        for key in ("lr", "trainer"):
            value = text.get(key)
            if isinstance(value, dict):
                value = value.get("lr")
            if value:
                return str(value)
    return "default"


# --- the before/after table -----------------------------------------------------------------

def comparisons(folder: Path) -> dict[str, dict]:
    """{"<data>-<mode>": compare(before, after)} for every eval/<data>-<mode>/ with both files."""
    from spell_core.evaluation.compare import compare, load_results

    found = {}
    for pair in sorted((folder / "eval").glob("*/before.json")):
        after = pair.with_name("after.json")
        if after.is_file():
            found[pair.parent.name] = compare(load_results(pair), load_results(after), names=("before", "after"))
    if not found:
        raise ReportError(f"{folder}: no eval/<data>-<mode>/before.json with an after.json beside it: the experiment "
                          "did not finish; rerun bench/learning.py")
    return found


def before_after_table(found: dict[str, dict]) -> str:
    lines = ["| data | mode | type | questions | metric | before | after | change | 95 % interval (paired bootstrap) |",
             "|---|---|---|---:|---|---:|---:|---:|---|"]
    for key, result in found.items():
        data, _, mode = key.rpartition("-")
        for group, row in result["groups"].items():
            for k in result["ks"]:
                v = row[f"pass@{k}"]
                lines.append(f"| {data} | {mode} | {group} | {row['questions']} | pass@{k} | {v['a']:.3f} | "
                             f"{v['b']:.3f} | {v['delta']:+.3f} | [{v['low']:+.3f}, {v['high']:+.3f}] |")
    return "\n".join(lines)


def health_table(runs: list[tuple[str, Path]]) -> str:
    lines = ["| run | lr | step | bad_format | R parsed | V verdict | tokens generated | reward Q | reward R | "
             "reward V | trajectories Q/R/V | step s | held-out pass@1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, folder in runs:
        history = read_jsonl(folder / "metrics.jsonl")
        questions = read_jsonl(folder / "questions.jsonl")
        lr = run_lr(folder)
        for m in training_steps(history):
            h = format_health(m, questions)
            rewards = " | ".join(_number(m.get(f"reward_{role}")) for role in ROLES)
            trajectories = "/".join(str(m.get(f"trajectories_{role}", 0)) for role in ROLES)
            lines.append(f"| {name} | {lr} | {m['step']} | {_share(h['bad_format'])} | {_share(h['responder_parsed'])} "
                         f"| {_share(h['verifier_verdict'])} | {h['tokens_generated']:,} | {rewards} | {trajectories} "
                         f"| {_seconds(m.get('step_time_s'))} | {_share(m.get('eval_all_pass@1'))} |")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None or value != value else f"{value:+.2f}"


def _seconds(value) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def _share(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


# --- the curves ----------------------------------------------------------------------------

def plot_curves(folder: Path, path: Path) -> None:
    """Four panels over the steps: reward per role; the pass@G histogram (share of responder
    groups with 0..G answers right, stacked); format health; held-out pass@k per validation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from spell_core.cli.metrics_plot import has_eval, plot_eval_panel

    history = read_jsonl(folder / "metrics.jsonl")
    steps_m = training_steps(history)
    questions = read_jsonl(folder / "questions.jsonl")
    steps = [m["step"] for m in steps_m]
    fig, axes = plt.subplots(4, 1, figsize=(8, 12), sharex=True)
    for role in ROLES:
        axes[0].plot(steps, [_nan(m.get(f"reward_{role}")) for m in steps_m], marker="o", label=role)
    axes[0].set_ylabel("mean reward")
    hists = [m.get("pass_rate_histogram") or [] for m in steps_m]
    width = max((len(h) for h in hists), default=0)
    if width:
        shares = np.array([[(h[i] / sum(h)) if sum(h) and i < len(h) else 0.0 for i in range(width)] for h in hists])
        bottom = np.zeros(len(steps))
        colors = plt.cm.viridis(np.linspace(0, 1, width))
        for i in range(width):
            axes[1].bar(steps, shares[:, i], bottom=bottom, color=colors[i], label=f"{i}/{width - 1} right")
            bottom += shares[:, i]
    axes[1].set_ylabel("responder groups\n(pass@G histogram)")
    health = [format_health(m, questions) for m in steps_m]
    for key, label in (("bad_format", "bad_format share"), ("responder_parsed", "R answers parsed"),
                       ("verifier_verdict", "V majority a verdict")):
        axes[2].plot(steps, [h[key] for h in health], marker="o", label=label)
    axes[2].set_ylabel("format health")
    axes[2].set_ylim(-0.05, 1.05)
    if has_eval(history):
        plot_eval_panel(axes[3], history)
    axes[3].set_ylabel("held-out pass@k\n(validation)")
    axes[3].set_xlabel("step")
    axes[3].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_ylim(0, 1.05)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def _nan(value):
    return float("nan") if value is None else value


# --- commands ------------------------------------------------------------------------------

def report(folder: Path, png: Path | None = None) -> str:
    """The Markdown section of one experiment; draws its PNG."""
    folder = Path(folder)
    runs = run_folder(folder)
    found = comparisons(folder)
    png = png or folder / "learning.png"
    plot_curves(runs, png)
    record = json.loads((folder / "learning.json").read_text()) if (folder / "learning.json").is_file() else {}
    settings = record.get("settings", {})
    shown = ", ".join(f"{k} {settings[k]}" for k in ("steps", "lr", "questions", "group_size", "eval_n", "val_every",
                                                      "seed") if settings.get(k) is not None)
    lines = [f"## Experiment {folder.name}", ""]
    if shown:
        lines += [f"Settings: {shown}; {record.get('minutes', '?')} min; final checkpoint "
                  f"`{record.get('final_checkpoint')}`.", ""]
    lines += [f"![curves]({png.name})", "", "Before / after on the held-out questions:", "",
              before_after_table(found), "", "Format health per step:", "", health_table([(folder.name, runs)]), "",
              "Commands (wall time, CPU time of the command's process, its peak resident set):", "",
              commands_table(record.get("commands", [])), "",
              "Conclusion: (to be written from the numbers above)", ""]
    return "\n".join(lines)


def commands_table(commands: list[dict]) -> str:
    lines = ["| command | wall min | CPU s | peak RSS GB |", "|---|---:|---:|---:|"]
    for c in commands:
        argv = c.get("command", [])
        module = argv[2] if len(argv) > 2 and argv[1] == "-m" else Path(argv[1]).name if len(argv) > 1 else "?"
        out = next((Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--out"), None)
        detail = "" if out is None else f"{out.parent.name} {out.stem}" if out.suffix == ".json" else out.name
        lines.append(f"| {module} {detail} | {c.get('seconds', 0) / 60:.1f} | {c.get('cpu_seconds', '-')} | "
                     f"{c.get('peak_rss_gb', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/learning_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="experiment folder (or run folders with --sweep)")
    parser.add_argument("--sweep", action="store_true", help="format health per step of every run given")
    parser.add_argument("--png", default=None, help="the curves (default: OUT/learning.png)")
    parser.add_argument("--md", default=None, help="write the Markdown here too (default: print only)")
    args = parser.parse_args(argv)
    try:
        if args.sweep:
            text = "## Sweep: format health per step\n\n" + health_table(
                [(Path(f).name, run_folder(Path(f))) for f in args.folders]) + "\n"
        else:
            if len(args.folders) != 1:
                raise ReportError("one experiment folder at a time (several run folders: --sweep)")
            text = report(Path(args.folders[0]), Path(args.png) if args.png else None)
    except (ReportError, OSError, json.JSONDecodeError) as err:
        print(f"learning_report: error: {err}", file=sys.stderr)
        return 1
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
