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
