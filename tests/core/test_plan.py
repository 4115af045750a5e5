"""The memory planner: its counts against the model code and hand-worked numbers, the verdict and
advice for Qwen3-8B at 128k on 8 x 80 GB (config.json written from the published numbers), the
command line, and `run` stopping early on a GPU that cannot hold the run. Its activation model
is validated against measured peaks on CPU in bench/results/plan.md (bench/plan_validate.py)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spell_core import plan
from spell_core.models.model import CausalLM, ModelConfig

QWEN3_8B = Path(__file__).parent / "fixtures" / "qwen3_8b_config.json"
GiB = 2**30


def qwen3_8b():
    return json.loads(QWEN3_8B.read_text())


def test_parameter_count_equals_the_model_code():
    raw = qwen3_8b()
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_hf(raw))
    assert plan.Shape.from_config(raw).params() == sum(p.numel() for p in model.parameters())
    assert 8.1e9 < sum(p.numel() for p in model.parameters()) < 8.3e9  # "8.2B" as published


def test_qwen3_8b_at_128k_on_8_gpus_by_hand():
    shape = plan.Shape.from_config(qwen3_8b())
    p = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=80 * GiB, gradient_checkpointing=True)
    n = shape.params()
    assert p.micro_batch_tokens == 32768  # 128k over 4 CP ranks
    # a bf16 model trains fp32 master weights: FSDP2 shards them (and the gradients, AdamW's moments) in fp32
    shard = -(-n // 8)
    assert p.parts["weights (FSDP2 shard)"] == shard * 4
    assert p.parts["gradients (FSDP2 shard)"] == shard * 4
    assert p.parts["optimizer state (AdamW, 2 moments)"] == 2 * shard * 4
    assert "fp32 master weights" not in p.parts
    assert p.training_peak == 16 * shard + p.parts["weights gathered (root + 2 layers)"] \
        + p.parts["activations, gradient checkpointing"]
    # K and V, 36 layers x 8 heads x 128 x 2 bytes, for the prompt and 8 x 4096 new tokens
    assert p.parts["sampler: KV cache (163,840 tokens)"] == (131072 + 8 * 4096) * 2 * 36 * 8 * 128 * 2
    # saved per token and layer, bf16 (b = 2) with fp32 norm copies: two RMSNorms (4 + 2 + 2) x 4096,
    # q, k after RoPE, v, out 2 x (2 x 32 + 2 x 8) x 128 and the fp32 LSE 4 x 32, q/k norms
    # (4 + 2) x 40 x 128, the MLP 4 x 2 x 12288
    per_token_layer = 2 * 8 * 4096 + 2 * (2 * 32 + 2 * 8) * 128 + 4 * 32 + 6 * 40 * 128 + 4 * 2 * 12288
    assert shape.activation_bytes_per_token_layer() == per_token_layer == 215168
    # checkpointing, 32768 tokens: the peak is the last layer's MLP backward. Per token: cos/sin
    # 2 x 2 x 128, one bf16 hidden state per layer kept 36 x 2 x 4096, the recomputed layer's
    # saved tensors, the residual gradient 2 x 4096, the gradients of silu(gate) and up 2 x 2 x 12288;
    # beside them the head's unsharded bf16 gradient 151936 x 4096 x 2 and down_proj's 4096 x 12288 x 2
    per_token = 2 * 2 * 128 + 36 * 2 * 4096 + per_token_layer + 2 * 4096 + 2 * 2 * 12288
    assert per_token == 567936
    expected = per_token * 32768 + 151936 * 4096 * 2 + 4096 * 12288 * 2
    assert p.parts["activations, gradient checkpointing"] == expected == 19_955_449_856  # 18.58 GiB
    peaks = plan.activation_peaks(shape, 32768, True)
    assert max(peaks, key=peaks.get) == "MLP (backward)"
    # without checkpointing the loss's forward is the peak. Per token: cos/sin, every layer's saved
    # tensors, the final norm's fp32 input and bf16 output (4 + 2) x 4096, its result 2 x 4096, the
    # gathered rows and their gradient 2 x 2 x 4096 (at most every token trains); beside them one
    # 1 GiB chunk of bf16 logits (2^30 // (151936 x 2) = 3533 rows), the head's fp32 gradient and
    # its bf16 cast
    per_token = 2 * 2 * 128 + 36 * per_token_layer + 6 * 4096 + 2 * 4096 + 2 * 2 * 4096
    expected = per_token * 32768 + 3533 * 151936 * 2 + 151936 * 4096 * (4 + 2)
    assert p.parts["activations, no checkpointing"] == expected  # 242.4 GiB
    peaks = plan.activation_peaks(shape, 32768, False)
    assert max(peaks, key=peaks.get) == "loss (forward)"
    assert p.fits and "fits with" in p.advice[0]
    without = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=80 * GiB)
    assert not without.fits and "--gradient-checkpointing" in without.advice[0]


def test_one_gpu_counts_the_bf16_model_and_its_fp32_master_copy():
    """One process (spell_core/master_weights.py): bf16 weights 2 + fp32 master 4 + fp32 gradients 4 +
    fp32 moments 8 = 18 bytes per parameter; an fp32 model has no copy: 4 + 4 + 8 = 16."""
    shape = plan.Shape.from_config(qwen3_8b())
    n = shape.params()
    p = plan.plan_memory(shape, 8192, gpus=1, gpu_memory=200 * GiB, gradient_checkpointing=True)
    static = p.training_peak - p.parts["weights gathered (root + 2 layers)"] - p.parts["activations, gradient checkpointing"]
    assert p.parts["fp32 master weights"] == 4 * n and static == 18 * n
    fp32 = plan.Shape.from_config(qwen3_8b(), dtype="float32")
    p = plan.plan_memory(fp32, 8192, gpus=1, gpu_memory=200 * GiB, gradient_checkpointing=True)
    static = p.training_peak - p.parts["weights gathered (root + 2 layers)"] - p.parts["activations, gradient checkpointing"]
    assert "fp32 master weights" not in p.parts and static == 16 * n


def test_linear_in_the_context():
    shape = plan.Shape.from_config(qwen3_8b())
    sizes = [plan.activations(shape, t, True) for t in (16384, 32768, 65536, 131072)]
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    # doubling the tokens adds twice the previous increment, up to the logits chunk's cap
    assert steps[2] == pytest.approx(2 * steps[1], rel=1e-6) and steps[1] == pytest.approx(2 * steps[0], rel=0.05)


def test_advice_when_even_one_trajectory_is_too_long_for_a_gpu():
    p = plan.plan_memory(plan.Shape.from_config(qwen3_8b()), 1 << 20, gpus=1, cp=1, gpu_memory=80 * GiB,
                         gradient_checkpointing=True)
    assert not p.fits and "raise --cp" in p.advice[0]


@pytest.mark.parametrize("text, expected", [("80GB", 80 * GiB), ("141 GiB", 141 * GiB), ("512M", 512 * 2**20),
                                            ("1e9", 10**9)])
def test_parse_bytes(text, expected):
    assert plan.parse_bytes(text) == expected


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ValueError, match="80GB"):
        plan.parse_bytes("eighty")


def test_command_line(capsys):
    code = plan.main(["--model", str(QWEN3_8B), "--ctx", "128k", "--gpus", "8", "--cp", "4", "--gpu-memory", "80GB",
                      "--gradient-checkpointing"])
    out = capsys.readouterr().out
    assert code == 0 and "fits: yes" in out and "8.19 B parameters" in out
    assert plan.main(["--model", str(QWEN3_8B), "--ctx", "128k", "--gpus", "8", "--cp", "4"]) == 1
    assert "add --gradient-checkpointing" in capsys.readouterr().out
    assert plan.main(["--model", "/no/such/folder", "--ctx", "16k"]) == 2
    assert "neither a folder" in capsys.readouterr().err


def test_run_main_on_a_small_gpu_exits_1_before_loading_with_the_prompt_in_its_kv_cache(tmp_path, monkeypatch,
                                                                                          capsys):
    """`run.main` with CUDA faked (a 24 GiB GPU) on Qwen3-8B at --ctx 128k: the plan stops it with
    exit 1 before `load_pretrained` is called. By hand, one group's KV cache holds the documents
    131,072 + the prompt room 1,024 once and 8 x 4,096 new tokens: 164,864 tokens x (2 x 36 layers
    x 8 heads x 128 x 2 bytes = 147,456) = 24,310,185,984 bytes = 22.64 GiB (the bug left the
    prompt out: 163,840 tokens, 22.50 GiB); a trajectory is 131,072 + 1,024 + 4,096 = 136,192."""
    from spell_core import run
    from spell_core.cli import preflight

    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(QWEN3_8B.read_text())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * GiB))
    monkeypatch.setattr(preflight, "checkpoint_bytes", lambda folder, device: 1)  # no weights in the folder
    loaded = []
    monkeypatch.setattr("spell_core.models.model.load_pretrained", lambda *a, **k: loaded.append(a))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    code = run.main(["--model", str(model), "--device", "cuda", "--ctx", "128k", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and loaded == []
    assert "does not fit in GPU memory" in err
    assert f"  {'sampler: KV cache (164,864 tokens)':<44} {22.64:8.2f} GiB" in err.splitlines()
    assert "ctx 136,192" in err and "one trajectory needs 136,192 tokens per GPU" in err


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_model_against_the_live_bytes_of_a_cpu_step(checkpointing):
    """The counted model against a measurement: the exact peak of live tensor bytes (torch.profiler's
    memory events) during one train step of a tiny random Qwen3 (q/k norms) on CPU, fp32."""
    from bench.memory import live_tensor_peak
    from spell_core.selfplay.batch import Trajectory
    from spell_core.training.trainer import Trainer, TrainerOptions

    raw = dict(model_type="qwen3", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, head_dim=16, vocab_size=512, max_position_embeddings=4096, rope_theta=1e4,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = CausalLM(ModelConfig.from_hf(raw))
    trainer = Trainer(model, TrainerOptions(lr=1e-5, micro_batch_tokens=1024, gradient_checkpointing=checkpointing,
                                            bf16_autocast=False))
    ids = torch.randint(0, 512, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    step = [Trajectory("responder", ids[:960], ids[960:], [-6.0] * 64, 1.0)]
    trainer.train_step([Trajectory("responder", ids[:16], ids[16:20], [-6.0] * 4, 1.0)])  # AdamW's state exists
    measured = live_tensor_peak(lambda: trainer.train_step(step))["live_peak_bytes"]
    predicted = plan.activations(plan.Shape.from_config(raw, "float32"), 1024, checkpointing, device="cpu",
                                 loss_rows=64, full_gradients=True)
    assert predicted == pytest.approx(measured, rel=0.05)  # 0.5 % and 0.6 % with torch 2.13


def test_readme_shows_what_the_planner_prints(capsys):
    """README's examples (Qwen3-8B at 128k on 8 x 80 GB; Qwen3-30B-A3B at 16k and 128k on 8 x 80 and
    8 x 141 GB): every line shown under each command is a line the planner prints today
    (Qwen3-8B's config.json from the fixture instead of the hub)."""
    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text()
    commands = [c for c in readme.split("$ python -m spell_core.plan ")[1:]]
    assert len(commands) == 6
    for block in commands:
        command, *shown = block.split("```")[0].strip().splitlines()
        argv = command.replace("Qwen/Qwen3-8B", str(QWEN3_8B)).replace("bench/", f"{root}/bench/").split()
        plan.main(argv)
        printed = capsys.readouterr().out.splitlines()
        assert shown and all(line in printed for line in shown if line != "...")
