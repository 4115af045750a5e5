"""`python -m spell_core.eval --compare A.json B.json`: what changed between two evaluations of
the same questions (before and after training).

Per task type (and over all questions) the change B - A in pass@1 and in pass@k for every k
both files report, with a paired bootstrap 95 % interval: the questions are resampled with
replacement (the same draw for A and B, so the question-to-question spread cancels), the mean
difference recomputed each time, and the 2.5th and 97.5th percentiles taken. pass@k of each
question is recomputed from its (n, correct) counts, so A and B may use different n.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from spell_core.evaluation.harness import pass_at_k
from spell_core.roles import TASK_TYPES

BOOTSTRAP_DRAWS = 10000


class CompareError(ValueError):
    """Two result files that cannot be compared; the message says why and what to do."""


def load_results(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: no such file; --compare takes two results files written by "
                           "`python -m spell_core.eval --data ... --out FILE.json`")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompareError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    questions = results.get("questions") if isinstance(results, dict) else None
    if not isinstance(questions, list) or not questions or not all(
            isinstance(q, dict) and {"type", "n", "correct"} <= q.keys() for q in questions):
        raise CompareError(f"{path}: not an evaluation result (needs a 'questions' list with type, n and correct "
                           "for each question)")
    for i, q in enumerate(questions):
        n, correct = q["n"], q["correct"]
        counts = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, correct))
        if not counts or n < 1 or not 0 <= correct <= n:
            raise CompareError(f"{path}: question {q.get('id') or q.get('where') or f'#{i}'} has n={n!r} samples and "
                               f"correct={correct!r}; it needs whole numbers with 0 <= correct <= n >= 1: the file "
                               "was edited or damaged; evaluate again to rewrite it")
    return results


def _question_key(q: dict) -> str:
    return str(q.get("id") or q.get("where"))


def _repeated_keys(results: dict) -> list[str]:
    seen, repeated = set(), []
    for q in results["questions"]:
        key = _question_key(q)
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    return repeated


def _pass_at_k(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    return np.array([pass_at_k(int(ni), int(ci), k) for ni, ci in zip(n, c)])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean of b - a, lower, upper): the percentile interval of the mean paired difference."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def compare(a: dict, b: dict, *, names=("A", "B"), draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """{group: {"questions": m, "pass@k": {"a", "b", "delta", "low", "high"}}} for each task type and "all"."""
    qa = {_question_key(q): q for q in a["questions"]}
    qb = {_question_key(q): q for q in b["questions"]}
    only_a, only_b = sorted(qa.keys() - qb.keys()), sorted(qb.keys() - qa.keys())
    twice = [(name, _repeated_keys(side)) for name, side in zip(names, (a, b))]
    if only_a or only_b or any(keys for _, keys in twice):
        detail = []
        if only_a:
            detail.append(f"{len(only_a)} only in {names[0]} (e.g. {', '.join(only_a[:3])})")
        if only_b:
            detail.append(f"{len(only_b)} only in {names[1]} (e.g. {', '.join(only_b[:3])})")
        for name, keys in twice:
            if keys:
                detail.append(f"question id {', '.join(keys[:3])} appears more than once in {name}")
        raise CompareError(f"the two files do not hold the same questions: {'; '.join(detail)}; evaluate both "
                           "models on the same data file")
    keys = list(qa)
    for key in keys:
        if qa[key]["type"] != qb[key]["type"]:
            raise CompareError(f"question {key} is {qa[key]['type']} in {names[0]} but {qb[key]['type']} in "
                               f"{names[1]}: not the same data")
    n_min = min(min(q["n"] for q in qa.values()), min(q["n"] for q in qb.values()))
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n_min]
    if n_min not in ks:
        ks.append(n_min)
    groups = {t: [key for key in keys if qa[key]["type"] == t] for t in TASK_TYPES}
    groups = {t: g for t, g in groups.items() if g}
    groups["all"] = keys
    table = {}
    for group, members in groups.items():
        row = {"questions": len(members)}
        for k in ks:
            values = []
            for side in (qa, qb):
                n = np.array([side[key]["n"] for key in members])
                c = np.array([side[key]["correct"] for key in members])
                values.append(_pass_at_k(n, c, k))
            delta, low, high = paired_bootstrap(values[0], values[1], draws, seed)
            row[f"pass@{k}"] = {"a": float(values[0].mean()), "b": float(values[1].mean()), "delta": delta,
                                "low": low, "high": high}
        table[group] = row
    return {"ks": ks, "groups": table}


def format_comparison(result: dict, names=("A", "B")) -> str:
    lines = [f"{'type':<10} {'questions':>9}  {'metric':<7} {names[0][:8]:>8} {names[1][:8]:>8} {'change':>8}  "
             "95% interval (paired bootstrap)"]
    lines.append("-" * len(lines[0]))
    for group, row in result["groups"].items():
        for i, k in enumerate(result["ks"]):
            v = row[f"pass@{k}"]
            lead = f"{group:<10} {row['questions']:>9}" if i == 0 else " " * 20
            lines.append(f"{lead}  {f'pass@{k}':<7} {v['a']:>8.3f} {v['b']:>8.3f} {v['delta']:>+8.3f}  "
                         f"[{v['low']:+.3f}, {v['high']:+.3f}]")
    return "\n".join(lines)


def plot_comparison(result: dict, path, names=("A", "B")) -> None:
    """Bars of the change in pass@k per task type with their 95 % intervals (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, ks = list(result["groups"]), result["ks"]
    width = 0.8 / len(ks)
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(groups), 3.6))
    for i, k in enumerate(ks):
        x = np.arange(len(groups)) + (i - (len(ks) - 1) / 2) * width
        values = [result["groups"][g][f"pass@{k}"] for g in groups]
        delta = np.array([v["delta"] for v in values])
        err = np.array([[v["delta"] - v["low"] for v in values], [v["high"] - v["delta"] for v in values]])
        ax.bar(x, delta, width, yerr=err, capsize=3, label=f"pass@{k}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([f"{g}\n({result['groups'][g]['questions']} q)" for g in groups])
    ax.set_ylabel(f"change {names[1]} - {names[0]}")
    ax.set_title("pass@k change with paired bootstrap 95% intervals", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def compare_main(path_a, path_b, plot_path="compare.png", *, overwrite: bool = False) -> int:
    from spell_core.common.output_files import check_output_file

    try:
        a, b = load_results(path_a), load_results(path_b)
        names = (Path(path_a).stem, Path(path_b).stem)
        result = compare(a, b, names=names)
        check_output_file(plot_path, [("--compare A.json", path_a), ("--compare B.json", path_b)],
                          overwrite=overwrite, what="the plot", example="compare.png")
    except (CompareError, ValueError) as err:  # ValueError: an unusable --out (input_checks, run_folder)
        print(f"spell.eval: error: {err}", file=sys.stderr)
        return 1
    for name, data in zip(names, (a, b)):
        print(f"{name}: scored by {data.get('scoring', 'rule reward')}")
    if a.get("scoring") != b.get("scoring"):
        print("note: the two files were scored differently; the change mixes model and scoring", file=sys.stderr)
    print(format_comparison(result, names))
    plot_comparison(result, plot_path, names)
    print(f"\nplot written to {plot_path}")
    return 0
