"""`python -m spell_core.eval --data FILE --model PATH`: pass@k of a model on long-document
questions, to measure a checkpoint before and after training.

The data file is a benchmark as released (LongBench-v2, LongBench v1 QA, DocMath-Eval, Frames)
or our own jsonl, as JSON, JSON Lines or Parquet; see `spell_core/evaluation/benchmarks.py` for the
formats. Every question gets n samples (temperature 0.7, top-p 0.95) through the method's
evaluation prompts (`eval_prompts.py`); all questions of the file go to the sampler in one
call (waves within the KV budget, the n samples of a question share its prefill). A prompt
longer than `--ctx` tokens keeps its head and tail (`truncation.py`).

Scoring: the rule reward (any of the references of a LongBench question counts); with
`--judge-model`, max(rule reward, the judge's verdict) for QA and math, multiple choice by
letter only (the method's protocol, `judge.py`); with `--verifier`, max(rule reward, the
majority of the model's own G verdicts): self-grading, labelled as such. Reported as the
paper reports (`evaluation/eval_metrics.py`): mean@n and bootstrap best@k per question, with the
unbiased pass@k beside them; per benchmark the mean over questions, "overall" the mean over
benchmarks ("all" is the question-weighted mean).

`python -m spell_core.eval --compare A.json B.json` compares two result files (`compare.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from spell_core.cli import arg_types
from spell_core.models.assets import DEFAULT_MODEL
from spell_core.evaluation.benchmarks import FORMATS, EvalDataError, EvalItem, load_eval_data
from spell_core.evaluation.harness import evaluate, format_table, pass_at_k
from spell_core.roles import thinking_template_kwargs
from spell_core.evaluation.truncation import parse_budget

__all__ = ["EvalDataError", "EvalItem", "load_eval_data", "pass_at_k", "evaluate", "main"]

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
    parser.add_argument("--n", type=arg_types.count(1), default=8, help="samples per question (default: 8)")
    parser.add_argument("--k", default="1,4,8", help="comma-separated k of pass@k, each <= n (default: 1,4,8)")
    parser.add_argument("--temperature", type=arg_types.TEMPERATURE, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument("--top-p", type=arg_types.TOP_P, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--max-new-tokens", type=arg_types.count(1), default=None,
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
    parser.add_argument("--judge-max-new-tokens", type=arg_types.count(1), default=8192,
                        help="judge reply length (default: 8192, the released scripts' judge)")
    parser.add_argument("--verifier", action="store_true",
                        help="self-grading: score max(rule reward, the evaluated model's own verifier majority) "
                             "(inflates scores; the method's protocol is --judge-model)")
    parser.add_argument("--verifier-samples", type=arg_types.count(1), default=8, help="judgments per answer (default: 8)")
    parser.add_argument("--device", type=arg_types.device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--kv-budget-tokens", type=arg_types.count(1), default=None, help="sampler KV cache size in tokens")
    parser.add_argument("--out", default=None,
                        help="JSON results file (default: <data name>.eval.json here); with --compare the plot "
                             "(default: compare.png); never one of the inputs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (by default an earlier result is never replaced)")
    parser.add_argument("--threads", type=arg_types.count(0), default=None,
                        help="CPU threads of torch; 0: torch's default (default on a CPU: the cores nobody else is "
                             "using when it starts, at least 1, as `run` counts them; 0 on a GPU)")
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
        from spell_core.evaluation.compare import compare_main

        return compare_main(args.compare[0], args.compare[1], args.out or "compare.png", overwrite=args.overwrite)
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
    from spell_core.models.assets import AssetError

    try:
        budget = parse_budget(args.ctx) if args.ctx is not None else None
        items = load_eval_data(args.data, args.format)
        args.out = str(_results_path(args))  # checked before the model loads and the evaluation runs
        _resolve_models(args)
        return _run(args, items, ks, budget)
    except (EvalDataError, ValueError, AssetError) as err:
        print(f"spell.eval: error: {err}", file=sys.stderr)
        return 1


def _run(args, items: list[EvalItem], ks: list[int], budget: int | None) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads
    if threads is None:
        from spell_core.common.cpu_threads import idle_core_threads

        threads = idle_core_threads()[0] if device == "cpu" else 0
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _evaluate_and_report(args, items, ks, budget, device)
    finally:
        torch.set_num_threads(previous)


def _evaluate_and_report(args, items: list[EvalItem], ks: list[int], budget: int | None, device: str) -> int:
    from spell_core.models.model import load_pretrained
    from spell_core.models.rope import with_rope_scaling

    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, device=device)
    native = model.config.max_position_embeddings
    if budget is not None and budget + args.max_new_tokens > native:
        model.config = with_rope_scaling(model.config, budget + args.max_new_tokens)
    print(f"model  {args.model} on {device}, loaded in {time.perf_counter() - start:.1f} s; "
          f"{len(items)} questions from {args.data} ({items[0].source if items else '-'} format), n={args.n}")
    judge = None
    if args.judge_model:
        from spell_core.evaluation.judge import load_judge

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
    """--out (default <data name>.eval.json here): not the data file, not an earlier result (unless
    --overwrite), not a folder, its folder writable (spell_core/common/output_files.py)."""
    from spell_core.common.output_files import check_output_file

    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}.eval.json")
    return check_output_file(out, [("--data", args.data)], overwrite=args.overwrite)


def _resolve_models(args) -> None:
    """A missing --model or --judge-model is named now, not after the other one has loaded."""
    from spell_core.evaluation.judge import resolve_judge_model
    from spell_core.models.assets import resolve_model

    resolve_model(args.model)
    if args.judge_model:
        resolve_judge_model(args.judge_model)


def _write_results(out: Path, text: str) -> Path:
    """Atomically (temporary file, fsync, rename). Should that fail, the results go to a file in the
    temporary folder instead of being lost; the path written is returned."""
    import os
    import tempfile

    from spell_core.common import durable

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
