"""The resident set over several updates (issue 21: a 5-step CPU run peaked at 20.2 GB while
about 15 GB was live): the trainer's own train_step on trajectories shaped like a CPU step's
(questioner prompts with one answer, responder groups of G answers sharing a prompt, a
verifier group; lengths drawn per step, so blocks of new sizes are freed and reallocated as in
a run), and the sampler's KV cache of a step's size allocated and freed between updates.

    python bench/update_memory.py --updates 3 [any spell_core.run option]
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/update_memory.py ...   # glibc told by env instead
    python bench/update_memory.py --trim ...   # malloc_trim(0) after every update

Prints, per update: live tensor bytes that stay (weights, gradients, AdamW state), the resident
set after it, and the process's peak; and the CPU seconds of the update.
"""
import argparse
import random
import resource
import sys
import time

import torch

from spell_core import run
from spell_core.common.host_memory import trim_freed_memory
from spell_core.distributed.process_groups import Topology
from spell_core.selfplay.batch import Trajectory
from spell_core.training.trainer import Trainer


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_trajectories(rng: random.Random, vocab: int, ctx: int, new_tokens: int, group: int) -> list[Trajectory]:
    def ids(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def traj(role, prompt, n, name):
        return Trajectory(role, prompt, ids(n), [-1.0] * n, rng.choice([-1.0, 1.0]), group=name)

    out = []
    for q in range(rng.randint(3, 7)):  # questioner: documents + instructions, one answer each
        out.append(traj("questioner", ids(rng.randint(ctx // 2, ctx + 100)), rng.randint(60, new_tokens), f"q{q}"))
    for r in range(rng.randint(2, 5)):  # responder groups: G answers to one prompt
        prompt = ids(rng.randint(ctx // 2, ctx + 60))
        out += [traj("responder", prompt, rng.randint(20, new_tokens), f"r{r}") for _ in range(group)]
    prompt = ids(rng.randint(120, 180))  # one verifier group
    out += [traj("verifier", prompt, rng.randint(40, new_tokens), "v") for _ in range(group)]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after every update (glibc)")
    known, rest = parser.parse_known_args()
    config, args = run.config_from_args([*rest, "--no-progress"])
    options = run.trainer_options(config, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, _ = run.load_model_and_documents(config, config.cluster_budget)
    trainer = Trainer(model, options, Topology())
    rng = random.Random(config.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"loaded: weights {weights:.2f} GB, rss {rss_gb():.2f} GB, micro-batch {options.micro_batch_tokens} tokens",
          flush=True)
    for u in range(1, known.updates + 1):
        kv_tokens = rng.randint(4000, 7000)  # the sampler's cache of a call, freed after it
        kv = torch.zeros(model.config.num_hidden_layers, 2, kv_tokens,
                         model.config.num_key_value_heads * model.config.head_dim)
        del kv
        trajectories = step_trajectories(rng, model.config.vocab_size, config.data.ctx,
                                         config.sampling.max_response_tokens, config.sampling.group_size)
        cpu, wall = time.process_time(), time.perf_counter()
        metrics = trainer.train_step(trajectories)
        if known.trim:
            trim_freed_memory()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        print(f"update {u}: {sum(t.num_tokens for t in trajectories):,} tokens unpacked, skipped "
              f"{metrics.get('skipped')}; live weights {weights:.2f} + grads {grads / 2**30:.2f} + AdamW "
              f"{state / 2**30:.2f} GB; rss {rss_gb():.2f} GB, peak {peak_gb():.2f} GB; {wall:.0f} s (cpu {cpu:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
