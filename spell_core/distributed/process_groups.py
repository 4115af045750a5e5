"""torchrun process groups: data parallel x context parallel, collective timeouts, rank failures.

    topology = init_distributed(cp=2, timeout_s=600)   # under torchrun; one process otherwise
    with failure_guard(topology):
        ...                                           # sample, train, save
    shutdown(topology)

Layout. The world's ranks form a (dp, cp) DeviceMesh, rank = dp_rank * cp + cp_rank: the ranks
of one context-parallel group, which pass K/V around the ring in every layer, are neighbours
(on one host when --nproc-per-node is a multiple of cp). NCCL on GPUs (one rank per GPU,
cuda:LOCAL_RANK), gloo on CPUs. How the groups are used: spell_core/distributed/sharded_training.py (FSDP2),
spell_core/selfplay/data_parallel.py (rollouts) and spell_core/distributed/context_parallel.py (zigzag sharding, ring
attention). The small collectives every side uses (agreed, all_reduce_sum, all_gather_objects)
live at the end of this file.

Failures. Collectives time out (init_process_group(timeout=...)). A watchdog thread on every
rank heartbeats through the rendezvous TCPStore (torchrun's agent hosts it, or rank 0) and
watches the other ranks: one silent for `heartbeat_s` (killed, crashed, out of memory, host
gone), or one stuck at an earlier phase than this rank for `timeout_s` (hung: the phases are
the `Topology.mark` calls every rank makes in the same order), makes this rank print a
message naming it and exit with code RANK_FAILURE_EXIT_CODE. It exits with os._exit: the main
thread may be blocked inside a collective that nothing else can interrupt. Checkpoints are
written atomically (train_state.py), so the last complete one stays usable. timeout_s
(--dist-timeout) bounds every wait of one rank on another, so it must exceed the longest
legitimate one: the spread of the ranks' generation times, and rank 0 writing a checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Topology", "DistributedSetupError", "RankFailure", "Watchdog", "validate_sizes", "launch_env",
           "init_distributed", "shutdown", "failure_guard", "log_other_ranks_to_files", "RANK_FAILURE_EXIT_CODE",
           "DEFAULT_TIMEOUT_S", "DEFAULT_HEARTBEAT_S", "agreed", "all_reduce_sum",
           "all_gather_objects", "process_group_ready"]

RANK_FAILURE_EXIT_CODE = 75  # EX_TEMPFAIL: another rank failed; resuming from the last checkpoint may work
DEFAULT_TIMEOUT_S = 600.0  # collectives, and how long a rank may stay stuck behind the others
DEFAULT_HEARTBEAT_S = 60.0  # silence after which a rank counts as dead (at most timeout_s)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(ValueError):
    """World, CP or DP sizes (or the launch environment) do not fit; the message says what to change."""


class RankFailure(RuntimeError):
    """A collective failed on this rank; the message names the rank at fault when one is known."""


def validate_sizes(world_size: int, cp: int) -> int:
    """The data-parallel size dp = world_size / cp, or DistributedSetupError."""
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise DistributedSetupError(f"--cp must be a positive integer (ranks per context-parallel group), got {cp!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise DistributedSetupError(f"the world size must be a positive integer, got {world_size!r}")
    if cp > world_size:
        hint = ("launch with torchrun --nproc-per-node N (N a multiple of the CP size)" if world_size == 1
                else f"use --cp {world_size} or fewer, or launch more processes")
        raise DistributedSetupError(f"--cp {cp} needs at least {cp} processes, but the world has {world_size}: {hint}")
    if world_size % cp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise DistributedSetupError(
            f"--cp {cp} does not divide the world size {world_size}: the data-parallel size would be "
            f"{world_size / cp:g}; use --cp in {divisors} or a world size that is a multiple of {cp}")
    return world_size // cp


def launch_env(environ=None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None when not launched by it."""
    env = os.environ if environ is None else environ
    present = [k for k in _TORCHRUN_VARS if k in env]
    if not present:
        return None
    missing = [k for k in _TORCHRUN_VARS if k not in env]
    if missing:
        raise DistributedSetupError(f"incomplete torchrun environment: {', '.join(present)} set but "
                                    f"{', '.join(missing)} missing; launch with torchrun --nproc-per-node N -m "
                                    "spell_core.run ..., or unset them for a single process")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError as err:
        raise DistributedSetupError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedSetupError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                                    f"LOCAL_RANK={local}")
    return rank, world, local


@dataclass
class Topology:
    """Where this process sits: its rank, the (dp, cp) mesh and the groups of each dimension.
    A single process is Topology() (no process group; every group is None)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cp: int = 1
    dp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: object = None  # DeviceMesh (dp, cp)
    world_mesh: object = None  # DeviceMesh (world,): what FSDP2 shards over
    watchdog: Watchdog | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def dp_group(self):
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def cp_group(self):
        return self.mesh.get_group("cp") if self.mesh is not None else None

    @property
    def world_group(self):
        return dist.group.WORLD if self.is_distributed else None

    def mark(self, phase: str) -> None:
        """Record that this rank entered `phase` (every rank marks the same phases in the same
        order); a rank left behind at an earlier phase for timeout_s is reported as hung."""
        if self.watchdog is not None:
            self.watchdog.mark(phase)

    def describe(self) -> str:
        if not self.is_distributed:
            return "1 process (no data or context parallelism)"
        return (f"rank {self.rank} of {self.world_size} ({self.backend}, {self.device}): data parallel "
                f"{self.dp} x context parallel {self.cp}; dp_rank {self.dp_rank}, cp_rank {self.cp_rank}")


def init_distributed(cp: int = 1, *, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     heartbeat_s: float | None = None, environ=None) -> Topology:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs), build the (dp, cp)
    mesh and start the watchdog. Without torchrun's environment: a single process (cp must
    be 1). device: auto (cuda:LOCAL_RANK when CUDA is available), cpu or cuda."""
    if not timeout_s > 0:
        raise DistributedSetupError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    heartbeat_s = min(DEFAULT_HEARTBEAT_S, timeout_s) if heartbeat_s is None else heartbeat_s
    if not heartbeat_s > 0:
        raise DistributedSetupError(f"heartbeat_s must be > 0 seconds, got {heartbeat_s}")
    launched = launch_env(environ)
    use_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if launched is None:
        validate_sizes(1, cp)
        return Topology(device=torch.device("cuda" if use_cuda else "cpu"), timeout_s=timeout_s)
    rank, world, local_rank = launched
    dp = validate_sizes(world, cp)
    if world == 1:  # torchrun --nproc-per-node 1: nothing to coordinate
        return Topology(device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
                        timeout_s=timeout_s)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK {local_rank} but this host has {torch.cuda.device_count()} "
                                        "GPU(s): use --nproc-per-node at most the number of GPUs")
        dev, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        raise DistributedSetupError("a torch.distributed process group already exists in this process")
    # a little longer than the watchdog's own bounds, so that its message naming the rank comes first
    pg_timeout = datetime.timedelta(seconds=timeout_s + 2 * heartbeat_s)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=pg_timeout, **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    world_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("world",))
    watchdog = Watchdog(_watchdog_store(environ, heartbeat_s), rank, world, heartbeat_s, timeout_s)
    watchdog.start()
    return Topology(rank, world, local_rank, cp, dp, dev, backend, mesh, world_mesh, watchdog, timeout_s)


def shutdown(topology: Topology) -> None:
    """A clean finish: tell the other ranks this one leaves on purpose, wait for all of them,
    destroy the process group. After an error do not call it, just exit: the other ranks then
    see this rank fall silent and exit naming it, instead of waiting at their next collective."""
    if topology.watchdog is not None:
        topology.watchdog.stop()
    if topology.is_distributed and dist.is_initialized():
        dist.barrier()  # nobody (rank 0 may host the store) leaves while another still talks to it
        dist.destroy_process_group()


def log_other_ranks_to_files(topology: Topology, folder) -> None:
    """Ranks other than 0 print into folder/rank<N>.log instead of the terminal (errors still
    reach stderr), so a run's console shows one rank's progress, not N interleaved copies."""
    if topology.is_main:
        return
    from pathlib import Path

    path = Path(folder) / f"rank{topology.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = open(path, "a", buffering=1)


@contextlib.contextmanager
def failure_guard(topology: Topology):
    """Turn a failed collective into RankFailure naming the rank at fault. When another rank
    died, the watchdog finds it within its heartbeat window and exits this process with its
    message; when none is found the collective's own error is wrapped."""
    try:
        yield
    except (KeyboardInterrupt, DistributedSetupError):
        raise
    except Exception as err:
        watchdog = topology.watchdog
        if watchdog is None or not _is_communication_error(err):
            raise
        verdict = watchdog.wait_for_verdict(watchdog.heartbeat_s + 3 * watchdog.interval_s)
        raise RankFailure(f"rank {topology.rank}: " + (verdict or f"a collective failed and no other rank is "
                                                       f"known to have died or hung: {err}")) from err


def _is_communication_error(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def _watchdog_store(environ, heartbeat_s: float):
    """A client connection of its own to the rendezvous store (the main thread keeps its own),
    under a prefix per torchrun restart so that a restarted job never reads stale beats."""
    env = os.environ if environ is None else environ
    timeout = datetime.timedelta(seconds=max(heartbeat_s, 5.0))
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    except (KeyError, ValueError, RuntimeError):
        store = dist.distributed_c10d._get_default_store()
    return dist.PrefixStore(f"spell-watchdog/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


# --- the watchdog ------------------------------------------------------------------------------

class Watchdog:
    """Heartbeats of every rank through a shared store (counters, so no two clocks are compared).

    Every `interval_s` this rank adds 1 to its own beat counter and reads the others': a
    counter unchanged for `heartbeat_s` by this rank's clock means that rank is gone; a rank
    whose phase counter (see `mark`) stays below this rank's for `hang_s` is stuck. Either
    calls `on_failure(message)`; the default prints the message and exits the process."""

    def __init__(self, store, rank: int, world_size: int, heartbeat_s: float, hang_s: float,
                 interval_s: float | None = None, on_failure=None, clock=time.monotonic):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.heartbeat_s, self.hang_s = float(heartbeat_s), float(hang_s)
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.1, heartbeat_s / 5))
        self.on_failure = on_failure or _exit_naming_the_failure
        self.clock = clock
        self.phases: list[str] = []
        self.verdict: str | None = None
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last counter seen, when it changed)
        self._behind: dict[int, tuple[int, float]] = {}  # rank -> (its phase, since when it lags behind)
        self._store_lost_since: float | None = None
        self._stopped = threading.Event()
        self._found = threading.Event()
        self._lock = threading.Lock()  # the main thread's marks and this thread's rounds share one store client
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)
        self._thread = threading.Thread(target=self._run, name="spell-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(Exception), self._lock:
            self.store.add(f"done/{self.rank}", 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def mark(self, phase: str) -> None:
        with self._lock:
            self.phases.append(phase)
            self.store.add(f"phase/{self.rank}", 1)

    def wait_for_verdict(self, timeout_s: float) -> str | None:
        self._found.wait(timeout_s)
        return self.verdict

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            verdict = self.check()
            if verdict is not None and not self._stopped.is_set():
                self.verdict = verdict
                self._found.set()
                self.on_failure(f"rank {self.rank}: {verdict}")
                return

    def check(self) -> str | None:
        """One round: beat, read the others; a message naming the failed rank, or None."""
        with self._lock:
            return self._check(self.clock())

    def _check(self, now: float) -> str | None:
        try:
            self.store.add(f"beat/{self.rank}", 1)
            others = [(r, self.store.add(f"beat/{r}", 0), self.store.add(f"phase/{r}", 0))
                      for r in range(self.world_size) if r != self.rank and not self.store.add(f"done/{r}", 0)]
        except Exception as err:  # noqa: BLE001 - any store failure means the store's host is gone
            if self._store_lost_since is None:
                self._store_lost_since = now
            if now - self._store_lost_since >= self.heartbeat_s:
                return (f"lost the rendezvous store for {now - self._store_lost_since:.0f} s: its host (the torchrun "
                        f"agent, or rank 0 without torchrun) died or is unreachable ({err})")
            return None
        self._store_lost_since = None
        mine = len(self.phases)
        for r, beat, phase in others:
            last = self._beats.get(r)
            if last is None or last[0] != beat:
                self._beats[r] = (beat, now)
            elif now - last[1] >= self.heartbeat_s:
                return (f"rank {r} stopped responding: no heartbeat for {now - last[1]:.0f} s (it died: killed, "
                        "crashed or out of memory, or its host is unreachable)")
            if phase < mine:
                since = self._behind.get(r)
                if since is None or since[0] != phase:
                    self._behind[r] = (phase, now)
                elif now - since[1] >= self.hang_s:
                    return (f"rank {r} hung: it has been in phase '{self._phase_name(phase)}' for "
                            f"{now - since[1]:.0f} s while this rank reached '{self._phase_name(mine)}' "
                            f"(--dist-timeout {self.hang_s:.0f} s)")
            else:
                self._behind.pop(r, None)
        return None

    def _phase_name(self, count: int) -> str:
        return self.phases[count - 1] if 0 < count <= len(self.phases) else ("start" if count == 0 else f"#{count}")


def _exit_naming_the_failure(message: str) -> None:
    print(f"spell: error: {message}. Exiting (code {RANK_FAILURE_EXIT_CODE}); the last complete checkpoint "
          "stays usable: relaunch with --resume.", file=sys.stderr, flush=True)
    os._exit(RANK_FAILURE_EXIT_CODE)


# --- small collectives -----------------------------------------------------------------------

def agreed(flag: bool, topology: Topology) -> bool:
    """True on every rank when `flag` is true on any (a stop request, an abandoned step).
    Collective: every rank calls it at the same point."""
    if not topology.is_distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=topology.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] > 0)


def all_reduce_sum(value: float, topology: Topology, group=None) -> float:
    """`value` summed over `group` (default: the world); `value` itself in a single process."""
    if not topology.is_distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=topology.device)
    dist.all_reduce(t, group=group)
    return float(t[0])


def process_group_ready(group=None) -> bool:
    """Whether collectives over `group` (None: the world, of more than one rank) can run."""
    return dist.is_available() and dist.is_initialized() and (group is not None or dist.get_world_size() > 1)


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj` (picklable), by rank in `group`; [obj] in a single process. Collective."""
    if not process_group_ready(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
