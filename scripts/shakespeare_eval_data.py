"""A small evaluation file from the embedded Shakespeare corpus, in our jsonl format:

    python scripts/shakespeare_eval_data.py --out shakespeare_eval.jsonl --per-type 4 --lines 40

For each question a passage of `--lines` lines of one play is the document:
  doc_qa   "Who speaks the line ...?"                   -> the speaker's name as printed
  doc_math "How many speeches does X make in the text?"  -> the count
  doc_mc   "Which play is this passage from?"            -> the letter of its title among 4
Deterministic for a given --seed. For demos and benchmarks, not a measure of anything.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

_SPEAKER = re.compile(r"^([A-Z][A-Za-z]{1,15}\.(?: [A-Z][a-z]+\.)?)$")


def _speeches(lines: list[str]) -> list[tuple[str, str]]:
    """(speaker, first line of the speech) for every speech in `lines`."""
    out = []
    for i, line in enumerate(lines[:-1]):
        if _SPEAKER.match(line.strip()) and lines[i + 1].strip():
            out.append((line.strip().rstrip("."), lines[i + 1].strip()))
    return out


def make_questions(corpus: Path, per_type: int, n_lines: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    plays = sorted(corpus.glob("*.txt"))
    titles = {p: p.read_text(encoding="utf-8").strip().split("\n", 1)[0].strip() for p in plays}
    questions = []
    made = {"doc_qa": 0, "doc_math": 0, "doc_mc": 0}
    while min(made.values()) < per_type:
        play = rng.choice(plays)
        lines = play.read_text(encoding="utf-8").split("\n")
        start = rng.randrange(200, max(201, len(lines) - n_lines))
        passage = lines[start:start + n_lines]
        speeches = _speeches(passage)
        if len(speeches) < 3:
            continue
        context = "\n".join(passage).strip()
        task = min(made, key=made.get)
        if task == "doc_qa":
            speaker, first = rng.choice(speeches)
            if sum(1 for _, f in speeches if f == first) > 1:
                continue
            record = {"question": f"Who speaks the line \"{first}\"?", "answer": speaker}
        elif task == "doc_math":
            speaker = rng.choice(speeches)[0]
            count = sum(1 for s, _ in speeches if s == speaker)
            record = {"question": f"How many speeches does {speaker} make in the text?", "answer": count}
        else:
            wrong = rng.sample([titles[p] for p in plays if p != play], 3)
            letters = ["A", "B", "C", "D"]
            options = wrong[:]
            answer = rng.randrange(4)
            options.insert(answer, titles[play])
            record = {"question": "Which play is this passage from?", "options": dict(zip(letters, options)),
                      "answer": letters[answer]}
        made[task] += 1
        questions.append({"id": f"{task}-{made[task]}", "context": context, "type": task, **record})
    return questions


def main() -> None:
    from spell_core.models.assets import resolve_corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="shakespeare_eval.jsonl")
    parser.add_argument("--per-type", type=int, default=4, help="questions of each task type (default: 4)")
    parser.add_argument("--lines", type=int, default=40, help="lines of the play per document (default: 40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    questions = make_questions(resolve_corpus(), args.per_type, args.lines, args.seed)
    Path(args.out).write_text("".join(json.dumps(q) + "\n" for q in questions))
    print(f"{len(questions)} questions written to {args.out}")


if __name__ == "__main__":
    main()
