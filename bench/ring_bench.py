"""Ring attention on R ranks against one process running the same global batch.

Each rank times forward + backward of its zigzag shard (median over iterations; the ring's
time is the slowest rank's), then one profiled pass splits that time into the waits on the
K/V and dK/dV transfers (`ring_attn::wait_*`) and the block computations. Rank 0 then runs
flash_attn_varlen_func on the whole batch alone (same device, same threads): the baseline,
and the oracle for the ring's output.

    python bench/ring_bench.py --world-size 4                  # CPU: forks 4 gloo ranks
    torchrun --nproc-per-node 8 bench/ring_bench.py --seqlen 131072 --heads 32 --kv-heads 8 \
        --head-dim 128 --dtype bfloat16                        # GPUs: NCCL, one rank per GPU

Per-device efficiency = single-process time / (R x ring time): 1.0 means R devices each do
1/R of the work in 1/R of the time. On CPU R ranks share the machine's cores, so there it
shows the ring's overheads, not a speed-up. Prints one JSON object (rank 0).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spell_kernels.flash_attn import flash_attn_varlen_func
from spell_kernels.ring_attn import ring_flash_attn_varlen_func, zigzag_cu_seqlens, zigzag_shard, zigzag_unshard

WAIT_KEYS = ("ring_attn::wait_kv", "ring_attn::wait_grad")
COMPUTE_KEYS = ("ring_attn::block_forward", "ring_attn::block_backward")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4, help="CPU ranks to fork (ignored under torchrun)")
    p.add_argument("--seqlen", type=int, default=4096, help="global length of each sequence")
    p.add_argument("--num-seqs", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--full", action="store_true", help="non-causal attention (default: causal)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank and for the baseline")
    p.add_argument("--json", help="also write the result to this file")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _global_batch(args, device):
    gen = torch.Generator(device=device).manual_seed(0)
    total = args.seqlen * args.num_seqs
    dtype = getattr(torch, args.dtype)
    q, k, v, dout = (torch.randn(total, h, args.head_dim, generator=gen, device=device, dtype=dtype)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    cu = torch.arange(0, total + 1, args.seqlen, dtype=torch.int32, device=device)
    return q, k, v, dout, cu


def _time_fwd_bwd(fn, q, k, v, dout, iters, warmup, device, ranks_together=False):
    """Median seconds of forward + backward, and the last output and dq. ranks_together: every
    iteration starts from a barrier, so that no rank's time includes another's late start."""
    times = []
    for i in range(warmup + iters):
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        _sync(device)
        if ranks_together:
            dist.barrier()
        start = time.perf_counter()
        out = fn(qg, kg, vg)
        out.backward(dout)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach(), qg.grad


def _profile_split(fn, q, k, v, dout, device):
    """Seconds spent waiting on transfers and computing blocks in one profiled forward + backward,
    with the attention kernels' device time on GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.profiler.profile(activities=activities) as prof:
        dist.barrier()  # ranks start the profiler at different times
        start = time.perf_counter()
        fn(qg, kg, vg).backward(dout)
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    cpu = {e.key: e.cpu_time_total * 1e-6 for e in events}
    split = dict(wall_s=wall, wait_s=sum(cpu.get(key, 0.0) for key in WAIT_KEYS),
                 compute_s=sum(cpu.get(key, 0.0) for key in COMPUTE_KEYS))
    if device.type == "cuda":
        dev = {e.key: getattr(e, "device_time_total", 0.0) * 1e-6 for e in events}
        split["attn_kernels_s"] = sum(t for name, t in dev.items() if name.startswith(("_attn_fwd", "_bwd_")))
        split["nccl_kernels_s"] = sum(t for name, t in dev.items() if "nccl" in name.lower())
    return split


def run_rank(rank, world_size, args, device):
    torch.manual_seed(0)
    q, k, v, dout, cu = _global_batch(args, device)
    causal = not args.full
    cu_local, max_local = zigzag_cu_seqlens(cu, world_size)
    shard = [zigzag_shard(t, cu, rank, world_size) for t in (q, k, v, dout)]

    def ring(qs, ks, vs):
        return ring_flash_attn_varlen_func(qs, ks, vs, cu_local, max_local, causal=causal)

    ring_s, ring_out, _ = _time_fwd_bwd(ring, *shard, args.iters, args.warmup, device, ranks_together=True)
    split = _profile_split(ring, *shard, device)
    ring_out = zigzag_unshard(ring_out, cu)
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, dict(ring_s=ring_s, **split))

    result = None
    if rank == 0:  # the others wait in the barrier below, leaving the device to the baseline
        def single(qs, ks, vs):
            return flash_attn_varlen_func(qs, ks, vs, cu, cu, args.seqlen, args.seqlen, causal=causal)

        single_s, single_out, _ = _time_fwd_bwd(single, q, k, v, dout, args.iters, args.warmup, device)
        ring_s = max(r["ring_s"] for r in per_rank)
        result = dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            backend=dist.get_backend(), world_size=world_size, seqlen=args.seqlen, num_seqs=args.num_seqs,
            heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, causal=causal,
            threads=torch.get_num_threads(), iters=args.iters,
            ring_ms=1e3 * ring_s, single_ms=1e3 * single_s,
            ring_over_single=ring_s / single_s, per_device_efficiency=single_s / (world_size * ring_s),
            wait_share=statistics.mean(r["wait_s"] / r["wall_s"] for r in per_rank),
            compute_share=statistics.mean(r["compute_s"] / r["wall_s"] for r in per_rank),
            max_abs_err_vs_single=(ring_out.float() - single_out.float()).abs().max().item(),
            per_rank=per_rank,
        )
        if device.type == "cuda":
            result["attn_kernel_share"] = statistics.mean(r["attn_kernels_s"] / r["wall_s"] for r in per_rank)
    dist.barrier()
    return result


def _cpu_rank(rank, world_size, args, store_path, result_path):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=10))
    try:
        result = run_rank(rank, world_size, args, torch.device("cpu"))
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_cpu(args):
    """Fork args.world_size gloo ranks on this machine; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_cpu_rank, args=(args.world_size, args, os.path.join(tmp, "store"), result_path),
                           nprocs=args.world_size, start_method=start_method)
        with open(result_path) as f:
            return json.load(f)


def run_torchrun(args):
    """One rank per process under torchrun: NCCL on GPUs, gloo on CPUs."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo")
    try:
        return run_rank(dist.get_rank(), dist.get_world_size(), args, device)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    result = run_torchrun(args) if "RANK" in os.environ else run_cpu(args)
    if result is not None:
        text = json.dumps({k: v for k, v in result.items() if k != "per_rank"}, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
