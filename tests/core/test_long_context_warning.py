"""The long-context warning's time estimate (spell_core/preflight.py), worked by hand on a model of
known size and a fixed measured speed: reading a prompt of c tokens costs 2 P c (the weights)
+ 2 L H c^2 (causal attention's QK^T and PV over L layers of H = heads x head_dim)."""
from types import SimpleNamespace

import torch

from spell_core.cli import preflight

# P = 2^20 parameters, L = 2 layers, H = 4 heads x 16 = 64; at c = 65,536 = 2^16:
# 2 x 2^20 x 2^16 + 2 x 2 x 64 x 2^32 = 2^37 + 2^40 = 9 x 2^37 FLOPs; at 2^37 / 10 FLOP/s: 90 s
MODEL = SimpleNamespace(lm_head_weight=torch.empty(0, device="meta"),
                        parameters=lambda: iter([torch.empty(1024, 1024, device="meta")]),
                        config=SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=16))


def test_seconds_per_prompt_and_per_step_worked_by_hand(monkeypatch):
    monkeypatch.setattr(preflight, "_flops_per_second", lambda device, dtype: 2**37 / 10)
    # 16x the native 4,096: always warned; 6 prompts x 90 s = 540 s = 9 min
    assert preflight.long_context_warning(MODEL, 65536, 4096, 6) == (
        "spell: warning: --ctx 65,536 is 16x the model's native context of 4,096 (RoPE scaling is reliable up to "
        "about 4x). Expected time on this machine: about 90 s to read one prompt of that length, 9 min for the 6 "
        "prompts of a step, before any token is generated (progress shows 0 tok meanwhile); lower --ctx for a "
        "quicker run")
    # 2x the native 32,768 (RoPE scaling serves it): warned only above 600 s a step
    assert preflight.long_context_warning(MODEL, 65536, 32768, 6) is None  # 540 s
    warning = preflight.long_context_warning(MODEL, 65536, 32768, 8)  # 720 s = 12 min
    assert warning.startswith("spell: warning: --ctx 65,536 is long for this machine. Expected time on this machine: "
                              "about 90 s to read one prompt of that length, 12 min for the 8 prompts of a step")
    # at the native context nothing is estimated
    assert preflight.long_context_warning(MODEL, 32768, 32768, 1000) is None


def test_a_mixture_of_experts_counts_the_experts_a_token_is_routed_to():
    """Tiny Qwen3-MoE (tests/core/tiny_models.py): per MoE layer, E experts of 3 H I weights each,
    k run per token; by hand from the config, against transformers' model's parameter count."""
    from tests.core.tiny_models import ours_from_hf, perturbed_hf_model, tiny_moe_config

    config = tiny_moe_config(64)
    hf = perturbed_hf_model(config, 0)
    model = ours_from_hf(hf)
    total = sum(p.numel() for p in hf.parameters())
    moe_layers = [i for i in range(config.num_hidden_layers)
                  if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    idle = len(moe_layers) * (config.num_experts - config.num_experts_per_tok) * 3 * config.hidden_size \
        * config.moe_intermediate_size
    assert preflight.active_parameters(model) == total - idle
    assert idle > 0
