"""`python -m spell_core.eval --data FILE --model PATH`: pass@k of a model on long-document
questions, to measure a checkpoint before and after training.

The data file is a benchmark as released (LongBench-v2, LongBench v1 QA, DocMath-Eval, Frames)
or our own jsonl, as JSON, JSON Lines or Parquet; see `spell_core/benchmarks.py` for the
formats. Every question gets n samples (temperature 0.7, top-p 0.95) through the method's
evaluation prompts (`eval_prompts.py`); all questions of the file go to the sampler in one
call (waves within the KV budget, the n samples of a question share its prefill). A prompt
longer than `--ctx` tokens keeps its head and tail (`truncation.py`).

Scoring: the rule reward (any of the references of a LongBench question counts); with
`--judge-model`, max(rule reward, the judge's verdict) for QA and math, multiple choice by
letter only (the method's protocol, `judge.py`); with `--verifier`, max(rule reward, the
majority of the model's own G verdicts): self-grading, labelled as such. Reported as the
paper reports (`eval_metrics.py`): mean@n and bootstrap best@k per question, with the
unbiased pass@k beside them; per benchmark the mean over questions, "overall" the mean over
benchmarks ("all" is the question-weighted mean).

`python -m spell_core.eval --compare A.json B.json` compares two result files (`compare.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from math import comb
from pathlib import Path

from spell_core.assets import DEFAULT_MODEL
from spell_core.benchmarks import FORMATS, EvalDataError, EvalItem, load_eval_data
from spell_core.eval_metrics import best_at_k, mean_at_n, mean_over_benchmarks, pass_at_k
from spell_core.eval_prompts import build_eval_prompt
from spell_core.roles import (DOC_MC, TASK_TYPES, build_verifier_prompt, extract_answer, parse_verdict,
                              responder_reward, rule_reward, thinking_template_kwargs, verifier_majority)
from spell_core.truncation import parse_budget, truncate_middle

__all__ = ["EvalDataError", "EvalItem", "load_eval_data", "pass_at_k", "evaluate", "main"]

SELF_VERIFIER_LABEL = "max(rule reward, self-verifier majority) [the model under test grades itself]"


def item_rule_reward(item: EvalItem, answer: str | None) -> float:
    """The rule reward against the best of the item's references (LongBench: any answer counts)."""
    references = item.references or (item.task.answer,)
    return max(rule_reward(replace(item.task, answer=ref), answer) for ref in references)


def scoring_label(judge=None, verifier: bool = False) -> str:
    if judge is not None:
        return f"max(rule reward, judge {judge.name} verdict) for QA and math; multiple choice by letter"
    if verifier:
        return SELF_VERIFIER_LABEL
    return "rule reward"


def evaluate(model, tokenizer, items: Sequence[EvalItem], *, n: int = 8, ks: Sequence[int] = (1, 4, 8),
             temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 4096,
             prompt_budget: int | None = None, judge=None, verifier: bool = False, verifier_samples: int = 8,
             seed: int = 0, kv_budget_tokens: int | None = None, generate: Callable | None = None,
             progress: bool = True, template_kwargs: dict | None = None) -> dict:
    """Scores, pass@k per task type, source and overall, every question's correct count, and
    the speed of generation. `prompt_budget`: prompts longer than this many tokens are cut in
    the middle (default: the model's context minus max_new_tokens). `judge`: a
    `spell_core.judge.Judge`. `template_kwargs`: passed to the chat template (e.g. enable_thinking)."""
    from spell_core.monitor import progress_bar

    if generate is None:
        from spell_core.sampler import generate
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per question; lower --k or raise --n")
    if judge is not None and verifier:
        raise ValueError("--judge-model and --verifier are two ways of grading: pick one")
    ctx = model.config.max_position_embeddings
    if prompt_budget is None:
        prompt_budget = ctx - max_new_tokens
    if prompt_budget < 2 or prompt_budget >= ctx:
        raise ValueError(f"a prompt budget of {prompt_budget:,} tokens leaves no room to answer in the model's "
                         f"context of {ctx:,} with --max-new-tokens {max_new_tokens:,}: lower --ctx or "
                         "--max-new-tokens (a --ctx longer than the model's context applies RoPE scaling)")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if kv_budget_tokens is not None:
        sampling["kv_budget_tokens"] = kv_budget_tokens
    prompts, dropped = [], []
    for item in items:
        ids, cut = truncate_middle(build_eval_prompt(tokenizer, item.documents, item.task,
                                                     template_kwargs=template_kwargs).input_ids, prompt_budget)
        prompts.append(ids)
        dropped.append(cut)

    start = time.perf_counter()
    with progress_bar("responder", len(prompts), n * len(prompts), enabled=progress) as hook:
        outputs = generate(model, tokenizer, prompts, n=n, seed=seed, progress=hook, **sampling)
    seconds = time.perf_counter() - start
    generated = sum(len(c.token_ids) for out in outputs for c in out)
    speed = {"seconds": seconds, "questions": len(items), "samples": n * len(items),
             "prompt_tokens": sum(map(len, prompts)), "generated_tokens": generated,
             "questions_per_s": len(items) / max(seconds, 1e-9), "tokens_per_s": generated / max(seconds, 1e-9)}

    answers = [[extract_answer(c.text, item.task.task_type) for c in out] for item, out in zip(items, outputs)]
    rules = [[item_rule_reward(item, a) for a in row] for item, row in zip(items, answers)]
    scores, verdicts = rules, None
    if judge is not None:
        scores, verdicts = _judge_scores(judge, items, outputs, answers, rules, generate, seed, kv_budget_tokens,
                                         progress)
    elif verifier:
        scores = _self_verifier_scores(model, tokenizer, items, answers, rules, generate, sampling, seed,
                                       verifier_samples, progress)

    per_question = []
    for i, (item, row_scores, row_rules, row_answers) in enumerate(zip(items, scores, rules, answers)):
        correct = sum(s == 1.0 for s in row_scores)
        record = {"id": item.id, "where": item.where, "type": item.task.task_type, "source": item.source, "n": n,
                  "correct": correct, "rule_correct": sum(r == 1.0 for r in row_rules), "answers": row_answers,
                  "truncated_tokens": dropped[i], f"mean@{n}": mean_at_n(row_scores),
                  **{f"best@{k}": best_at_k(row_scores, k) for k in ks},
                  **{f"pass@{k}": pass_at_k(n, correct, k) for k in ks}}
        if verdicts is not None:
            record["judge_verdicts"] = verdicts[i]
        per_question.append(record)
    sources = summarize(per_question, ks, "source")
    return {"summary": summarize(per_question, ks, "type"), "sources": sources,
            "overall": mean_over_benchmarks(sources, metric_names(n, ks)), "questions": per_question, "speed": speed, "scoring": scoring_label(judge, verifier),
            "truncation": {"prompt_budget": prompt_budget, "truncated_prompts": sum(d > 0 for d in dropped),
                           "dropped_tokens": sum(dropped)}}


def metric_names(n: int, ks: Sequence[int]) -> list[str]:
    return [f"mean@{n}", *(f"best@{k}" for k in ks), *(f"pass@{k}" for k in ks)]


def summarize(per_question: list[dict], ks: Sequence[int], key: str = "type") -> dict:
    """Mean mean@n, best@k and pass@k per value of `key` (task types in their usual order)
    and over all questions ("all", question-weighted)."""
    names = list(TASK_TYPES) if key == "type" else sorted({q[key] for q in per_question})
    groups = {name: [q for q in per_question if q[key] == name] for name in names}
    groups = {name: qs for name, qs in groups.items() if qs}
    groups["all"] = per_question
    metrics = [m for m in metric_names(per_question[0]["n"], ks) if m in per_question[0]] if per_question else []
    return {name: {"questions": len(qs), **{m: sum(q[m] for q in qs) / len(qs) for m in metrics}}
            for name, qs in groups.items()}


def _judge_scores(judge, items, outputs, answers, rules, generate, seed, kv_budget_tokens, progress):
    """max(rule, verdict) for QA and math samples the rule did not count; per sample the
    verdict (True / False / None, or "rule" when the rule already counted it, "letter" for MC)."""
    from spell_core.monitor import progress_bar
    from spell_core.judge import judged_text

    verdicts = [["letter" if item.task.task_type == DOC_MC else "rule" if r == 1.0 else None for r in row]
                for item, row in zip(items, rules)]
    pending = []
    for i, (item, out, row) in enumerate(zip(items, outputs, answers)):
        if item.task.task_type == DOC_MC:
            continue
        for j, answer in enumerate(row):
            if rules[i][j] < 1.0:
                pending.append((i, j, judged_text(out[j].text, answer)))
    with progress_bar("judge", len(pending), len(pending), enabled=progress) as hook:
        decisions = judge.verdicts([(items[i].task, text) for i, _, text in pending], generate=generate, seed=seed,
                                   kv_budget_tokens=kv_budget_tokens, progress=hook)
    for (i, j, _), decision in zip(pending, decisions):
        verdicts[i][j] = decision
    scores = [[max(r, 1.0 if v is True else 0.0) for r, v in zip(row, vrow)] for row, vrow in zip(rules, verdicts)]
    return scores, verdicts


def _self_verifier_scores(model, tokenizer, items, answers, rules, generate, sampling, seed, verifier_samples,
                          progress):
    from spell_core.monitor import progress_bar

    judged = [(i, j) for i, row in enumerate(answers) for j, a in enumerate(row) if a is not None]
    verifier_prompts = [build_verifier_prompt(tokenizer, items[i].task, answers[i][j]).input_ids for i, j in judged]
    majorities = {}
    if verifier_prompts:
        with progress_bar("verifier", len(verifier_prompts), verifier_samples * len(verifier_prompts),
                          enabled=progress) as hook:
            verdicts = generate(model, tokenizer, verifier_prompts, n=verifier_samples, seed=seed + 1,
                                progress=hook, **sampling)
        majorities = {key: verifier_majority([parse_verdict(c.text) for c in out])
                      for key, out in zip(judged, verdicts)}
    return [[responder_reward(rule, majorities.get((i, j)), parsable=answers[i][j] is not None)
             for j, rule in enumerate(row)] for i, row in enumerate(rules)]


def format_table(summary: dict, ks: Sequence[int], label: str = "type") -> str:
    width = max([10, *(len(name) + 1 for name in summary)])
    first = next(iter(summary.values()), {})
    metrics = [m for m in first if m.startswith(("mean@", "best@"))] + [f"pass@{k}" for k in ks]
    header = f"{label:<{width}} {'questions':>9} " + " ".join(f"{m:>8}" for m in metrics)
    rows = [header, "-" * len(header)]
    for name, row in summary.items():
        rows.append(f"{name:<{width}} {row['questions']:>9} " + " ".join(f"{row.get(m, 0.0):>8.3f}" for m in metrics))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spell_core.eval",
                                     description="pass@k of a model on long-document questions (benchmark files "
                                                 "as released, or our jsonl); --compare A.json B.json compares "
                                                 "two result files")
    parser.add_argument("--data", help="questions: .json / .jsonl / .parquet in one of the formats "
                                       f"{', '.join(FORMATS)} (detected from the fields)")
    parser.add_argument("--format", choices=list(FORMATS), default=None, help="the data format (default: detected)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="compare two result files of the same questions: change in pass@k per task type with "
                             "a paired bootstrap 95%% interval; draws compare.png")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model alias, local HF checkpoint folder (e.g. a run's checkpoint) or hub id "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--n", type=int, default=8, help="samples per question (default: 8)")
    parser.add_argument("--k", default="1,4,8", help="comma-separated k of pass@k, each <= n (default: 1,4,8)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer in tokens (default: 4096; 20480 with --enable-thinking)")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="pass enable_thinking to chat templates that read it (Qwen3; SPEC: on for thinking "
                             "models); everything before the last </think> is dropped (default: the template's)")
    parser.add_argument("--ctx", default=None,
                        help="prompt budget in tokens: longer prompts keep their head and tail, the middle is "
                             "dropped; the method's settings are 16k (16,384) and 100k (100,000); RoPE scaling "
                             "when ctx + max-new-tokens exceeds the model's context (default: the model's context "
                             "minus --max-new-tokens)")
    parser.add_argument("--judge-model", default=None, metavar="PATH|ALIAS|HUB_ID",
                        help="external judge: score = max(rule reward, its verdict) for QA and math (the method's "
                             "protocol); multiple choice by letter only")
    parser.add_argument("--judge-max-new-tokens", type=int, default=8192,
                        help="judge reply length (default: 8192, the released scripts' judge)")
    parser.add_argument("--verifier", action="store_true",
                        help="self-grading: score max(rule reward, the evaluated model's own verifier majority) "
                             "(inflates scores; the method's protocol is --judge-model)")
    parser.add_argument("--verifier-samples", type=int, default=8, help="judgments per answer (default: 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--kv-budget-tokens", type=int, default=None, help="sampler KV cache size in tokens")
    parser.add_argument("--out", default=None,
                        help="JSON results file (default: <data name>.eval.json here); with --compare the plot "
                             "(default: compare.png)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch; 0: torch's default (default: 1 on a CPU, where more threads on a "
                             "busy machine are several times slower; 0 on a GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_ks(text: str, n: int) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--k {text!r}: expected comma-separated integers, e.g. 1,4,8") from None
    if n < 1 or not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"--k {text} with --n {n}: every k must be between 1 and n")
    return ks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        from spell_core.compare import compare_main

        return compare_main(args.compare[0], args.compare[1], args.out or "compare.png")
    if not args.data:
        parser.error("--data FILE is required (or --compare A.json B.json)")
    try:
        ks = parse_ks(args.k, args.n)
    except ValueError as err:
        parser.error(str(err))
    if args.max_new_tokens is None:
        args.max_new_tokens = 20480 if args.enable_thinking else 4096
    if args.judge_model and args.verifier:
        parser.error("--judge-model and --verifier are two ways of grading: pick one")
    from spell_core.assets import AssetError

    try:
        budget = parse_budget(args.ctx) if args.ctx is not None else None
        items = load_eval_data(args.data, args.format)
        args.out = str(_results_path(args))  # checked before the model loads and the evaluation runs
        return _run(args, items, ks, budget)
    except (EvalDataError, ValueError, AssetError) as err:
        print(f"spell.eval: error: {err}", file=sys.stderr)
        return 1


def _run(args, items: list[EvalItem], ks: list[int], budget: int | None) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _evaluate_and_report(args, items, ks, budget, device)
    finally:
        torch.set_num_threads(previous)


def _evaluate_and_report(args, items: list[EvalItem], ks: list[int], budget: int | None, device: str) -> int:
    from spell_core.model import load_pretrained
    from spell_core.rope import with_rope_scaling

    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, device=device)
    native = model.config.max_position_embeddings
    if budget is not None and budget + args.max_new_tokens > native:
        model.config = with_rope_scaling(model.config, budget + args.max_new_tokens)
    print(f"model  {args.model} on {device}, loaded in {time.perf_counter() - start:.1f} s; "
          f"{len(items)} questions from {args.data} ({items[0].source if items else '-'} format), n={args.n}")
    judge = None
    if args.judge_model:
        from spell_core.judge import load_judge

        start = time.perf_counter()
        judge = load_judge(args.judge_model, device, args.judge_max_new_tokens)
        print(f"judge  {args.judge_model}, loaded in {time.perf_counter() - start:.1f} s")
    results = evaluate(model, tokenizer, items, n=args.n, ks=ks, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, prompt_budget=budget, judge=judge,
                       verifier=args.verifier, verifier_samples=args.verifier_samples, seed=args.seed,
                       kv_budget_tokens=args.kv_budget_tokens, progress=not args.no_progress,
                       template_kwargs=thinking_template_kwargs(tokenizer, args.enable_thinking))
    trunc, speed = results["truncation"], results["speed"]
    print(f"\nprompts: {trunc['truncated_prompts']} of {len(items)} longer than {trunc['prompt_budget']:,} tokens, "
          f"cut in the middle ({trunc['dropped_tokens']:,} tokens dropped)")
    print(f"speed: {speed['questions_per_s']:.3f} questions/s, {speed['tokens_per_s']:.1f} generated tokens/s "
          f"({speed['samples']} samples, {speed['generated_tokens']:,} tokens in {speed['seconds']:.1f} s)")
    print(f"scored by {results['scoring']}\n" + format_table(results["summary"], ks))
    if len(results["sources"]) > 2:
        print("\n" + format_table(results["sources"], ks, "source"))
    if results["overall"]:
        print("\n" + format_table({"overall": results["overall"]}, ks, "mean over benchmarks"))
    results["config"] = {k: v for k, v in vars(args).items()}
    out = _write_results(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 0


def _results_path(args) -> Path:
    """--out (default <data name>.eval.json here), proven writable: not a folder, its folder writable."""
    from spell_core.run_folder import check_writable_folder

    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}.eval.json")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: pass a file name for the results, e.g. {out / 'results.json'}")
    file_above = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        raise ValueError(f"--out {out}: {file_above} is a file, so no folder can be made under it; pick another path")
    check_writable_folder(out.parent if str(out.parent) else Path("."), flag=f"--out {out}: folder")
    return out


def _write_results(out: Path, text: str) -> Path:
    """Atomically (temporary file, fsync, rename). Should that fail, the results go to a file in the
    temporary folder instead of being lost; the path written is returned."""
    import os
    import tempfile

    from spell_core import durable

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        durable.write_text(tmp, text)
        os.replace(tmp, out)
        return out
    except OSError as err:
        tmp.unlink(missing_ok=True)
        fd, rescue = tempfile.mkstemp(prefix=f"{out.stem}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"spell.eval: error: cannot write {out} ({err.strerror or err}); the results were saved to {rescue}",
              file=sys.stderr)
        return Path(rescue)


if __name__ == "__main__":
    sys.exit(main())
