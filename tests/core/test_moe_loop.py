"""The self-play loop on a tiny random Qwen3-MoE on CPU (issue 22): the real sampler's expert
records travel through the loop to the trainer, which replays them (every PPO ratio is 1);
`python -m spell_core.run --model <MoE folder>` end to end (sample, replay, update, checkpoint
that transformers loads, resume equal to an uninterrupted run), expert loads in metrics.jsonl."""
import json

import pytest
import torch
from safetensors.torch import load_file

from spell_core.data.documents import build_clusters, load_documents
from spell_core.models.model import load_pretrained
from spell_core.run import main
from spell_core.sampling import sampler
from spell_core.selfplay.batch import Trajectory
from spell_core.selfplay.config import RunConfig
from spell_core.selfplay.loop import SelfPlay
from spell_core.training import train_state
from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.scripted import make_tiny_corpus, random_play, scripted_generate
from tests.core.tiny_models import make_tiny_moe_model

TIMING = ("time_", "step_time_s", "train_step_time_s", "cpu_", "step_cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from spell_core.models.assets import resolve_model

    folder = make_tiny_moe_model(tmp_path_factory.mktemp("tiny-moe"), resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")
    return folder, corpus


def test_the_real_samplers_experts_reach_the_trainer_through_the_loop(assets):
    folder, corpus = assets
    model, tokenizer = load_pretrained(folder)
    config = RunConfig()
    config.sampling.group_size, config.sampling.max_response_tokens = 2, 8
    config.loop.questions, config.loop.max_rounds = 2, 1
    result = SelfPlay(model, tokenizer, build_clusters(load_documents(corpus), tokenizer, 2048), config).step()
    load = result.metrics["expert_load"]  # the sampler's: 2 MoE layers x 8 experts, k = 2 slots per token
    assert len(load) == 2 and all(len(layer) == 8 for layer in load)
    assert sum(load[0]) == sum(load[1]) > 0 and sum(load[0]) % 2 == 0
    assert result.metrics["expert_load_imbalance"] >= 1
    # every sample of the step, trained with a made-up advantage: the trainer replays its experts
    samples = [(q.prompt_ids, q.sample) for q in result.questions]
    samples += [(q.responder.prompt_ids, s) for q in result.questions if q.responder for s in q.responder.samples]
    trajs = [Trajectory("questioner", p, s.token_ids, s.logprobs, (-1.0) ** i, routing=s.routing)
             for i, (p, s) in enumerate(samples)]
    assert all(t.routing is not None for t in trajs)
    metrics = Trainer(model, TrainerOptions(temperature=config.sampling.temperature)).train_step(trajs)
    assert not metrics["skipped"]
    assert abs(metrics["ratio_min"] - 1) < 1e-4 and abs(metrics["ratio_max"] - 1) < 1e-4
    assert sum(metrics["expert_load"][0]) == 2 * metrics["tokens_forwarded"]


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(sampler, "generate", scripted_generate(random_play, real_logprobs=True))


def argv(assets, out, *extra):
    folder, corpus = assets
    return ["--model", str(folder), "--corpus", str(corpus), "--out", str(out), "--ctx", "2k", "--device", "cpu",
            "--questions", "3", "--group-size", "3", "--max-new-tokens", "32", "--seed", "5", "--no-progress",
            "--kept-groups", "1", "--max-rounds", "4", *extra]


def metrics_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_trains_checkpoints_and_resumes_a_moe_model(assets, scripted, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(argv(assets, straight, "--steps", "2")) == 0
    stdout = capsys.readouterr().out
    assert "routing_replay" in stdout and "qwen3_moe" in stdout
    assert sum(" | experts max/mean sample " in line and " train " in line
               for line in stdout.splitlines() if line.startswith("step ")) == 2
    assert main(argv(assets, split, "--steps", "1")) == 0
    assert main(argv(assets, split, "--steps", "2", "--resume")) == 0
    a, b = metrics_lines(straight), metrics_lines(split)
    for m in a:
        assert m["trajectories_responder"] > 0 and not m["train_skipped"]
        assert abs(m["train_ratio_min"] - 1) < 1e-4 and abs(m["train_ratio_max"] - 1) < 1e-4  # replayed
        assert len(m["expert_load"]) == len(m["train_expert_load"]) == 2
        assert sum(m["train_expert_load"][0]) == 2 * m["train_tokens_forwarded"]
    assert [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in a] == \
        [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in b]
    wa, wb = (load_file(train_state.find_latest(o) / "model.safetensors") for o in (straight, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the update moved the experts and the router, and the checkpoint is one transformers loads
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(train_state.find_latest(straight), dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.num_experts == 8
    before = AutoModelForCausalLM.from_pretrained(assets[0], dtype=torch.float32).state_dict()
    after = hf.state_dict()
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(".mlp.gate." in k for k in moved) and any(".mlp.experts." in k for k in moved)
