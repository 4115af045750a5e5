"""One optimizer step on R gloo processes (data parallel, or context parallel) against one process.

Every run starts from the same random Llama-shaped model (fp32) and the same trajectories:
`--groups` shared-prefix groups of `--group-size` responses each (prompt `--prompt` tokens,
responses `--response` tokens). One process trains on all of them (shared-prefix packing, and
plain packing: what context parallelism packs); DP = R gives each rank R's share of the
groups; CP = R gives every rank all groups, each sequence split zigzag across the R ranks.
Reported per layout: the step time (median over `--iters` steps, slowest rank), its ratio to
the single-process step, and the first step's agreement with the single process (loss,
largest weight difference after AdamW).

    python bench/train_step_bench.py                       # CPU: forks gloo ranks, 1 thread each
    python bench/train_step_bench.py --layers 8 --prompt 4096
    torchrun --nproc-per-node 8 bench/train_step_bench.py --layout cp   # GPUs (NCCL): see gpu_train_cp.sh

On CPU the R ranks share the machine's cores, so the ratio shows the overheads of the
distributed step (collectives, FSDP all-gathers, ring transfers, padding), not a speed-up.
Prints one JSON object.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from spell_core.selfplay.batch import Trajectory
from spell_core.distributed.process_groups import init_distributed, shutdown
from spell_core.models.model import CausalLM, ModelConfig
from spell_core.training.trainer import Trainer, TrainerOptions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="CPU ranks to fork (ignored under torchrun)")
    p.add_argument("--layout", default="both",
                   help="dp, cp (shared prefixes sharded), cp-plain (every response its own copy of the prompt), "
                        "a comma list of them, or both (= dp,cp)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-reference", action="store_true",
                   help="under torchrun: skip the single-process step (a shape one device cannot hold)")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def build_model(args, device):
    torch.manual_seed(0)
    config = ModelConfig.from_hf(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.hidden * 3, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.prompt + args.response),
        rope_theta=10000.0, rms_norm_eps=1e-6))
    model = CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.to(device=device, dtype=getattr(torch, args.dtype))


def build_trajectories(args):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(args.groups):
        prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()
        for _ in range(args.group_size):
            response = torch.randint(0, args.vocab, (args.response,), generator=g).tolist()
            old = (-8.0 + 0.1 * torch.randn(args.response, generator=g)).tolist()
            out.append(Trajectory("responder", prompt, response, old, float(torch.randn(1, generator=g)),
                                  group=f"resp:{i}"))
    return out


LR = 1e-4


def options(args, shared_prefix=True):
    return TrainerOptions(lr=LR, micro_batch_tokens=1 << 30, shared_prefix=shared_prefix, bf16_autocast=False)


def timed_steps(trainer, trajectories, iters, barrier=None):
    """(first step's metrics, the weights after it, median step time over iters steps)."""
    times, first, weights = [], None, None
    for i in range(iters):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        metrics = trainer.train_step(trajectories)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0:
            first = metrics
            weights = _full_weights(trainer.model)
    return first, weights, statistics.median(times)


def _full_weights(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
            for n, p in model.named_parameters()}


def run_rank(topology, args, layout):
    import torch.distributed as dist

    from spell_core.distributed.context_parallel import shard_micro_batch
    from spell_core.training.trainer import plan_micro_batches

    model = build_model(args, topology.device)
    shared_prefix = layout != "cp-plain"
    trainer = Trainer(model, options(args, shared_prefix), topology)
    everything = build_trajectories(args)
    if layout == "dp":
        mine = [t for t in everything if int(t.group.split(":")[1]) % topology.world_size == topology.rank]
    else:
        mine = everything
    # tokens this rank forwards per step (its zigzag shards, padding included)
    micro_batches = plan_micro_batches(mine, 1 << 30, shared_prefix)
    forwarded = sum(shard_micro_batch(mb, topology.cp_rank, topology.cp).input_ids.numel() for mb in micro_batches)
    first, weights, seconds = timed_steps(trainer, mine, args.iters, barrier=dist.barrier)
    slowest = torch.tensor([seconds], device=topology.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"loss": first["loss"], "grad_norm": first["grad_norm"], "seconds": float(slowest),
            "tokens_forwarded_per_rank": forwarded, "weights": weights if topology.is_main else None}


def single_process(args, shared_prefix):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(build_model(args, device), options(args, shared_prefix))
    first, weights, seconds = timed_steps(trainer, build_trajectories(args), args.iters)
    return {"loss": first["loss"], "grad_norm": first["grad_norm"], "seconds": seconds, "weights": weights}


def _cpu_rank(rank, world_size, cp, port, args, layout, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    topology = init_distributed(cp, device="cpu", timeout_s=1800)
    result = run_rank(topology, args, layout)
    if rank == 0:
        torch.save(result, result_path)
    shutdown(topology)


def run_forked(args, layout):
    world = args.world_size
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        path = os.path.join(tmp, "result.pt")
        mp.start_processes(_cpu_rank, args=(world, 1 if layout == "dp" else world, port, args, layout, path),
                           nprocs=world, start_method="fork")
        return torch.load(path)


def compare(result, reference, lr=LR):
    """Timing ratio and agreement. AdamW's first step moves every weight by about lr (its update
    is g / (|g| + eps)), so an element whose gradient is near 0 may flip sign between two
    fp32 reductions: the share of weights that differ by more than 1 % of lr says how many."""
    diffs = torch.cat([(result["weights"][n] - w).abs().flatten() for n, w in reference["weights"].items()])
    return {"seconds": result["seconds"], "ratio_to_single": result["seconds"] / reference["seconds"],
            "tokens_forwarded_per_rank": result.get("tokens_forwarded_per_rank"),
            "loss": result["loss"], "loss_rel_diff": abs(result["loss"] - reference["loss"]) / abs(reference["loss"]),
            "grad_norm_rel_diff": abs(result["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"],
            "max_weight_diff_over_lr": float(diffs.max()) / lr,
            "share_of_weights_off_by_1pct_of_lr": float((diffs > 0.01 * lr).double().mean())}


def main(argv=None):
    args = parse_args(argv)
    layouts = ("dp", "cp") if args.layout == "both" else tuple(args.layout.split(","))
    unknown = set(layouts) - {"dp", "cp", "cp-plain"}
    if unknown:
        raise SystemExit(f"--layout: unknown {sorted(unknown)}; use dp, cp, cp-plain, a comma list, or both")
    if "RANK" in os.environ:  # torchrun: this process is one rank, of one layout
        if len(layouts) != 1:
            raise SystemExit("under torchrun pick one layout: --layout dp, cp or cp-plain")
        world = int(os.environ["WORLD_SIZE"])
        topology = init_distributed(1 if args.layout == "dp" else world, timeout_s=1800)
        result = run_rank(topology, args, args.layout)
        if topology.is_main:
            report = {"shape": {k: v for k, v in vars(args).items() if k != "json"}, "world_size": world,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
            if args.no_reference:
                report[f"{args.layout}{world}"] = {"seconds": result["seconds"], "loss": result["loss"]}
            else:
                reference = single_process(args, shared_prefix=True)
                report["single_shared_prefix_seconds"] = reference["seconds"]
                report[f"{args.layout}{world}"] = compare(result, reference)
            _emit(report, args)
        shutdown(topology)
        return
    torch.set_num_threads(1)
    reference = single_process(args, shared_prefix=True)
    plain = single_process(args, shared_prefix=False)
    report = {"shape": {k: v for k, v in vars(args).items() if k != "json"}, "machine_threads_per_rank": 1,
              "single_shared_prefix_seconds": reference["seconds"], "single_plain_seconds": plain["seconds"]}
    for layout in layouts:
        report[f"{layout}{args.world_size}"] = compare(run_forked(args, layout), reference)
    _emit(report, args)


def _emit(report, args):
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
