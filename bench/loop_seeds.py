"""What `make run --seed S` samples in its first step, without its update: questions, kept
responder groups, trajectories per role and time per stage, for several seeds (issue 10: a
responder group kept on at least 4 of 5 seeds). The step is spell_core.run's own: its argument
parsing, CPU defaults, thread choice, model, clusters and SelfPlay, in that order; only the
optimizer step after the selection is left out (it does not change what was sampled). Model
memory stays at the weights (no gradients, no AdamW state).

    python bench/loop_seeds.py --seeds 1 2 3 4 [any spell_core.run option]
"""
import argparse
import json
import sys
import time

import torch

from spell_core import run
from spell_core.selfplay.data_parallel import self_play_for_rank
from spell_core.distributed.process_groups import Topology
from spell_core.cli.monitor import question_line, summary_line


def one_seed(seed: int, options: list[str]) -> dict:
    config, args = run.config_from_args([*options, "--seed", str(seed), "--no-progress"])
    torch.manual_seed(config.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"seed {seed}: threads {torch.get_num_threads()} ({args.threads_why})", flush=True)
    model, tokenizer, clusters = run.load_model_and_documents(config, config.cluster_budget)
    play = self_play_for_rank(model, tokenizer, clusters, config, Topology(), should_stop=lambda: False)
    began, cpu_began = time.perf_counter(), time.process_time()
    result = play.step()
    metrics = dict(result.metrics, step_time_s=time.perf_counter() - began,
                   step_cpu_s=time.process_time() - cpu_began)
    for q in result.questions:
        print(question_line(q))
    print(summary_line(metrics, 1), flush=True)
    return {"seed": seed, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--json", help="append one JSON line per seed to this file")
    known, rest = parser.parse_known_args()
    for seed in known.seeds:
        record = one_seed(seed, rest)
        if known.json:
            with open(known.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
