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
from spell_core.model import CausalLM, ModelConfig

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
    assert p.parts["weights (FSDP2 shard)"] == -(-n // 8) * 2  # bf16
    assert p.parts["optimizer state (AdamW, 2 moments)"] == 2 * -(-n // 8) * 2
    # K and V, 36 layers x 8 heads x 128 x 2 bytes, for the prompt and 8 x 4096 new tokens
    assert p.parts["sampler: KV cache (163,840 tokens)"] == (131072 + 8 * 4096) * 2 * 36 * 8 * 128 * 2
    # saved per token and layer, bf16 (b = 2) with fp32 norm copies: two RMSNorms (4 + 2 + 2) x 4096,
    # q, k after RoPE, v, out 2 x (2 x 32 + 2 x 8) x 128 and the fp32 LSE 4 x 32, q/k norms
    # (4 + 2) x 40 x 128, the MLP 4 x 2 x 12288
    per_token_layer = 2 * 8 * 4096 + 2 * (2 * 32 + 2 * 8) * 128 + 4 * 32 + 6 * 40 * 128 + 4 * 2 * 12288
    assert shape.activation_bytes_per_token_layer() == per_token_layer == 215168
    # checkpointing keeps one hidden state per layer and token (36 x 4096 x 2 bytes), plus the layer
    # being recomputed and its backward (2.5 layers' worth), the final norm, logits chunk, gradients
    floor = 36 * 4096 * 2 * 32768 + 5 * per_token_layer * 32768 // 2
    # beyond: final norm 1.0, logits chunk 1.0 + rows 0.25, unsharded root + layer gradients 2.3 + 0.4 GiB
    assert floor < p.parts["activations, gradient checkpointing"] < floor + 6 * GiB
    assert p.fits and "fits with" in p.advice[0]
    without = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=80 * GiB)
    assert not without.fits and "--gradient-checkpointing" in without.advice[0]


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


def test_run_stops_before_loading_when_the_plan_does_not_fit(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(QWEN3_8B.read_text())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * GiB))
    config = SimpleNamespace(model=SimpleNamespace(name=str(tmp_path), device="cuda"), data=SimpleNamespace(ctx=131072),
                             sampling=SimpleNamespace(group_size=8, max_response_tokens=4096))
    args = SimpleNamespace(cp=1, micro_batch_tokens=32768, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="does not fit in GPU memory"):
        plan.check_run_fits(config, args)
