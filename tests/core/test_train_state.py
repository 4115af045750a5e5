"""Training checkpoints: transformers loads the saved model (same logits), resume restores
weights, optimizer and random states (k steps + save + resume + N - k steps == N steps,
bit for bit on CPU), pruning keeps the newest, and a process killed mid-save never leaves an
unloadable latest checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

from spell_core.training import train_state
from spell_core.selfplay.batch import Trajectory
from spell_core.models.checkpoint import CheckpointError
from spell_core.models.model import CausalLM, ModelConfig
from spell_core.training.trainer import Trainer, TrainerOptions

VOCAB = 53
RAW_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6)


def tiny_model(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf(RAW_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def random_trajectories():
    """Drawn from the global random generators (python, numpy, torch), as the loop's sampling
    would: a resumed run only matches the straight one if load restores all three."""
    prompt = torch.randint(0, VOCAB, (random.randint(4, 9),)).tolist()
    out = []
    for _ in range(3):
        n = int(np.random.randint(1, 6))
        out.append(Trajectory("responder", prompt, torch.randint(0, VOCAB, (n,)).tolist(),
                              (-3.0 + 0.3 * torch.randn(n)).tolist(), float(torch.randn(1))))
    out.append(Trajectory("questioner", [1, 2, 3], [4, 5], [-2.0, -2.5], random.uniform(-1, 1)))
    return out


def scramble_rng():
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def test_transformers_loads_the_saved_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    model = tiny_model()
    folder = train_state.save(tmp_path, 7, model, tokenizer, None, {"note": "x"})
    assert folder == tmp_path / "checkpoints" / "step-000007"
    assert (folder / "COMPLETE").is_file() and (folder / "rng.pt").is_file()
    assert json.loads((folder / "state.json").read_text())["extra"] == {"note": "x"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (19,))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids[None]).logits[0], model(ids), rtol=0, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"] == [0, 1]
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step-000007"


def test_load_restores_weights_optimizer_and_random_states(tmp_path):
    model = tiny_model(seed=0)
    trainer = Trainer(model, TrainerOptions(lr=1e-2, micro_batch_tokens=64))
    trainer.train_step(random_trajectories())
    generator = torch.Generator().manual_seed(7)
    train_state.save(tmp_path, 1, model, None, trainer.optimizer, {"memory": {"c0": [1, 2]}},
                     generators={"sampler": generator})
    expected = (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(2, generator=generator))

    other = tiny_model(seed=1)
    other_trainer = Trainer(other, TrainerOptions(lr=1e-2))
    scramble_rng()
    fresh_generator = torch.Generator().manual_seed(0)
    step, extra = train_state.load(tmp_path, other, other_trainer.optimizer, generators={"sampler": fresh_generator})
    assert (step, extra) == (1, {"memory": {"c0": [1, 2]}})
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    ours, theirs = trainer.optimizer.state_dict(), other_trainer.optimizer.state_dict()
    for i, state in ours["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], theirs["state"][i][key])
    assert random.random() == expected[0] and float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    assert torch.equal(torch.rand(2, generator=fresh_generator), expected[3])


def test_resume_equals_a_straight_run(tmp_path):
    """4 steps straight vs 2 steps, save, a fresh process's state (other weights, scrambled RNG),
    load, 2 steps: identical weights and metrics."""
    def run(model, trainer, steps):
        return [{k: v for k, v in trainer.train_step(random_trajectories()).items() if k != "step_time_s"}
                for _ in range(steps)]

    options = TrainerOptions(lr=1e-2, micro_batch_tokens=24)
    scramble_rng()
    straight = tiny_model()
    straight_metrics = run(straight, Trainer(straight, options), 4)

    scramble_rng()
    first = tiny_model()
    first_trainer = Trainer(first, options)
    metrics = run(first, first_trainer, 2)
    train_state.save(tmp_path, 2, first, None, first_trainer.optimizer, {"metrics": metrics})

    resumed = tiny_model(seed=3)
    resumed_trainer = Trainer(resumed, options)
    scramble_rng()
    step, extra = train_state.load(tmp_path, resumed, resumed_trainer.optimizer)
    assert step == 2
    metrics = extra["metrics"] + run(resumed, resumed_trainer, 2)
    assert metrics == straight_metrics
    assert all(not m["skipped"] for m in metrics)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_keeps_the_newest_checkpoints(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3):
        train_state.save(tmp_path, step, model, None, None, keep_last=2)
    assert [s for s, _ in train_state.list_checkpoints(tmp_path)] == [2, 3]
    assert train_state.find_latest(tmp_path) == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]
    train_state.save(tmp_path, 3, model, None, None)  # the same step again replaces it
    assert [s for s, _ in train_state.list_checkpoints(tmp_path)] == [2, 3]


def test_clear_errors(tmp_path):
    model = tiny_model()
    assert train_state.find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        train_state.load(tmp_path / "nope", model)
    with pytest.raises(TypeError, match="JSON"):
        train_state.save(tmp_path, 1, model, None, None, {"memory": object()})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train_state.load(tmp_path, model)
    folder = train_state.save(tmp_path, 1, model, None, None)
    (folder / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        train_state.load(folder, model)
    (folder / "COMPLETE").write_text("step 1\n")
    with pytest.raises(CheckpointError, match="optimizer"):
        train_state.load(folder, model, Trainer(model).optimizer)
    with pytest.raises(CheckpointError, match="generator"):
        train_state.load(folder, model, generators={"sampler": torch.Generator()})


# The child saves step 1, changes every weight, and is SIGKILLed while saving step 2 at the
# point named by argv[2] (a write function patched to announce itself and wait). It builds
# tiny_model() itself, without importing this module (transformers' import costs seconds).
_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from spell_core.common import durable
    from spell_core.training import train_state
    from spell_core.models.model import CausalLM, ModelConfig
    out, point, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(raw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    optimizer = torch.optim.AdamW(model.parameters())
    train_state.save(out, 1, model, None, optimizer, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def hang(original, when):
        def wrapper(*args, **kwargs):
            if when(*args):
                print("READY", flush=True)
                time.sleep(60)
            return original(*args, **kwargs)
        return wrapper

    if point == "model_weights":  # inside save_pretrained, weights written, config.json not yet
        durable.write_text = hang(durable.write_text, lambda path, text: path.name == "config.json")
    elif point == "before_marker":  # model, optimizer, rng and state written
        durable.write_text = hang(durable.write_text, lambda path, text: path.name == "COMPLETE")
    elif point == "after_rename":  # step 2 complete and in place, latest link and pruning not done
        train_state._point_latest = hang(train_state._point_latest, lambda *a: True)
    train_state.save(out, 2, model, None, optimizer, {"step": 2})
    print("NOT KILLED", flush=True)
""")
KILL_POINTS = {"model_weights": 1, "before_marker": 1, "after_rename": 2}  # -> the step latest must be


def test_killed_during_save_leaves_a_loadable_latest(tmp_path):
    """One child per kill point, started together (each spends seconds importing torch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = {point: subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / point), point,
                                         json.dumps(RAW_CONFIG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
                for point in KILL_POINTS}
    for point, child in children.items():
        try:
            line = child.stdout.readline()
            if line.strip() == "READY":
                child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            _, err = child.communicate()
        assert line.strip() == "READY", f"{point}: the child never reached the kill point: {line}{err}"

    for point, latest_step in KILL_POINTS.items():
        out = tmp_path / point
        assert train_state.find_latest(out) == out / "checkpoints" / f"step-{latest_step:06d}", point
        model = tiny_model(seed=5)
        step, extra = train_state.load(out, model, torch.optim.AdamW(model.parameters()))
        assert step == latest_step and extra == {"step": latest_step}
        expected = tiny_model()
        for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(a, b + (latest_step - 1)), f"{point}: {name}"
        if point != "after_rename":
            leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
            assert leftovers, point  # the interrupted write's folder, never mistaken for a checkpoint
        train_state.save(out, 3, model, None, None)  # the next save clears what the killed one left
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["latest", f"step-{latest_step:06d}", "step-000003"], point
