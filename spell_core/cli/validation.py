"""Validation during training: `run --eval-data FILE [--eval-every N] [--eval-n N]`.

The run's own model (its current weights, no checkpoint) answers the file's questions at
step 0 (before the first update) and after every N-th step; pass@1 and pass@n per task type
(and over all) go into metrics.jsonl as `eval_<type>_pass@<k>` (the step-0 evaluation as a
line of its own, the others in their step's line), one line is printed per evaluation, and
metrics.png gains a panel of them. Scored by the rule reward (no judge during training).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from spell_core.cli.metrics_plot import PREFIX, plot_metrics
from spell_core.cli.monitor import METRICS_FILE
from spell_core.evaluation.benchmarks import EvalItem, load_eval_data



@dataclass
class Validation:
    items: list[EvalItem]
    every: int
    n: int
    max_new_tokens: int
    prompt_budget: int | None = None
    kv_budget_tokens: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args, config) -> "Validation | None":
        """None without --eval-data; the file is read here, so a bad one fails before the model loads."""
        if not getattr(args, "eval_data", None):
            return None
        if args.eval_every < 1 or args.eval_n < 1:
            raise ValueError("--eval-every and --eval-n must be at least 1")
        items = load_eval_data(args.eval_data, getattr(args, "eval_format", None))
        print(f"eval        {len(items)} questions from {args.eval_data}, n={args.eval_n}, at step 0 and every "
              f"{args.eval_every} steps")
        return cls(items, args.eval_every, args.eval_n, config.sampling.max_response_tokens,
                   kv_budget_tokens=config.loop.kv_budget_tokens, seed=config.seed)

    @property
    def ks(self) -> list[int]:
        return sorted({1, self.n})

    def due(self, step: int) -> bool:
        return step == 0 or step % self.every == 0

    def run(self, model, tokenizer, step: int, *, generate=None) -> dict:
        """Evaluate now; the metrics (eval_* keys) and the printed line."""
        from spell_core.evaluation.harness import evaluate

        began = time.perf_counter()
        budget = self.prompt_budget
        if budget is None:
            budget = max(2, model.config.max_position_embeddings - self.max_new_tokens)
        result = evaluate(model, tokenizer, self.items, n=self.n, ks=self.ks, max_new_tokens=self.max_new_tokens,
                          prompt_budget=budget, seed=self.seed + step, kv_budget_tokens=self.kv_budget_tokens,
                          generate=generate, progress=False)
        metrics = {f"{PREFIX}{group}_pass@{k}": row[f"pass@{k}"]
                   for group, row in result["summary"].items() for k in self.ks}
        metrics[f"{PREFIX}questions_per_s"] = result["speed"]["questions_per_s"]
        metrics[f"{PREFIX}seconds"] = time.perf_counter() - began
        print(eval_line(step, result["summary"], self.ks, metrics[f"{PREFIX}seconds"]), flush=True)
        return metrics

    def at_step(self, model, tokenizer, step: int, topology=None, *, generate=None) -> dict:
        """Evaluate if `step` is due: on the main rank only (inside the gathered weights of a
        sharded model, which every rank enters together). {} when not due or not the main rank."""
        if not self.due(step):
            return {}
        gathered = contextlib.nullcontext()
        if topology is not None and topology.is_distributed:
            from spell_core.distributed.sharded_training import sampling_weights

            gathered = sampling_weights(model)
        with gathered:
            if topology is not None and not topology.is_main:
                return {}
            return self.run(model, tokenizer, step, generate=generate)

    def log_start(self, monitor, metrics: dict) -> None:
        """The step-0 evaluation as its own metrics.jsonl line (no training step has run)."""
        if not metrics:
            return
        record = {"step": 0, **metrics}
        monitor.history.append(record)
        with open(Path(monitor.out) / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if monitor.plot_enabled:
            plot_metrics(monitor.history, Path(monitor.out) / "metrics.png")


def eval_line(step: int, summary: dict, ks, seconds: float) -> str:
    groups = " | ".join(f"{group} " + " ".join(f"pass@{k} {row[f'pass@{k}']:.3f}" for k in ks)
                        for group, row in summary.items())
    return f"eval step {step} | {groups} | {summary['all']['questions']} questions, {seconds:.1f} s"
