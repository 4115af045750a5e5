"""`python -m spell_core.eval --data FILE.jsonl --model PATH`: pass@k of a model on
document questions, to measure a checkpoint before and after training.

Each line of the data file is one question:
    {"context": str or [str, ...], "question": str, "answer": str or number,
     "type": "doc_qa" | "doc_math" | "doc_mc", "options": {"A": ..., "D": ...} (doc_mc, optional)}
A doc_mc question without `options` carries them in its text; its answer is a letter A-D.
Every question gets n samples through the responder prompt (the context as its documents);
a sample is correct when its rule reward is 1 (with --verifier: when max(rule reward,
verifier majority) is 1, the verifier judging each answer G times, as in training).
pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over questions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path

from spell_core.assets import DEFAULT_MODEL
from spell_core.roles import (DOC_MC, TASK_TYPES, Task, build_responder_prompt, build_verifier_prompt,
                              extract_answer, parse_verdict, responder_reward, rule_reward, thinking_template_kwargs,
                              verifier_majority)
from spell_core.roles.text import CHOICE_LETTERS
from spell_core.textfiles import jsonl_objects


class EvalDataError(ValueError):
    """A data line that cannot be evaluated; the message starts with file:line."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per question; lower k or raise --n")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class EvalItem:
    task: Task
    documents: tuple[str, ...]
    where: str  # file:line


def load_eval_data(path) -> list[EvalItem]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file; --data takes a .jsonl file of questions")
    items = [_parse_record(record, where) for where, record in jsonl_objects(path, EvalDataError)]
    if not items:
        raise EvalDataError(f"{path}: no questions (the file is empty)")
    return items


def _parse_record(record: dict, where: str) -> EvalItem:
    missing = [k for k in ("context", "question", "answer", "type") if k not in record]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)} (a line needs context, question, "
                            "answer and type)")
    task_type, question, answer, context = record["type"], record["question"], record["answer"], record["context"]
    if task_type not in TASK_TYPES:
        raise EvalDataError(f"{where}: type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise EvalDataError(f"{where}: 'answer' must be a non-empty string or a number")
    documents = [context] if isinstance(context, str) else context
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) and d.strip()
                                                                   for d in documents):
        raise EvalDataError(f"{where}: 'context' must be a non-empty string or a list of non-empty strings")
    answer = str(answer).strip()
    options = record.get("options")
    if task_type == DOC_MC:
        letter = answer.strip("()[]. ").upper()
        if letter not in CHOICE_LETTERS:
            raise EvalDataError(f"{where}: a doc_mc answer must be a letter A-D, got {answer!r}")
        answer = letter
        if isinstance(options, list) and len(options) == 4:
            options = dict(zip(CHOICE_LETTERS, options))
        if options is not None and (not isinstance(options, dict) or sorted(options) != list(CHOICE_LETTERS)
                                    or not all(isinstance(v, str) and v.strip() for v in options.values())):
            raise EvalDataError(f"{where}: 'options' must map exactly A, B, C, D to non-empty texts (or be a "
                                "list of 4 texts)")
    elif options is not None:
        raise EvalDataError(f"{where}: 'options' is only allowed for doc_mc questions, this one is {task_type}")
    return EvalItem(Task(task_type, question.strip(), answer, options), tuple(documents), where)


def evaluate(model, tokenizer, items: Sequence[EvalItem], *, n: int = 8, ks: Sequence[int] = (1, 4, 8),
             temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 4096,
             verifier: bool = False, verifier_samples: int = 8, seed: int = 0, kv_budget_tokens: int | None = None,
             generate: Callable | None = None, progress: bool = True, enable_thinking: bool | None = None,
             max_prompt_tokens: int | None = None) -> dict:
    """Scores and pass@k per task type and overall (plus every question's correct count).
    A prompt longer than `max_prompt_tokens` (default: the model's context minus
    `max_new_tokens`) has its documents cut in the middle, keeping head and tail (SPEC)."""
    from spell_core.monitor import progress_bar

    if generate is None:
        from spell_core.sampler import generate
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per question; lower --k or raise --n")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if kv_budget_tokens is not None:
        sampling["kv_budget_tokens"] = kv_budget_tokens
    template = thinking_template_kwargs(tokenizer, enable_thinking)
    ctx = model.config.max_position_embeddings
    limit = max_prompt_tokens if max_prompt_tokens is not None else ctx - max_new_tokens
    if not 0 < limit < ctx:
        raise ValueError(f"no room for a prompt: {limit} tokens of input with a context of {ctx:,} tokens and "
                         f"{max_new_tokens:,} new tokens; lower --max-new-tokens or pass --ctx")
    fitted = [fit_responder_prompt(tokenizer, item, limit, template) for item in items]
    prompts = [ids for ids, _ in fitted]
    with progress_bar("responder", len(prompts), n * len(prompts), enabled=progress) as hook:
        outputs = generate(model, tokenizer, prompts, n=n, seed=seed, progress=hook, **sampling)
    answers = [[extract_answer(c.text, item.task.task_type) for c in out] for item, out in zip(items, outputs)]
    rules = [[rule_reward(item.task, a) for a in row] for item, row in zip(items, answers)]
    scores = rules
    if verifier:
        judged = [(i, j) for i, row in enumerate(answers) for j, a in enumerate(row) if a is not None]
        verifier_prompts = [build_verifier_prompt(tokenizer, items[i].task, answers[i][j],
                                                  template_kwargs=template).input_ids
                            for i, j in judged]
        majorities = {}
        if verifier_prompts:
            with progress_bar("verifier", len(verifier_prompts), verifier_samples * len(verifier_prompts),
                              enabled=progress) as hook:
                verdicts = generate(model, tokenizer, verifier_prompts, n=verifier_samples, seed=seed + 1,
                                    progress=hook, **sampling)
            majorities = {key: verifier_majority([parse_verdict(c.text) for c in out])
                          for key, out in zip(judged, verdicts)}
        scores = [[responder_reward(rule, majorities.get((i, j)), parsable=answers[i][j] is not None)
                   for j, rule in enumerate(row)] for i, row in enumerate(rules)]

    per_question = []
    for item, row_scores, row_rules, row_answers in zip(items, scores, rules, answers):
        correct = sum(s == 1.0 for s in row_scores)
        per_question.append({"where": item.where, "type": item.task.task_type, "n": n, "correct": correct,
                             "truncated": fitted[len(per_question)][1],
                             "rule_correct": sum(r == 1.0 for r in row_rules), "answers": row_answers,
                             **{f"pass@{k}": pass_at_k(n, correct, k) for k in ks}})
    groups = {t: [q for q in per_question if q["type"] == t] for t in TASK_TYPES}
    groups = {t: qs for t, qs in groups.items() if qs}
    groups["all"] = per_question
    summary = {name: {"questions": len(qs), **{f"pass@{k}": sum(q[f"pass@{k}"] for q in qs) / len(qs) for k in ks}}
               for name, qs in groups.items()}
    return {"summary": summary, "questions": per_question}


def truncate_middle(tokenizer, text: str, keep_tokens: int) -> str:
    """`text` with its middle tokens removed so that `keep_tokens` remain: the first half
    and the last half, joined by a line break."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= keep_tokens:
        return text
    head = (keep_tokens + 1) // 2
    tail = keep_tokens - head
    return tokenizer.decode(ids[:head]) + "\n" + (tokenizer.decode(ids[-tail:]) if tail else "")


def fit_responder_prompt(tokenizer, item: "EvalItem", limit: int, template: dict) -> tuple[list[int], bool]:
    """(prompt ids, truncated): the responder prompt of `item`, its documents (joined) cut in
    the middle when the prompt is longer than `limit` tokens."""
    ids = build_responder_prompt(tokenizer, item.documents, item.task, template_kwargs=template).input_ids
    if len(ids) <= limit:
        return ids, False
    text = "\n\n".join(item.documents)
    keep = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - (len(ids) - limit)
    while keep > 0:  # a cut may merge tokens differently: shorten until the whole prompt fits
        ids = build_responder_prompt(tokenizer, [truncate_middle(tokenizer, text, keep)], item.task,
                                     template_kwargs=template).input_ids
        if len(ids) <= limit:
            return ids, True
        keep -= len(ids) - limit
    raise ValueError(f"{item.where}: the instructions and the question alone exceed {limit:,} tokens; "
                     "raise --ctx or lower --max-new-tokens")


def format_table(summary: dict, ks: Sequence[int]) -> str:
    header = f"{'type':<10} {'questions':>9} " + " ".join(f"{f'pass@{k}':>8}" for k in ks)
    rows = [header, "-" * len(header)]
    for name, row in summary.items():
        rows.append(f"{name:<10} {row['questions']:>9} " + " ".join(f"{row[f'pass@{k}']:>8.3f}" for k in ks))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spell_core.eval",
                                     description="pass@k of a model on document questions (jsonl: context, "
                                                 "question, answer, type)")
    parser.add_argument("--data", required=True, help="jsonl file of questions")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model alias or local HF checkpoint folder, e.g. a run's checkpoint")
    parser.add_argument("--n", type=int, default=8, help="samples per question (default: 8)")
    parser.add_argument("--k", default="1,4,8", help="comma-separated k of pass@k, each <= n (default: 1,4,8)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer in tokens (default: 4096; 20480 with --enable-thinking)")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="pass enable_thinking to chat templates that read it (Qwen3; SPEC: on for thinking "
                             "models); everything before the last </think> is dropped (default: the template's)")
    parser.add_argument("--verifier", action="store_true",
                        help="score max(rule reward, verifier majority) instead of the rule reward alone")
    parser.add_argument("--verifier-samples", type=int, default=8, help="judgments per answer (default: 8)")
    parser.add_argument("--ctx", default=None,
                        help="longest prompt in tokens (e.g. 16k, 100k): longer inputs are cut in the middle, keeping "
                             "head and tail; RoPE scaling when the model cannot hold it plus --max-new-tokens "
                             "(default: the model's context minus --max-new-tokens)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--kv-budget-tokens", type=int, default=None, help="sampler KV cache size in tokens")
    parser.add_argument("--out", default=None, help="JSON results file (default: <data name>.eval.json here)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--k {args.k!r}: expected comma-separated integers, e.g. 1,4,8")
    if args.n < 1 or not ks or ks[0] < 1 or ks[-1] > args.n:
        parser.error(f"--k {args.k} with --n {args.n}: every k must be between 1 and n")
    try:
        items = load_eval_data(args.data)
        return _run(args, items, ks)
    except (EvalDataError, ValueError) as err:
        print(f"spell.eval: error: {err}", file=sys.stderr)
        return 1


def _run(args, items: list[EvalItem], ks: list[int]) -> int:
    import torch

    from spell_core.config import parse_ctx
    from spell_core.model import load_pretrained
    from spell_core.rope import with_rope_scaling

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, device=device)
    max_new_tokens = args.max_new_tokens or (20480 if args.enable_thinking else 4096)
    max_prompt_tokens = None if args.ctx is None else parse_ctx(args.ctx)
    if max_prompt_tokens is not None:
        model.config = with_rope_scaling(model.config, max_prompt_tokens + max_new_tokens)
    print(f"model  {args.model} on {device}, loaded in {time.perf_counter() - start:.1f} s; "
          f"{len(items)} questions from {args.data}, n={args.n}")
    start = time.perf_counter()
    results = evaluate(model, tokenizer, items, n=args.n, ks=ks, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=max_new_tokens, verifier=args.verifier, enable_thinking=args.enable_thinking,
                       max_prompt_tokens=max_prompt_tokens,
                       verifier_samples=args.verifier_samples, seed=args.seed, kv_budget_tokens=args.kv_budget_tokens,
                       progress=not args.no_progress)
    scoring = "max(rule reward, verifier majority)" if args.verifier else "rule reward"
    print(f"\nscored by {scoring}, {time.perf_counter() - start:.1f} s\n" + format_table(results["summary"], ks))
    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}.eval.json")
    results["config"] = {k: v for k, v in vars(args).items()}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
