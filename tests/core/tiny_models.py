"""Tiny random models for the tests: a transformers model with every weight (norms and biases
too) perturbed off its init, and our CausalLM holding the same weights."""
import json

import torch
import transformers

from spell_core.models.model import CausalLM, ModelConfig


def perturbed_hf_model(config: transformers.PretrainedConfig, seed: int = 0, **from_config_kwargs):
    """A float32 transformers model of `config`, seeded, every weight moved by 0.1 x N(0, 1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **from_config_kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from_hf(hf_model) -> CausalLM:
    """Our model from the config.json transformers would write and the same weights."""
    config = ModelConfig.from_hf(json.loads(hf_model.config.to_json_string()))
    model = CausalLM(config)
    state = hf_model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    model.load_state_dict(state, strict=True)
    return model


def tiny_moe_config(vocab_size: int, **overrides) -> transformers.Qwen3MoeConfig:
    """A tiny Qwen3-MoE: 3 layers, layer 1 dense (mlp_only_layers), 8 experts, top-2."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                  max_position_embeddings=4096, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.Qwen3MoeConfig(**kwargs)


def make_tiny_moe_model(folder, tokenizer_source, seed: int = 0, **overrides):
    """tiny_moe_config with `tokenizer_source`'s tokenizer, random perturbed weights, saved by
    transformers into `folder` (the Hub's per-expert layout); `load_pretrained(folder)` reads it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    model = perturbed_hf_model(tiny_moe_config(len(tokenizer), **special, **overrides), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
