"""The grounding rule on the held-out set, as the engine applies it to its own questions: the model
answers each question with its documents replaced by the one word "Empty"
(`spell_core.roles.build_grounding_prompt`, which the evaluation prompt becomes with that
document); a question whose answer then earns rule reward 1 is answerable without reading.

    python bench/heldout/grounding.py [--data bench/heldout/wonderland.jsonl] [--model ALIAS|PATH]
        [--out bench/heldout/grounding.json] [--max-new-tokens 512] [--add]

Greedy (temperature 0), one answer per question. Writes {"model", "questions", "answered": [ids],
"by_type": {type: [answered, questions]}}; `build.py` leaves out every id listed there
(`GROUNDING_FILE`), so the shipped set holds only questions the default model cannot answer
without their document.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from spell_core.models.assets import DEFAULT_MODEL

HERE = Path(__file__).parent
NO_DOCUMENTS = ("Empty",)  # spell_core.roles.responder.NO_DOCUMENTS, as the released grounding check


def answered_without_documents(model, tokenizer, items, *, max_new_tokens: int, seed: int = 0) -> dict:
    """{"answered": [ids answered right with no document], "by_type": {type: [answered, total]}}."""
    from spell_core.evaluation.harness import evaluate

    blind = [replace(item, documents=NO_DOCUMENTS) for item in items]
    result = evaluate(model, tokenizer, blind, n=1, ks=(1,), temperature=0.0, max_new_tokens=max_new_tokens,
                      seed=seed, progress=False)
    answered = [q["id"] for q in result["questions"] if q["correct"] > 0]
    by_type: dict[str, list[int]] = {}
    for q in result["questions"]:
        row = by_type.setdefault(q["type"], [0, 0])
        row[0] += q["correct"] > 0
        row[1] += 1
    return {"answered": answered, "by_type": by_type}


def merged(earlier: dict, new: dict) -> dict:
    """One grounding record of two checks of different questions (same model and length)."""
    by_type = {t: [a + b for a, b in zip(earlier["by_type"].get(t, [0, 0]), new["by_type"].get(t, [0, 0]))]
               for t in sorted(set(earlier["by_type"]) | set(new["by_type"]))}
    checked = sorted(set(earlier.get("checked", [])) | set(new["checked"]))
    return {**new, "questions": len(checked), "checked": checked, "by_type": by_type,
            "answered": sorted(set(earlier["answered"]) | set(new["answered"]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/heldout/grounding.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HERE / "wonderland.jsonl"), help="the held-out file to check")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--out", default=str(HERE / "grounding.json"), help="where the result goes")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length (default: 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--add", action="store_true",
                        help="check only the questions --out has not checked yet and add them to it (new rules)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    import torch

    from spell_core.common.output_files import check_output_file
    from spell_core.evaluation.benchmarks import EvalDataError, load_eval_data
    from spell_core.models.model import load_pretrained

    try:
        earlier = None
        if args.add:
            out = Path(args.out)
            earlier = json.loads(out.read_text()) if out.is_file() else None
            if earlier is not None and (earlier.get("model"), earlier.get("max_new_tokens")) != (
                    args.model, args.max_new_tokens):
                raise ValueError(f"--add: {out} was checked with {earlier.get('model')} at "
                                 f"{earlier.get('max_new_tokens')} tokens; pass the same --model / --max-new-tokens")
        else:
            out = check_output_file(Path(args.out), [("--data", args.data)], overwrite=args.overwrite)
        items = load_eval_data(args.data)
    except (EvalDataError, ValueError, OSError) as err:
        print(f"grounding: error: {err}", file=sys.stderr)
        return 1
    if earlier is not None:
        already_checked = set(earlier.get("checked", []))
        items = [item for item in items if item.id not in already_checked]
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, device="cpu")
    found = answered_without_documents(model, tokenizer, items, max_new_tokens=args.max_new_tokens)
    record = {"model": args.model, "data": Path(args.data).name, "questions": len(items),
              "max_new_tokens": args.max_new_tokens, "checked": sorted(item.id for item in items), **found}
    if earlier is not None:
        record = merged(earlier, record)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(found['answered'])} of {len(items)} questions answered without their document "
          f"({', '.join(f'{t} {a}/{n}' for t, (a, n) in sorted(found['by_type'].items()))}) in "
          f"{time.perf_counter() - began:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
