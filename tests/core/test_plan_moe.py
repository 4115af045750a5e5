"""The memory planner on a mixture-of-experts model (Qwen3-30B-A3B, issue 22) and the terms dense
models missed: what stays resident beside the sampler's gathered weights, the host memory, the
offload plan. Numbers worked by hand from the published config (bench/configs/); the MoE FFN's
saved tensors measured on CPU against the planner's term."""
import json
import math
from pathlib import Path

import pytest
import torch

from bench.plan_validate import moe_ffn, moe_shape, saved_storage_bytes
from spell_core import plan

ROOT = Path(__file__).parents[2]
QWEN3_30B = ROOT / "bench" / "configs" / "qwen3-30b-a3b-thinking-2507"
QWEN3_8B = Path(__file__).parent / "fixtures" / "qwen3_8b_config.json"
GiB = 2**30


def qwen3_30b():
    return json.loads((QWEN3_30B / "config.json").read_text())


def test_qwen3_30b_a3b_parameters_by_hand():
    """Per layer: q and o 2 x 2048 x 4096, k and v 2 x 2048 x 512, two RMSNorms 2 x 2048, q/k norms
    2 x 128, the router 128 x 2048 and 128 experts x 3 x 2048 x 768; the root: embedding and head
    2 x 151936 x 2048 and the final norm 2048. Active: 8 experts of 128 per layer."""
    attention = 2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 2048 + 2 * 128
    experts = 128 * 3 * 2048 * 768
    root = 2 * 151936 * 2048 + 2048
    shape = plan.Shape.from_config(qwen3_30b())
    assert shape.params() == 48 * (attention + 128 * 2048 + experts) + root == 30_532_122_624  # "30.5B"
    assert shape.active_params() == 48 * (attention + 128 * 2048 + 8 * 3 * 2048 * 768) + root == 3_353_032_704  # "3.3B"
    assert shape.moe_layers == tuple(range(48)) and shape.routing_record_bytes_per_token() == 48 * 8 * 1


def test_decoder_sparse_step_and_mlp_only_layers_make_dense_layers():
    """transformers' Qwen3MoeDecoderLayer: layer i is sparse when i is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0. Six layers, step 2, layer 3 dense: sparse 1 and 5."""
    raw = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=6,
               num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=12, decoder_sparse_step=2, mlp_only_layers=[3])
    shape = plan.Shape.from_config(raw)
    assert shape.moe_layers == (1, 5)
    attention = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 2 * 16 + 2 * 8  # q, k + v, o, two norms, q/k norms
    dense, sparse = attention + 3 * 16 * 40, attention + 4 * 16 + 4 * 3 * 16 * 12
    assert shape.params() == 4 * dense + 2 * sparse + 2 * 100 * 16 + 16
    assert shape.layer_params() == sparse  # FSDP2 gathers the larger kind
    assert shape.active_params() == shape.params() - 2 * 2 * 3 * 16 * 12  # 2 of 4 experts unused in 2 layers


def test_parameter_counts_equal_transformers_qwen3_moe():
    """The oracle: transformers' Qwen3MoeForCausalLM built on the meta device, for Qwen3-30B-A3B and
    for the six-layer config above (which of its layers are sparse is transformers' rule)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tiny = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=6,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=12, decoder_sparse_step=2, mlp_only_layers=[3])
    for raw in (qwen3_30b(), tiny):
        config = Qwen3MoeConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(config)
        assert plan.Shape.from_config(raw).params() == sum(p.numel() for p in model.parameters())
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert tuple(sparse) == plan.Shape.from_config(tiny).moe_layers == (1, 5)


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=None), "needs num_experts_per_tok"),
    (dict(num_experts=None, moe_intermediate_size=None), "needs num_experts, moe_intermediate_size"),
    (dict(num_experts_per_tok=129), "num_experts_per_tok (129) is more than num_experts (128)"),
    (dict(mlp_only_layers=[48]), "mlp_only_layers must be a list of layer indices from 0 to 47"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step must be a whole number of at least 1"),
])
def test_a_moe_config_missing_or_wrong_fields_is_refused_naming_the_file(tmp_path, capsys, change, message):
    raw = {k: v for k, v in qwen3_30b().items() if change.get(k, 0) is not None}
    raw.update({k: v for k, v in change.items() if v is not None})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert plan.main(["--model", str(tmp_path), "--ctx", "16k"]) == 2
    err = capsys.readouterr().err
    assert f"spell.plan: error: {tmp_path / 'config.json'}: " in err and message in err


def test_moe_activations_per_token_and_layer_by_hand():
    """bf16, per token in one Qwen3-30B-A3B layer: two RMSNorms (4 + 2 + 2) x 2048, q, k after RoPE,
    v and out 2 x (2 x 32 + 2 x 4) x 128, the fp32 LSE 4 x 32, q/k norms (4 + 2) x 36 x 128; the
    router's fp32 probabilities 4 x 128, top-8 ids 8 x 8, fp32 weights 4 x 8 and their sum 4; per
    routed row (8) gate/up and SwiGLU out 2 x 3 x 768, its weight 2, its sorted position 8."""
    shape = plan.Shape.from_config(qwen3_30b())
    moe = 4 * 128 + 8 * 8 + 4 * 8 + 4 + 8 * (2 * 3 * 768 + 2 + 8)
    assert shape.moe_saved_bytes_per_token() == moe == 37_556
    per_layer = 2 * 8 * 2048 + 2 * (2 * 32 + 2 * 4) * 128 + 4 * 32 + 6 * 36 * 128 + moe
    assert shape.activation_bytes_per_token_layer(moe=True) == per_layer == 116_532
    # checkpointing, 32768 tokens: the last layer's MLP backward. Per token: cos/sin 2 x 2 x 128, 48
    # layer inputs 48 x 2 x 2048, the recomputed layer, the residual gradient 2 x 2048, per routed
    # row the SwiGLU's and gate/up's gradients 3 x 2 x 768 and the router's fp32 gradient 4 x 128;
    # beside them the head's bf16 gradient 151936 x 2048 x 2 and all 128 experts' down_proj gradients
    per_token = 2 * 2 * 128 + 48 * 2 * 2048 + per_layer + 2 * 2048 + 8 * 3 * 2 * 768 + 4 * 128
    peaks = plan.activation_peaks(shape, 32768, True)
    assert max(peaks, key=peaks.get) == "MLP (backward)"
    assert peaks["MLP (backward)"] == per_token * 32768 + 151936 * 2048 * 2 + 128 * 2048 * 768 * 2


def test_qwen3_30b_a3b_at_128k_on_8_x_80gb_offloads_to_sample():
    """FSDP2 over 8 GPUs: each holds an eighth of the fp32 weights, gradients and moments (16 bytes
    per parameter). Sampling gathers the whole bf16 model (2 bytes per parameter) beside the fp32
    shard and the moments (gradients are freed after each update): 12 x 3,816,515,328 + 2 x
    30,532,122,624 bytes, + one group's KV cache, 48 layers x 2 x 4 kv heads x 128 x 2 bytes =
    98,304 per token for 131,072 + 8 x 4,096 tokens, + the group's routing record 384 per token,
    + a prefill chunk. That is over 73.6 GiB: moving the moments (8 per parameter of the shard) and
    then the fp32 shard (4) to the host leaves the gathered copy, the KV cache and the chunk."""
    shape = plan.Shape.from_config(qwen3_30b())
    p = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=80 * GiB, gradient_checkpointing=True)
    shard = 3_816_515_328
    assert shard == math.ceil(30_532_122_624 / 8)
    tokens = 131072 + 8 * 4096
    kv, record = tokens * 98_304, tokens * 384
    # the chunk: 8192 tokens x (bf16 x (3 x 8 x 768 + 2 x 2048 + 40 x 128) + the router's (2 + 4) x 128)
    chunk = 8192 * (2 * (3 * 8 * 768 + 2 * 2048 + 40 * 128) + 6 * 128)
    assert p.parts["sampler: KV cache (163,840 tokens)"] == kv
    assert p.parts["sampler: routing record (one group)"] == record
    assert p.parts["sampler: prefill chunk working set"] == chunk
    before = 12 * shard + 2 * 30_532_122_624 + kv + record + chunk
    assert before - 8 * shard > p.usable >= before - 12 * shard
    assert p.offloaded == ["optimizer state (AdamW, 2 moments)", "weights (FSDP2 shard)"]
    assert p.sampling_peak == before - 12 * shard
    # training: 16 bytes per parameter of the shard, root + 2 whole layers (all experts) in bf16, the
    # activations and the micro-batch's routing record (32,768 tokens x 384)
    gathered = (2 * 151936 * 2048 + 2048 + 2 * 623_120_640) * 2
    assert p.parts["weights gathered (root + 2 layers)"] == gathered
    assert p.parts["routing record replayed (micro-batch)"] == 32768 * 384
    assert p.training_peak == (16 * shard + gathered + p.parts["activations, gradient checkpointing"]
                               + 32768 * 384)
    # host, per GPU: the moved moments and shard, the update guard's pinned fp32 copies of the
    # weights and moments (12 per parameter of the shard), the record of 128 / 2 data-parallel groups
    assert p.host_parts == {"optimizer state (moved while sampling)": 8 * shard,
                            "fp32 weights shard (moved while sampling)": 4 * shard,
                            "rollback snapshot (fp32 weights + 2 moments)": 12 * shard,
                            "routing record (64 trained groups)": 64 * record}
    assert p.fits and p.verdict == "fits: yes, with host offload while sampling (--offload-while-sampling)"
    assert "run does it (--offload-while-sampling auto" in p.advice[0] and "42.7 GiB per GPU" in p.advice[0]
    roomy = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=141 * GiB, gradient_checkpointing=True)
    assert roomy.offloaded == [] and roomy.sampling_peak == before and roomy.verdict == "fits: yes"
    # --offload-while-sampling on: both move though sampling fits without (the host counts them)
    forced = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=141 * GiB, gradient_checkpointing=True,
                              offload="on")
    assert forced.offloaded == p.offloaded and forced.sampling_peak == before - 12 * shard
    assert forced.host_parts["fp32 weights shard (moved while sampling)"] == 4 * shard
    stuck = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=70 * GiB, gradient_checkpointing=True)
    assert not stuck.fits and any("sampling does not fit even with the optimizer state and fp32 weights shard" in a
                                  for a in stuck.advice)
    kept = plan.plan_memory(shape, 131072, gpus=8, cp=4, gpu_memory=80 * GiB, gradient_checkpointing=True,
                            offload="off")
    assert kept.offloaded == [] and kept.sampling_peak == before and not kept.fits
    assert "sampling does not fit" in kept.advice[0] and "or --offload-while-sampling auto" in kept.advice[0]
    with pytest.raises(ValueError, match="--offload-while-sampling.*auto, on, off"):
        plan.plan_memory(shape, 131072, gpus=8, offload="yes")
    # one GPU: the sampler reads the bf16 model itself (2 n); the moments (8 n), then the fp32 master
    # copy (4 n) go to the host; 2 n + one group's KV cache, record and chunk stay
    one = plan.plan_memory(shape, 8192, gpus=1, gpu_memory=141 * GiB, gradient_checkpointing=True)
    n = 30_532_122_624
    assert one.offloaded == ["optimizer state (AdamW, 2 moments)", "fp32 master weights"]
    assert one.sampling_peak == 2 * n + (8192 + 8 * 4096) * (98_304 + 384) + chunk
    assert one.host_parts["fp32 master weights (moved while sampling)"] == 4 * n
    assert one.host_parts["rollback snapshot (fp32 weights + 2 moments)"] == 12 * n
    assert not one.fits and "training does not fit" in one.advice[0]


def test_dense_sampling_counts_what_stays_resident_and_the_host_copies():
    """Qwen3-8B (8,190,735,360 parameters) at 128k on 8 GPUs: the sampler's bf16 copy 2 n beside the
    fp32 shard and moments 12 x ceil(n / 8); no routing record. One GPU: the bf16 model is what the
    sampler reads, beside the fp32 master copy 4 n and the moments 8 n; its snapshot 12 n."""
    shape = plan.Shape.from_config(json.loads(QWEN3_8B.read_text()))
    n = 8_190_735_360
    assert shape.params() == n
    p = plan.plan_memory(shape, 131072, gpus=8, cp=4, gradient_checkpointing=True)
    shard = math.ceil(n / 8)
    sampler = (p.parts["sampler: KV cache (163,840 tokens)"] + p.parts["sampler: prefill chunk working set"])
    assert p.parts["sampler: full weights (gathered)"] == 2 * n
    assert p.sampling_peak == 12 * shard + 2 * n + sampler
    assert p.host_parts == {"rollback snapshot (fp32 weights + 2 moments)": 12 * shard}
    assert "routing record replayed (micro-batch)" not in p.parts
    one = plan.plan_memory(shape, 8192, gpus=1, gpu_memory=400 * GiB, gradient_checkpointing=True)
    assert "sampler: full weights (gathered)" not in one.parts
    assert one.sampling_peak == 2 * n + 4 * n + 8 * n + one.parts["sampler: KV cache (40,960 tokens)"] \
        + one.parts["sampler: prefill chunk working set"]
    assert one.host_parts == {"rollback snapshot (fp32 weights + 2 moments)": 12 * n}


def test_command_line_plans_the_config_only_folder(capsys):
    assert plan.main(["--model", str(QWEN3_30B), "--ctx", "16k", "--gpus", "8", "--gpu-memory", "141GB",
                      "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "30.53 B parameters, 3.35 B active per token (48 layers, 48 MoE: 128 experts x intermediate 768" in out
    assert "experts     28.99 B of them, all 128 of a layer in every FSDP2 shard" in out  # 48 x 128 x 3 x 2048 x 768
    assert "fits: yes" in out and "routing record (16 trained groups)" in out
    assert plan.main(["--model", str(QWEN3_30B), "--ctx", "128k", "--gpus", "8", "--cp", "4",
                      "--gradient-checkpointing"]) == 0
    assert "fits: yes, with host offload while sampling (--offload-while-sampling)" in capsys.readouterr().out
    assert plan.main(["--model", str(QWEN3_30B), "--ctx", "128k", "--gpus", "8", "--cp", "4",
                      "--gradient-checkpointing", "--offload-while-sampling", "off"]) == 1
    assert "fits: NO" in capsys.readouterr().out


@pytest.mark.parametrize("dtype, tokens, k", [(torch.float32, 96, 2), (torch.bfloat16, 64, 3),
                                              (torch.float32, 33, 1)])
def test_moe_ffn_saved_tensors_and_weight_gradients_measured_on_cpu(dtype, tokens, k):
    """The bytes autograd keeps for a tiny MoE FFN's backward (every distinct storage its saved
    tensors hold, the weights and the input left out) equal the planner's CPU term; the weight
    gradients after backward equal the router's and all experts' parameters in the dtype."""
    torch.manual_seed(0)
    hidden, inter, experts = 32, 24, 6
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    weights = [torch.randn(experts, hidden, dtype=dtype), torch.randn(experts, 2 * inter, hidden, dtype=dtype),
               torch.randn(experts, hidden, inter, dtype=dtype)]
    for w in weights:
        w.requires_grad_(True)
    out, kept = saved_storage_bytes(lambda: moe_ffn(x, *weights, k), [x, *weights])
    shape = moe_shape(hidden, inter, experts, k, str(dtype).removeprefix("torch."))
    assert kept == shape.moe_saved_bytes_per_token("cpu") * tokens
    out.float().square().sum().backward()
    grads = sum(w.grad.untyped_storage().nbytes() for w in weights)
    assert grads == (shape.layer_params(moe=True) - shape.attention_params()) * shape.bytes
