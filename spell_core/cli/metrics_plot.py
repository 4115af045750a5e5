"""metrics.png: per-role rewards, solved shares and, with --eval-data, a panel of validation pass@k.

Drawn by the monitor after every step and by validation after its step-0 evaluation."""
from __future__ import annotations

import os
from pathlib import Path

from spell_core.selfplay.batch import ROLES

PREFIX = "eval_"  # validation metrics: eval_<type>_pass@<k>


def plot_metrics(history: list[dict], path) -> None:
    """Per-role mean rewards and the shares of responder groups solved by none, some and all
    of their G answers, over steps; written atomically (PNG, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with_eval = has_eval(history)  # validation during training (--eval-data): a third panel
    history_all = history
    history = [m for m in history if any(k != "step" and not k.startswith("eval_") for k in m)]  # training steps
    steps = [m["step"] for m in history]
    fig, axes = plt.subplots(3 if with_eval else 2, 1, figsize=(8, 9 if with_eval else 6), sharex=True)
    top, bottom = axes[0], axes[1]
    if with_eval:
        plot_eval_panel(axes[2], history_all)
    for role in ROLES:
        top.plot(steps, [_nan(m.get(f"reward_{role}")) for m in history], marker="o", label=role)
    top.set_ylabel("mean reward")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    shares = {"none solved (0/G)": [], "some solved": [], "all solved (G/G)": []}
    for m in history:
        hist = m.get("pass_rate_histogram") or [0]
        total = sum(hist)
        values = (hist[0], sum(hist[1:-1]), hist[-1]) if len(hist) > 1 else (0, 0, 0)
        for key, value in zip(shares, values):
            shares[key].append(value / total if total else float("nan"))
    for key, values in shares.items():
        bottom.plot(steps, values, marker="o", label=key)
    bottom.set_ylabel("share of questions")
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole numbers
    bottom.set_ylim(-0.05, 1.05)
    bottom.legend(loc="best", fontsize="small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _nan(value):
    return float("nan") if value is None else value


def has_eval(history: list[dict]) -> bool:
    return any(key.startswith(PREFIX) and "pass@" in key for m in history for key in m)


def plot_eval_panel(ax, history: list[dict]) -> None:
    """pass@k per task type over the steps at which the run evaluated."""
    records = [m for m in history if any(k.startswith(PREFIX) and "pass@" in k for k in m)]
    keys = sorted({k for m in records for k in m if k.startswith(PREFIX) and "pass@" in k})
    for key in keys:
        points = [(m["step"], m[key]) for m in records if key in m]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key[len(PREFIX):])
    ax.set_ylabel("eval pass@k")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best", fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
