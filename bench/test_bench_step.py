"""One self-play step on the CPU: time per stage, and the optimizer update with shared-prefix
packing beside the same update without it (every trajectory its own [prompt + response]).

Default (seconds): a tiny random 2-layer Llama with the default tokenizer, on Shakespeare
clusters of `make run`'s CPU context (2k). SPELL_BENCH_FULL=1: the default model
(SmolLM2-135M-Instruct) with `make run`'s CPU defaults (several minutes).

- test_step: one `SelfPlay.step()` with the real sampler. "as is": exactly `make run`'s
  step (a 135M model's questions are mostly malformed, so later stages may not run);
  "forced questions": the questioner's outputs are replaced by well-formed questions so
  that every stage runs. Stage times are reported as shares of the step.
- test_update: `Trainer.train_step` on the trajectories of a step whose outputs are all
  scripted (well-formed, rewards with variance; 4 questions, 2 kept responder groups),
  shared prefix vs unpacked; extra_info holds the packed token counts.
One torch thread, as `make run` on a CPU.
"""
import copy
import json
import os

import pytest

from spell_core.selfplay.config import RunConfig
from spell_core.data.documents import build_clusters, load_documents
from spell_core.selfplay.loop import STAGES, SelfPlay
from spell_core.run import CPU_DEFAULTS
from tests.core.scripted import make_tiny_model, random_play, role_of, scripted_generate

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """`make run`'s CPU default (--threads 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from spell_core.models.assets import resolve_corpus, resolve_model
    from spell_core.models.model import load_pretrained

    folder = resolve_model("smollm2-135m-instruct") if FULL else make_tiny_model(tmp_path_factory.mktemp("tiny"), resolve_model("smollm2-135m-instruct"))
    model, tokenizer = load_pretrained(folder)
    config = RunConfig()
    config.data.ctx = CPU_DEFAULTS["ctx"]
    config.sampling.max_response_tokens = CPU_DEFAULTS["max_new_tokens"] if FULL else 16
    config.sampling.group_size = CPU_DEFAULTS["group_size"]
    config.loop.questions = CPU_DEFAULTS["questions"]
    config.loop.kept_groups = CPU_DEFAULTS["kept_groups"]
    config.loop.max_rounds = CPU_DEFAULTS["max_rounds"]
    clusters = build_clusters(load_documents(resolve_corpus()), tokenizer, config.cluster_budget)
    return model, tokenizer, clusters, config


def forced_questions(real_generate):
    """The real sampler for every stage but the questioner, whose outputs are scripted."""
    scripted = scripted_generate(random_play, real_logprobs=True)

    def generate(model, tokenizer, prompts, **kwargs):
        if role_of(tokenizer.decode(prompts[0])) == "questioner":
            return scripted(model, tokenizer, prompts, **kwargs)
        return real_generate(model, tokenizer, prompts, **kwargs)
    return generate


@pytest.mark.parametrize("variant", ["as_is", "forced_questions"])
def test_step(benchmark, setup, variant):
    from spell_core.sampling import sampler

    model, tokenizer, clusters, config = setup
    generate = sampler.generate if variant == "as_is" else forced_questions(sampler.generate)
    cfg = copy.deepcopy(config)
    if variant != "as_is":
        cfg.loop.questioner_tokens = 64  # room for the scripted JSON with the tiny model's short limit
    play = SelfPlay(model, tokenizer, clusters, cfg, generate=generate)
    benchmark.group = f"one self-play step ({'SmolLM2-135M' if FULL else 'tiny model'}, make run CPU defaults)"
    result = benchmark.pedantic(play.step, rounds=1, iterations=1)
    m = result.metrics
    total = sum(m[f"time_{s}_s"] for s in STAGES)
    shares = {s: m[f"time_{s}_s"] / total for s in STAGES}
    benchmark.extra_info.update({"stage_share": shares, **{k: v for k, v in m.items() if k.startswith(
        ("time_", "tokens_generated", "questions", "kept_groups", "trajectories"))}})
    print(f"\n{variant}: " + json.dumps(benchmark.extra_info))
    assert m["questions"] == config.loop.questions and abs(sum(shares.values()) - 1) < 1e-9


@pytest.fixture(scope="module")
def scripted_batch(setup):
    model, tokenizer, clusters, config = setup
    cfg = copy.deepcopy(config)
    cfg.loop.questions, cfg.loop.kept_groups = 4, 2  # two responder groups: a CPU update stays in minutes
    cfg.loop.max_rounds = 8  # until they are found
    cfg.loop.questioner_tokens = 64
    play = SelfPlay(model, tokenizer, clusters, cfg, generate=scripted_generate(random_play, real_logprobs=True))
    trajectories = play.step().trajectories
    assert trajectories
    return trajectories


@pytest.mark.parametrize("packing", ["shared_prefix", "unpacked_baseline"])
def test_update(benchmark, setup, scripted_batch, packing):
    from spell_core.training.trainer import Trainer, TrainerOptions

    model, _, _, config = setup
    options = TrainerOptions(micro_batch_tokens=CPU_DEFAULTS["micro_batch_tokens"],
                             shared_prefix=packing == "shared_prefix", lr=0.0)
    trainer = Trainer(model, options)  # lr 0: the weights stay, every round times the same update
    benchmark.group = f"optimizer update on one step's batch ({'SmolLM2-135M' if FULL else 'tiny model'})"
    metrics = benchmark.pedantic(lambda: trainer.train_step(scripted_batch), rounds=2 if FULL else 3,
                                 iterations=1, warmup_rounds=0 if FULL else 1)
    benchmark.extra_info.update({k: metrics[k] for k in ("trajectories", "tokens_trained", "tokens_forwarded",
                                                         "micro_batches")})
    print(f"\n{packing}: " + json.dumps(benchmark.extra_info))
    assert not metrics["skipped"] and metrics["tokens_trained"] == sum(len(t.response_ids) for t in scripted_batch)
