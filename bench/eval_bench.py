"""Evaluation throughput: `spell_core.eval.evaluate` (all questions in one sampler call, the n
samples of a question sharing its prefill) against a transformers `generate` loop (one call per
question, num_return_sequences=n), same model, same prompts, same sampling, same run.

    python bench/eval_bench.py --model smollm2-135m-instruct --questions 6 --n 4 --new-tokens 32

Both generate exactly --new-tokens tokens per sample (end-of-sequence ignored) so that they do
the same work; the ratio is transformers' time over ours. Prints a markdown table row.
"""
from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=6, help="questions (a third of each type)")
    parser.add_argument("--lines", type=int, default=40, help="play lines per document")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from shakespeare_eval_data import make_questions
    from spell_core.sampling import sampler
    from spell_core.models.assets import resolve_corpus, resolve_model
    from spell_core.evaluation.benchmarks import load_eval_data
    from spell_core.eval import evaluate
    from spell_core.evaluation.eval_prompts import build_eval_prompt
    from spell_core.models.model import load_pretrained

    import json
    import tempfile

    per_type = max(1, args.questions // 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.jsonl"
        path.write_text("".join(json.dumps(q) + "\n"
                                for q in make_questions(resolve_corpus(), per_type, args.lines, seed=0)))
        items = load_eval_data(path)
    model, tokenizer = load_pretrained(args.model, device=args.device)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).to(args.device)
    hf.eval()

    ours_generate = functools.partial(sampler.generate, ignore_eos=True)
    evaluate(model, tokenizer, items[:1], n=args.n, ks=(1,), max_new_tokens=4, generate=ours_generate,
             progress=False)  # warm-up
    result = evaluate(model, tokenizer, items, n=args.n, ks=(1,), max_new_tokens=args.new_tokens,
                      generate=ours_generate, progress=False)
    ours = result["speed"]

    prompts = [build_eval_prompt(tokenizer, it.documents, it.task).input_ids for it in items]
    torch.manual_seed(0)
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0]], device=args.device), max_new_tokens=4, do_sample=True)  # warm-up
        start = time.perf_counter()
        tokens = 0
        for ids in prompts:
            out = hf.generate(torch.tensor([ids], device=args.device), do_sample=True, temperature=0.7, top_p=0.95,
                              top_k=0, num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=tokenizer.eos_token_id)
            tokens += (out.shape[1] - len(ids)) * out.shape[0]
        hf_seconds = time.perf_counter() - start
    assert tokens == ours["generated_tokens"], (tokens, ours["generated_tokens"])
    mean_prompt = sum(map(len, prompts)) / len(prompts)
    print(f"questions {len(items)}, n {args.n}, {args.new_tokens} new tokens per sample, mean prompt "
          f"{mean_prompt:.0f} tokens, {args.threads} thread(s), {args.device}, {platform.processor() or 'cpu'}")
    print(f"spell evaluate      {ours['seconds']:.2f} s  {ours['questions_per_s']:.3f} questions/s  "
          f"{ours['tokens_per_s']:.1f} tokens/s")
    print(f"transformers loop   {hf_seconds:.2f} s  {len(items) / hf_seconds:.3f} questions/s  "
          f"{tokens / hf_seconds:.1f} tokens/s")
    print(f"ratio (transformers time / spell time): {hf_seconds / ours['seconds']:.2f}x")
    print(f"| {args.model} | {args.device} | {len(items)} q x n={args.n} x {args.new_tokens} tok, prompt "
          f"~{mean_prompt:.0f} | {ours['questions_per_s']:.3f} q/s, {ours['tokens_per_s']:.1f} tok/s | "
          f"{len(items) / hf_seconds:.3f} q/s, {tokens / hf_seconds:.1f} tok/s | {hf_seconds / ours['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
