"""Data parallel training on gloo processes against the single-process trainer; checkpoints
across world sizes; a killed rank; size validation; the watchdog; the rollout helpers.

The oracle of a distributed step is the single-process Trainer (itself checked against a
float64 transformers oracle in test_trainer.py) on the union of the ranks' trajectories,
computed here in the parent process. Ranks are forked (they inherit the imported modules:
a spawned rank would spend seconds importing torch) and join through torchrun's environment
variables, so `init_distributed` runs exactly as under torchrun.

Tolerances (float64 models): loss and gradient norm rel 1e-9; weights after the AdamW step
within 1e-9 x lr. AdamW's eps is 1e-3 here so that an update is a smooth function of the
gradient (with eps 1e-8 a gradient element near 0 turns a 1e-16 difference into a visible
step); the context-parallel tests compare two packings whose gradients round differently in
the model's fp32 RMSNorm, so those use 1e-5 x lr.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spell_kernels
from spell_core.selfplay import data_parallel
from spell_core.distributed import sharded_training
from spell_core.training import train_state
from spell_core.selfplay.batch import Trajectory
from spell_core.distributed.process_groups import (RANK_FAILURE_EXIT_CODE, DistributedSetupError, Topology, Watchdog,
                                    failure_guard, init_distributed, launch_env, shutdown, validate_sizes)
from spell_core.models.model import CausalLM, ModelConfig
from spell_core.training.trainer import Trainer, TrainerOptions

VOCAB = 61
RAW_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)
OPTIONS = dict(lr=1e-2, eps=1e-3, temperature=0.7, micro_batch_tokens=24, grad_clip=1.0)
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def tiny_model(seed=0, **config) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf({**RAW_CONFIG, **config})).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def make_batch(seed):
    """Groups (whole, as the loop hands them over): a responder group of 4 sharing a prompt, a
    verifier group of 3, three questioner samples of two task types, one empty response."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    spec = [("responder", "resp:a", 13, [5, 1, 7, 3]), ("verifier", "ver:a", 9, [2, 6, 4]),
            ("questioner", "q:1", 11, [8]), ("questioner", "q:2", 5, [3]), ("questioner", "q:3", 7, [6]),
            ("responder", "resp:b", 6, [0])]
    out = []
    for i, (role, group, prompt_len, lengths) in enumerate(spec):
        prompt = tokens(prompt_len)
        for n in lengths:
            old = (-4.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
            reward = float(torch.rand(1, generator=g))
            out.append(Trajectory(role, prompt, tokens(n), old, 3.0 * float(torch.randn(1, generator=g)), reward,
                                  group, {"task_type": ("doc_qa", "doc_math")[i % 2]}))
    return out


def split_groups(trajectories, parts):
    """Whole groups to each part, round robin in order of first appearance."""
    order = list(dict.fromkeys(t.group for t in trajectories))
    return [[t for t in trajectories if order.index(t.group) % parts == p] for p in range(parts)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank, world_size, port):
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _rank_main(rank, world_size, cp, port, scenario, out_dir, args):
    os.environ.update(torchrun_env(rank, world_size, port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    topology = init_distributed(cp, device="cpu", timeout_s=120, heartbeat_s=60)
    try:
        torch.save(scenario(topology, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown(topology)


def run_ranks(world_size, scenario, out_dir, *args, cp=1):
    """Run scenario(topology, *args) on world_size forked gloo ranks; their results, by rank."""
    mp.start_processes(_rank_main, args=(world_size, cp, free_port(), scenario, str(out_dir), args),
                       nprocs=world_size, start_method=START_METHOD)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def train_scenario(topology, checkpoint_in, checkpoint_out, shares, options, dtype=torch.float64):
    """Resume a single-process checkpoint, train one step on this rank's share, save."""
    model = tiny_model(seed=123).to(dtype)  # other weights: the checkpoint must overwrite them
    trainer = Trainer(model, TrainerOptions(**options), topology)
    train_state.load(checkpoint_in, model, trainer.optimizer)
    trajectories = data_parallel.gather_for_context_parallel(shares[topology.rank], topology)
    metrics = trainer.train_step(trajectories)
    train_state.save(checkpoint_out, 2, model, None, trainer.optimizer, {"saved_by": topology.world_size})
    return {"metrics": metrics, "trained": len(trajectories), "extra": sample_and_normalise(topology, model, shares)}


def sample_and_normalise(topology, model, shares):
    """Rollout helpers on the same ranks: per-rank generation with full weights, questioner
    advantages across ranks, the merged self-play state."""
    if topology.cp > 1:
        return {}
    ids = torch.arange(3 + 4 * topology.rank) % VOCAB
    with sharded_training.sampling_weights(model), torch.inference_mode():
        # what the sampler calls; ranks run different numbers of forwards
        hidden = [model.forward_hidden(ids) for _ in range(1 + 2 * topology.rank)]
    questioners = [t for t in shares[topology.rank] if t.role == "questioner"]
    data_parallel.normalise_questioner_advantages(questioners, topology.world_group, eps=1e-6)
    state = {"memory": {"capacity": 3, "new_documents": 5, "queues": [
        {"cluster_id": f"c{topology.rank}", "task_type": "doc_qa", "entries": []}]}, "rng": [3, [topology.rank], None],
        "steps_done": 4}
    merged = data_parallel.merged_self_play_state(state, topology.world_group)
    return {"hidden": hidden[-1], "questioner_advantages": [t.advantage for t in questioners], "merged": merged}


def single_process_reference(tmp_path, options, batches, dtype=torch.float64):
    """Step 1 (saved as the common starting point), then step 2 on the whole second batch."""
    model = tiny_model().to(dtype)
    trainer = Trainer(model, TrainerOptions(**options))
    trainer.train_step(batches[0])
    start = train_state.save(tmp_path / "single", 1, model, None, trainer.optimizer)
    metrics = trainer.train_step(batches[1])
    return model, trainer, start, metrics


def assert_same_state(resumed, resumed_trainer, model, trainer, weight_tol, state_rel=1e-8):
    for (name, p), (_, q) in zip(resumed.named_parameters(), model.named_parameters()):
        err = float((p - q).detach().abs().max())
        assert err <= weight_tol, f"{name}: weights differ by {err:.3g} (tolerance {weight_tol:.3g})"
    ours, theirs = resumed_trainer.optimizer.state_dict(), trainer.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for i, state in theirs["state"].items():
        assert float(ours["state"][i]["step"]) == float(state["step"]) == 2
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(state[key].abs().max()) + 1e-30
            assert float((ours["state"][i][key] - state[key]).abs().max()) <= state_rel * scale, (i, key)


def check_distributed_step(tmp_path, world_size, cp, options, weight_tol, rel=1e-9, dtype=torch.float64):
    """DP x CP ranks resume a single-process checkpoint, train one step on their shares, save;
    the loss, gradient norm and (resumed on one process) weights and AdamW state equal the
    single-process step on all trajectories."""
    batches = [make_batch(1), make_batch(2)]
    model, trainer, start, reference = single_process_reference(tmp_path, options, batches, dtype)
    shares = split_groups(batches[1], world_size)
    ranks = run_ranks(world_size, train_scenario, tmp_path, start, tmp_path / "ranks", shares, options, dtype, cp=cp)

    for r, result in enumerate(ranks):
        m = result["metrics"]
        assert not m["skipped"], m
        assert m["loss"] == pytest.approx(reference["loss"], rel=rel, abs=1e-12), f"rank {r}"
        assert m["grad_norm"] == pytest.approx(reference["grad_norm"], rel=rel), f"rank {r}"
        assert m["ratio_max"] == pytest.approx(reference["ratio_max"], rel=max(rel, 1e-6))
        assert m["clip_frac_high"] == pytest.approx(reference["clip_frac_high"], rel=1e-6)  # stats are fp32
    assert reference["grad_norm"] > OPTIONS["grad_clip"]  # the clipped path is the one compared
    # saved on world_size ranks, resumed on 1: the single-process state after step 2
    resumed = tiny_model(seed=7).to(dtype)
    resumed_trainer = Trainer(resumed, TrainerOptions(**options))
    step, extra = train_state.load(tmp_path / "ranks", resumed, resumed_trainer.optimizer)
    assert (step, extra) == (2, {"saved_by": world_size})
    assert_same_state(resumed, resumed_trainer, model, trainer, weight_tol * options["lr"], state_rel=10 * rel)
    return ranks, model, shares


def test_data_parallel_step_and_checkpoints_equal_single_process(tmp_path):
    ranks, model, shares = check_distributed_step(tmp_path, world_size=2, cp=1, options=OPTIONS, weight_tol=1e-9)
    assert [r["trained"] for r in ranks] == [len(s) for s in shares] and min(len(s) for s in shares) > 0

    # per-rank sampling with gathered weights: each rank's own forwards equal the single-process model's
    for r, result in enumerate(ranks):
        ids = torch.arange(3 + 4 * r) % VOCAB
        with torch.no_grad():
            torch.testing.assert_close(result["extra"]["hidden"], model.forward_hidden(ids), rtol=1e-12, atol=1e-12)
    # questioner advantages normalised per task type over both ranks = one process on the union
    questioners = [t for share in shares for t in share if t.role == "questioner"]
    expected = {}
    for task_type in {t.info["task_type"] for t in questioners}:
        of_type = [t for t in questioners if t.info["task_type"] == task_type]
        adv = spell_kernels.group_advantages(torch.tensor([t.reward for t in of_type], dtype=torch.float64),
                                             mode="batch", eps=1e-6)
        expected.update({id(t): a for t, a in zip(of_type, adv.tolist())})
    got = [a for result in ranks for a in result["extra"]["questioner_advantages"]]
    mine = [t for share in shares for t in share if t.role == "questioner"]
    assert got == pytest.approx([expected[id(t)] for t in mine], rel=1e-12, abs=1e-15)
    assert len({t.info["task_type"] for t in mine}) == 2 and all(len(r["extra"]["questioner_advantages"]) for r in ranks)
    # one memory for the checkpoint: both ranks' clusters, rank 0's generator
    merged = ranks[1]["extra"]["merged"]
    assert [q["cluster_id"] for q in merged["memory"]["queues"]] == ["c0", "c1"]
    assert merged["rng"] == [3, [0], None] and merged == ranks[0]["extra"]["merged"]
    assert merged["rank_rngs"] == [[3, [0], None], [3, [1], None]]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_data_parallel_with_a_rank_that_has_nothing_to_train(tmp_path, checkpointing):
    """Rank 1 gets no trajectory: it still runs the step's collectives (padding micro-batches).
    With gradient checkpointing, FSDP2 all-gathers each layer again for the recomputation."""
    options = {**OPTIONS, "gradient_checkpointing": checkpointing}
    batches = [make_batch(1), make_batch(3)]
    model, trainer, start, reference = single_process_reference(tmp_path, options, batches)
    shares = [batches[1], []]
    ranks = run_ranks(2, train_scenario, tmp_path, start, tmp_path / "ranks", shares, options)
    for result in ranks:
        assert result["metrics"]["loss"] == pytest.approx(reference["loss"], rel=1e-9)
        assert result["metrics"]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-9)
    resumed = tiny_model(seed=7)
    resumed_trainer = Trainer(resumed, TrainerOptions(**options))
    train_state.load(tmp_path / "ranks", resumed, resumed_trainer.optimizer)
    assert_same_state(resumed, resumed_trainer, model, trainer, 1e-9 * options["lr"])


# ---- a killed rank ------------------------------------------------------------------------------

HEARTBEAT_S = 3.0
EXIT_BOUND_S = HEARTBEAT_S + 12.0  # heartbeat window + watchdog interval + a loaded machine's slack


def _doomed_rank(rank, port, out_dir):
    os.environ.update(torchrun_env(rank, 2, port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.stderr = open(os.path.join(out_dir, f"stderr{rank}.txt"), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), 2)  # and C++'s messages
    torch.set_num_threads(1)
    topology = init_distributed(1, device="cpu", timeout_s=60, heartbeat_s=HEARTBEAT_S)
    model = tiny_model()
    trainer = Trainer(model, TrainerOptions(**OPTIONS), topology)
    train_state.save(os.path.join(out_dir, "run"), 1, model, None, trainer.optimizer)
    with failure_guard(topology):
        step = 0
        while True:  # collectives until the other rank is gone
            t = torch.ones(1)
            dist.all_reduce(t)
            step += 1
            if step == 3:
                open(os.path.join(out_dir, f"ready{rank}"), "w").close()
            time.sleep(0.05)


def test_killed_rank_makes_the_other_exit_naming_it(tmp_path):
    ctx = mp.get_context(START_METHOD)
    port = free_port()
    procs = [ctx.Process(target=_doomed_rank, args=(r, port, str(tmp_path)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs), \
                (tmp_path / "stderr0.txt").read_text() + (tmp_path / "stderr1.txt").read_text()
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].join(timeout=EXIT_BOUND_S + 30)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    message = (tmp_path / "stderr0.txt").read_text()
    assert procs[0].exitcode == RANK_FAILURE_EXIT_CODE, message
    assert "rank 1" in message and "no heartbeat" in message, message
    assert elapsed <= EXIT_BOUND_S, f"rank 0 took {elapsed:.1f} s to exit (bound {EXIT_BOUND_S} s)"
    # the checkpoint written before the failure stays usable
    model = tiny_model(seed=5)
    assert train_state.load(tmp_path / "run", model, Trainer(model).optimizer)[0] == 1
    torch.testing.assert_close(dict(model.named_parameters()), dict(tiny_model().named_parameters()))


# ---- the watchdog on a fake clock -------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_watchdog_names_a_silent_rank_after_the_heartbeat_window():
    store, clock = dist.HashStore(), FakeClock()
    dogs = [Watchdog(store, r, 3, heartbeat_s=10, hang_s=100, clock=clock) for r in range(3)]
    for step in range(5):  # all three beat: nothing to report
        clock.now = 4.0 * step
        assert all(d.check() is None for d in dogs)
    for t in (20.0, 25.0, 29.9):  # rank 2 stops beating at t = 16
        clock.now = t
        assert dogs[0].check() is None and dogs[1].check() is None
    clock.now = 30.5
    verdict = dogs[0].check()
    assert verdict is not None and "rank 2" in verdict and "no heartbeat" in verdict


def test_watchdog_ignores_a_rank_that_left_on_purpose():
    store, clock = dist.HashStore(), FakeClock()
    dogs = [Watchdog(store, r, 2, heartbeat_s=10, hang_s=100, clock=clock) for r in range(2)]
    assert dogs[0].check() is None and dogs[1].check() is None
    dogs[1].stop()
    clock.now = 50.0
    assert dogs[0].check() is None


def test_watchdog_names_a_rank_stuck_at_an_earlier_phase():
    store, clock = dist.HashStore(), FakeClock()
    dogs = [Watchdog(store, r, 2, heartbeat_s=10, hang_s=60, clock=clock) for r in range(2)]
    for d in dogs:
        d.mark("sample step 1")
    dogs[0].mark("train step 1")  # rank 1 never gets there, but keeps beating
    for t in range(0, 60, 5):
        clock.now = float(t)
        assert dogs[0].check() is None and dogs[1].check() is None
    clock.now = 61.0
    dogs[1].check()
    verdict = dogs[0].check()
    assert verdict is not None and "rank 1 hung" in verdict and "'sample step 1'" in verdict
    assert "'train step 1'" in verdict


def test_watchdog_reports_a_lost_store():
    class DeadStore:
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    clock = FakeClock()
    dog = Watchdog(DeadStore(), 1, 2, heartbeat_s=10, hang_s=60, clock=clock)
    assert dog.check() is None
    clock.now = 10.5
    assert "lost the rendezvous store" in dog.check()


# ---- sizes and launch environment -------------------------------------------------------------

@pytest.mark.parametrize("world, cp, dp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (8, 2, 4), (8, 8, 1), (6, 3, 2)])
def test_valid_sizes_give_the_data_parallel_size(world, cp, dp):
    assert validate_sizes(world, cp) == dp


@pytest.mark.parametrize("world, cp, message", [
    (4, 3, r"--cp 3 does not divide the world size 4.*\[1, 2, 4\]"),
    (2, 4, r"--cp 4 needs at least 4 processes, but the world has 2"),
    (1, 2, r"launch with torchrun --nproc-per-node"),
    (4, 0, r"--cp must be a positive integer"),
    (4, 1.5, r"--cp must be a positive integer"),
])
def test_bad_sizes_are_refused_with_what_to_change(world, cp, message):
    with pytest.raises(DistributedSetupError, match=message):
        validate_sizes(world, cp)


def test_launch_environment():
    assert launch_env({}) is None
    assert launch_env(torchrun_env(1, 4, 29500)) == (1, 4, 1)
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR, MASTER_PORT missing"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedSetupError, match="inconsistent"):
        launch_env(torchrun_env(4, 4, 29500))


def test_single_process_without_torchrun():
    topology = init_distributed(1, device="cpu", environ={})
    assert not topology.is_distributed and topology.dp == topology.cp == 1 and topology.dp_group is None
    with pytest.raises(DistributedSetupError, match="--cp 2 needs at least 2 processes"):
        init_distributed(2, device="cpu", environ={})
    alone = init_distributed(1, device="cpu", environ=torchrun_env(0, 1, 29500))  # torchrun --nproc-per-node 1
    assert not alone.is_distributed and not dist.is_initialized()
    with pytest.raises(DistributedSetupError, match="--dist-timeout must be > 0"):
        init_distributed(1, device="cpu", timeout_s=0, environ={})


def test_failure_guard_leaves_ordinary_errors_alone():
    with pytest.raises(ValueError, match="not a collective"):
        with failure_guard(Topology()):
            raise ValueError("not a collective")


# ---- rollout shares ---------------------------------------------------------------------------

@pytest.mark.parametrize("total, world", [(128, 8), (7, 3), (2, 4), (0, 2)])
def test_rollout_shares_add_up(total, world):
    shares = [data_parallel.rollout_share(total, r, world) for r in range(world)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_cluster_shares_are_disjoint_and_cover_everything():
    clusters = list(range(10))
    shares = [data_parallel.shard_clusters(clusters, r, 4) for r in range(4)]
    assert sorted(c for s in shares for c in s) == clusters
    assert data_parallel.shard_clusters([0, 1], 3, 4) == [1]  # fewer clusters than ranks: shared round robin


def test_rank_config_splits_questions_and_groups_and_seeds():
    from spell_core.selfplay.config import RunConfig

    config = RunConfig()
    per_rank = [data_parallel.rank_run_config(config, r, 3) for r in range(3)]
    assert sum(c.loop.questions for c in per_rank) == config.loop.questions
    assert sum(c.loop.kept_groups for c in per_rank) == config.loop.kept_groups
    assert per_rank[0].seed == config.seed and len({c.seed for c in per_rank}) == 3
    assert data_parallel.rank_run_config(config, 0, 1) is config


def test_self_play_state_for_each_rank():
    import random

    def rng_state(seed):
        version, internal, gauss = random.Random(seed).getstate()
        return [version, list(internal), gauss]

    state = {"memory": {}, "rng": rng_state(5), "steps_done": 2}
    # saved by one process, resumed on three: rank 0 keeps the generator, the others derive their own
    assert data_parallel.self_play_state_for_rank(state, 0, 3) is state
    derived = [data_parallel.self_play_state_for_rank(state, r, 3) for r in (1, 2)]
    assert derived[0]["rng"] != derived[1]["rng"] and state["rng"] not in (derived[0]["rng"], derived[1]["rng"])
    assert derived[0]["steps_done"] == 2 and data_parallel.self_play_state_for_rank(state, 1, 3) == derived[0]
    # saved by two ranks, resumed on two: each rank gets its own generator back
    saved = {**state, "rank_rngs": [rng_state(5), rng_state(6)]}
    assert data_parallel.self_play_state_for_rank(saved, 1, 2)["rng"] == rng_state(6)
    assert data_parallel.self_play_state_for_rank(saved, 0, 2)["rng"] == rng_state(5)


# ---- torchrun end to end ---------------------------------------------------------------------

def test_torchrun_self_play_with_cp_2_then_resume_on_one_process(run_assets, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m spell_core.run --cp 2` (the model's outputs scripted,
    tests/core/scripted.py): both ranks generate their share, train one CP = 2 step each step,
    rank 0 logs and saves; the run then resumes on one process for a third step."""
    from spell_core.run import main
    from tests.core.test_run import ROOT, argv, metrics_lines

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.core.scripted", *argv(run_assets, out, "--steps", "2", "--cp", "2", "--dist-timeout", "120")]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ranks       rank 0 of 2 (gloo, cpu): data parallel 1 x context parallel 2" in done.stdout
    assert "rank 1 of 2" in (out / "logs" / "rank1.log").read_text()
    lines = metrics_lines(out)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["trajectories_world"] >= 1 and not m.get("train_skipped") for m in lines), lines
    assert train_state.find_latest(out).name == "step-000002"

    assert main(argv(run_assets, out, "--steps", "3", "--resume")) == 0
    assert "resumed     from" in capsys.readouterr().out
    assert [m["step"] for m in metrics_lines(out)] == [1, 2, 3]


def test_run_refuses_a_cp_that_does_not_divide_the_world(run_assets, tmp_path, monkeypatch, capsys):
    from spell_core.run import main
    from tests.core.test_run import argv

    for key, value in torchrun_env(0, 4, free_port()).items():
        monkeypatch.setenv(key, value)
    assert main(argv(run_assets, tmp_path / "o", "--cp", "3")) == 1
    assert "--cp 3 does not divide the world size 4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    from spell_core.models.assets import resolve_model
    from tests.core.scripted import make_tiny_corpus, make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("tiny-model"), resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")
    return model, corpus


def bf16_scenario(topology, shares):
    """A bf16 model sharded by the Trainer, one step at lr 2e-6 on this rank's share."""
    model = tiny_model(seed=0).to(torch.bfloat16)
    start = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model, TrainerOptions(lr=2e-6, temperature=0.7, micro_batch_tokens=24), topology)
    stepped = {str(p.dtype) for p in trainer.optimizer.param_groups[0]["params"]}
    metrics = trainer.train_step(shares[topology.rank])
    after = {name: p.full_tensor() for name, p in model.named_parameters()}
    with sharded_training.sampling_weights(model), torch.inference_mode():
        hidden = model.forward_hidden(torch.arange(5) % VOCAB)
    return {"stepped": stepped, "metrics": metrics, "start": start, "after": after, "hidden_dtype": str(hidden.dtype)}


def test_a_bf16_model_is_sharded_as_fp32_master_weights_computed_in_bf16(tmp_path):
    """FSDP2 keeps fp32 master weights for a bf16 model (MixedPrecisionPolicy): AdamW steps fp32
    shards, so an update of ~2e-6 (far below half a bf16 ulp at these weights, ~8e-4) is kept,
    while the forward gathers bf16 weights."""
    shares = split_groups(make_batch(2), 2)
    ranks = run_ranks(2, bf16_scenario, tmp_path, shares)
    for r in ranks:
        assert r["stepped"] == {"torch.float32"} and r["hidden_dtype"] == "torch.bfloat16"
        assert not r["metrics"]["skipped"], r["metrics"]
    deltas = torch.cat([(ranks[0]["after"][n].double() - w.double()).flatten() for n, w in ranks[0]["start"].items()])
    near_lr = ((deltas.abs() > 0.5e-6) & (deltas.abs() < 4e-6)).double().mean()
    assert float(near_lr) > 0.5, f"only {float(near_lr):.1%} of the weights moved by about lr"
    for name in ranks[0]["after"]:
        assert torch.equal(ranks[0]["after"][name], ranks[1]["after"][name]), name
