"""One optimizer step, data parallel and context parallel on 2 gloo processes, beside one process
(bench/train_step_bench.py): the single-process step is the pytest-benchmark baseline; the
distributed steps' times, ratios and agreement are printed (the agreement is asserted, the
times never are). Default sizes are quick; SPELL_BENCH_FULL=1 runs the shape of
bench/results/distributed.md."""
import json
import os

import pytest
import torch

import train_step_bench as tsb

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
ARGV = [] if FULL else ["--layers", "2", "--hidden", "128", "--prompt", "256", "--response", "32", "--groups", "2"]


@pytest.fixture(scope="module")
def args():
    return tsb.parse_args(ARGV + ["--iters", "2"])


@pytest.mark.parametrize("packing", ["shared_prefix", "plain"])
def test_single_process_step(benchmark, args, packing):
    torch.set_num_threads(1)
    trainer = tsb.Trainer(tsb.build_model(args, torch.device("cpu")), tsb.options(args, packing == "shared_prefix"))
    trajectories = tsb.build_trajectories(args)
    benchmark.group = (f"train step, {args.groups} groups x {args.group_size} x ({args.prompt} + {args.response}) "
                       f"tokens, {args.layers} layers x {args.hidden}, fp32 CPU, 1 thread")
    metrics = benchmark.pedantic(trainer.train_step, args=(trajectories,), rounds=2, warmup_rounds=0)
    assert not metrics["skipped"]


@pytest.mark.parametrize("layout", ["dp", "cp"])
def test_two_ranks_agree_with_one_process(args, layout):
    torch.set_num_threads(1)
    reference = tsb.single_process(args, shared_prefix=True)
    report = tsb.compare(tsb.run_forked(args, layout), reference)
    print(f"\n{layout}2 vs one process: " + json.dumps(report))
    assert report["loss_rel_diff"] < 1e-5 and report["grad_norm_rel_diff"] < 1e-3
    assert report["share_of_weights_off_by_1pct_of_lr"] < 1e-3
