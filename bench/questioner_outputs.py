"""Why questioner outputs fail to parse, and what a longer limit would save (issue 21, item 5).

    python bench/questioner_outputs.py --rounds 2 --long 384 [any spell_core.run option] [--json FILE]

Samples the questioner prompts of `--rounds` rounds exactly as a step does (spell_core.run's
options, model, clusters, task mix, history memory) with a `--long` token limit, then parses
every output as it would read at each limit of `--limits`: a sample's first k tokens are the
same whatever the limit (its random stream is its own), so one long sample answers every
shorter limit. Each failure is classified:

    cut        the limit ended the output before its JSON closed (it parses at the long limit)
    cut, loop  cut, and the output repeats itself (its last 200 characters hold a phrase of
               20+ characters three times): a longer limit would not save it
    <reason>   the parser's reason on a finished output (no fenced JSON object, wrong keys, ...)
"""
import argparse
import json
import re
import sys
from collections import Counter

import torch

from spell_core import run
from spell_core.distributed.process_groups import Topology
from spell_core.roles import parse_questioner_output
from spell_core.selfplay.data_parallel import self_play_for_rank
from spell_core.selfplay.loop import _StepStats

_REPEAT = re.compile(r"(.{20,}?)\1\1", re.DOTALL)


def looping(text: str) -> bool:
    return bool(_REPEAT.search(text[-400:]))


def outcome(tokenizer, q, limit: int, count_tokens, stop_ids) -> str:
    ids = q.sample.token_ids
    cut = len(ids) > limit or (len(ids) == limit and q.sample.finish_reason == "length")
    kept = ids[:limit]
    text = tokenizer.decode(kept[:-1] if kept and kept[-1] in stop_ids else kept)
    parsed = parse_questioner_output(text, q.task_type, count_tokens)
    if parsed.status.value == "ok" or not cut:
        return parsed.status.value if parsed.status.value != "bad_format" else f"bad_format: {parsed.reason}"
    return "bad_format: cut, loop" if looping(text) else "bad_format: cut"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long", type=int, default=384, help="the token limit sampled with")
    parser.add_argument("--limits", type=int, nargs="+", default=[160, 192, 256, 320, 384])
    parser.add_argument("--json", help="write every output and its outcome per limit to this file (JSON lines)")
    known, rest = parser.parse_known_args()
    config, args = run.config_from_args([*rest, "--no-progress"])
    config.loop.questioner_tokens = known.long
    torch.manual_seed(config.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, clusters = run.load_model_and_documents(config, config.cluster_budget)
    play = self_play_for_rank(model, tokenizer, clusters, config, Topology(), should_stop=lambda: False)
    from spell_core.sampling.sampler import default_stop_token_ids
    stop_ids = default_stop_token_ids(tokenizer, model)
    questions = []
    for r in range(known.rounds):
        stats = _StepStats()
        asked, _ = play._ask(r, stats)
        questions += asked
        print(f"round {r}: {len(asked)} questions, {stats.generated.get('questioner', 0)} tokens in "
              f"{stats.seconds.get('questioner', 0):.0f} s", flush=True)
    table = {limit: Counter() for limit in known.limits}
    records = []
    for q in questions:
        row = {"id": q.id, "task_type": q.task_type, "tokens": len(q.sample.token_ids),
               "finish": q.sample.finish_reason, "text": q.sample.text,
               "outcome": {limit: outcome(tokenizer, q, limit, play._count_tokens, stop_ids)
                           for limit in known.limits}}
        records.append(row)
        for limit, result in row["outcome"].items():
            table[limit][result] += 1
    lengths = sorted(len(q.sample.token_ids) for q in questions)
    print(f"{len(questions)} outputs; tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"over 160: {sum(n > 160 for n in lengths)}")
    for limit, counts in table.items():
        print(f"limit {limit}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if known.json:
        with open(known.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
