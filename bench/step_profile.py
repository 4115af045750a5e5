"""Where a self-play step's time and memory go (issue 21): per sampling stage, prefill and decode
tokens and seconds (wall and CPU); the update's forward, backward and optimizer seconds and the
tokens it forwards; the resident set after every step and the process's peak.

    python bench/step_profile.py --steps 3 [any spell_core.run option] [--json FILE]

The step is spell_core.run's own (argument parsing, CPU defaults, thread choice, model, clusters,
SelfPlay, Trainer); nothing is checkpointed. CPU seconds are this process's (all threads), so
they are less sensitive than wall seconds to other jobs on the machine; but with 2+ threads on
an overloaded machine OpenMP's spinning threads inflate them too (a 135M decode step measured
3.9 CPU-s at load 15): compare runs on an idle machine, or with --threads 1. Run it twice, on
the same seed, to compare before and after a change; `--json` appends one line per step.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

from spell_core import run
from spell_core.cli.monitor import summary_line
from spell_core.common.host_memory import return_freed_memory
from spell_core.distributed.process_groups import Topology
from spell_core.sampling import sampler
from spell_core.selfplay.data_parallel import self_play_for_rank
from spell_core.training.trainer import Trainer


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class SamplerClock:
    """Wraps sampler.generate: per stage, prefill / decode tokens and seconds from its progress
    events (CPU seconds measured between events)."""

    def __init__(self):
        self.stage = None
        self.rows: dict[str, dict] = {}

    def generate(self, *args, progress=None, **kwargs):
        row = self.rows.setdefault(self.stage or "?", dict(calls=0, prefill_tokens=0, prefill_s=0.0,
                                                           prefill_cpu_s=0.0, decode_steps=0, decode_tokens=0,
                                                           decode_s=0.0, decode_cpu_s=0.0))
        row["calls"] += 1
        cpu = [time.process_time()]

        def hook(event):
            now = time.process_time()
            key = "prefill" if event.stage == "prefill" else "decode"
            row[f"{key}_tokens"] += event.tokens
            row[f"{key}_s"] += event.seconds
            row[f"{key}_cpu_s"] += now - cpu[0]
            if key == "decode":
                row["decode_steps"] += 1
            cpu[0] = now
            if progress is not None:
                progress(event)

        return sampler.generate(*args, progress=hook, **kwargs)


class StageObserver:
    def __init__(self, clock: SamplerClock):
        self.clock = clock

    def stage(self, name, prompts, samples):
        import contextlib
        self.clock.stage = name
        return contextlib.nullcontext(None)


class UpdateClock:
    """Times the trainer's micro-batch forwards; backward + optimizer is the rest of train_step."""

    def __init__(self, trainer: Trainer):
        self.forward_s = self.forward_cpu_s = 0.0
        self.tokens = 0
        inner = trainer._micro_batch_loss

        def timed(mb, global_count):
            t, c = time.perf_counter(), time.process_time()
            out = inner(mb, global_count)
            self.forward_s += time.perf_counter() - t
            self.forward_cpu_s += time.process_time() - c
            self.tokens += int(mb.input_ids.numel())
            return out

        trainer._micro_batch_loss = timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="append one JSON line per step to this file")
    known, rest = parser.parse_known_args()
    config, args = run.config_from_args([*rest, "--no-progress"])
    train_options = run.trainer_options(config, args)
    if args.return_freed_memory and not str(config.model.device).startswith("cuda"):
        return_freed_memory()  # as spell_core.run does
    torch.manual_seed(config.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()} ({args.threads_why})", flush=True)
    model, tokenizer, clusters = run.load_model_and_documents(config, config.cluster_budget)
    print(f"loaded: rss {rss_gb():.2f} GB", flush=True)
    trainer = Trainer(model, train_options, Topology())
    play = self_play_for_rank(model, tokenizer, clusters, config, Topology(), should_stop=lambda: False)
    for number in range(1, config.steps + 1):
        clock = SamplerClock()
        play._generate_fn = clock.generate
        play.observer = StageObserver(clock)
        began, cpu_began = time.perf_counter(), time.process_time()
        result = play.step()
        sampled, sampled_cpu = time.perf_counter() - began, time.process_time() - cpu_began
        update = UpdateClock(trainer)
        t, c = time.perf_counter(), time.process_time()
        train = trainer.train_step(result.trajectories) if result.trajectories else {}
        update_s, update_cpu_s = time.perf_counter() - t, time.process_time() - c
        del trainer._micro_batch_loss  # back to the method
        metrics = dict(result.metrics, time_update_s=update_s)
        print(summary_line(metrics, number))
        print(f"{'stage':<15}{'calls':>6}{'prefill tok':>12}{'prefill s':>10}{'(cpu)':>8}{'dec steps':>10}"
              f"{'dec tok':>9}{'decode s':>10}{'(cpu)':>8}")
        for stage, row in clock.rows.items():
            print(f"{stage:<15}{row['calls']:>6}{row['prefill_tokens']:>12,}{row['prefill_s']:>10.1f}"
                  f"{row['prefill_cpu_s']:>8.1f}{row['decode_steps']:>10}{row['decode_tokens']:>9,}"
                  f"{row['decode_s']:>10.1f}{row['decode_cpu_s']:>8.1f}")
        print(f"update: {update.tokens:,} tokens forwarded; forward {update.forward_s:.1f} s (cpu "
              f"{update.forward_cpu_s:.1f}), backward + optimizer {update_s - update.forward_s:.1f} s (cpu "
              f"{update_cpu_s - update.forward_cpu_s:.1f})")
        print(f"step {number}: {sampled + update_s:.1f} s (cpu {sampled_cpu + update_cpu_s:.1f}); rss now "
              f"{rss_gb():.2f} GB, peak {peak_rss_gb():.2f} GB; load average {os.getloadavg()[0]:.1f}", flush=True)
        if known.json:
            record = {"step": number, "sampling": clock.rows, "update_tokens": update.tokens,
                      "update_forward_s": update.forward_s, "update_forward_cpu_s": update.forward_cpu_s,
                      "update_s": update_s, "update_cpu_s": update_cpu_s, "sampling_s": sampled,
                      "sampling_cpu_s": sampled_cpu, "rss_gb": rss_gb(), "peak_rss_gb": peak_rss_gb(), "load_average": os.getloadavg()[0],
                      "train_skipped": bool(train.get("skipped")),
                      **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))}}
            with open(known.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
