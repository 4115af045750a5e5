"""Run a function on N gloo processes (CPU) and collect what each rank returns: the spawn harness
of the ring-attention tests.

    shards = run_on_gloo_ranks(body, world_size, tmp_path, *args)   # body(rank, world_size, *args) -> dict

Each rank joins one gloo process group (a file store under tmp_path, a 60 s timeout, one torch
thread), runs `body`, saves its dict as tmp_path/rank<r>.pt and leaves the group; the list of
the ranks' dicts comes back in rank order. `body` must be a module-level function.

Zigzag shards are cut here by hand (`padded_lengths`, `shard_positions`), so the tests do not
rely on the sharding helpers under test.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# fork: the ranks inherit the imported modules (a spawned rank spends seconds importing torch)
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def run_on_gloo_ranks(body, world_size, tmp_path, *args) -> list:
    mp.start_processes(_rank, args=(body, world_size, str(tmp_path / "store"), str(tmp_path), args),
                       nprocs=world_size, start_method=START_METHOD)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def _rank(rank, body, world_size, store_path, results_dir, args):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(body(rank, world_size, *args), os.path.join(results_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def padded_lengths(lengths, world_size):
    multiple = 2 * world_size
    return [-(-n // multiple) * multiple for n in lengths]


def shard_positions(lengths, rank, world_size):
    """Global packed positions of rank's zigzag shard, chunk by chunk, in plain Python."""
    positions, start = [], 0
    for n in lengths:
        c = n // (2 * world_size)
        for chunk in (rank, 2 * world_size - 1 - rank):
            positions += range(start + chunk * c, start + (chunk + 1) * c)
        start += n
    return positions
