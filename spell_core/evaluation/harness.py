"""Evaluation itself: n samples per question through the evaluation prompts, scored by the rule
reward (with a judge or the model's own verifier on request), summarised as the paper reports (eval_metrics.py): mean@n and bootstrap best@k per question,
with the unbiased pass@k beside them; per benchmark the mean over questions, "overall" the mean
over benchmarks ("all" is the question-weighted mean).

`python -m spell_core.eval` (spell_core/eval.py) is its command line; validation during training
(spell_core/cli/validation.py) and `--compare` (compare.py) use it too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from spell_core.evaluation.benchmarks import EvalItem
from spell_core.evaluation.eval_metrics import best_at_k, mean_at_n, mean_over_benchmarks, pass_at_k
from spell_core.evaluation.eval_prompts import build_eval_prompt
from spell_core.roles import (DOC_MC, TASK_TYPES, build_verifier_prompt, extract_answer, parse_verdict,
                              responder_reward, rule_reward, verifier_majority)
from spell_core.evaluation.truncation import truncate_middle

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
    `spell_core.evaluation.judge.Judge`. `template_kwargs`: passed to the chat template (e.g. enable_thinking)."""
    from spell_core.common.progress import progress_bar

    if generate is None:
        from spell_core.sampling.sampler import generate
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
    from spell_core.common.progress import progress_bar
    from spell_core.evaluation.judge import judged_text

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
    from spell_core.common.progress import progress_bar

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
