"""spell_kernels.integrations.transformers.apply(model) against transformers' eager attention
on small random Llama / Qwen2 / Qwen3 models: padded batches, packed rows, no mask, the KV
cache (generation), forward and backward."""
import copy

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from spell_kernels.integrations import transformers as spell_transformers

SMALL = dict(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),  # head_dim != hidden / heads, as in Qwen3
}


def _pair(name):
    """(eager model, spell model) with identical random weights, in float32 (eager attention
    is not usable in float64 with padding: its float64 mask minimum turns into -inf in its
    float32 softmax, and fully padded rows become nan)."""
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    config._attn_implementation = "eager"
    eager = model_cls(config).eval()
    spell = spell_transformers.apply(copy.deepcopy(eager))
    assert spell.config._attn_implementation == spell_transformers.NAME
    assert eager.config._attn_implementation == "eager"
    return eager, spell


def _ids(batch, length, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_batch_forward_and_backward(name):
    eager, spell = _pair(name)
    ids = _ids(3, 19)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, 13:] = 0  # right padding
    keep = mask.bool()
    grads = []
    for model in (eager, spell):
        model.zero_grad()
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
        (logits[keep] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads[-1]["logits"] = logits[keep].detach()
    torch.testing.assert_close(grads[1].pop("logits"), grads[0].pop("logits"), atol=2e-5, rtol=1e-5)
    for param in grads[0]:
        torch.testing.assert_close(grads[1][param], grads[0][param], atol=2e-5, rtol=1e-4, msg=param)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_mask_and_packed_rows_equal_separate_sequences(name):
    eager, spell = _pair(name)
    lengths = [7, 1, 12, 5]
    sequences = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(sequences, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    with torch.no_grad():
        separate = torch.cat([eager(s).logits for s in sequences], dim=1)  # no mask, each alone
        by_positions = spell(packed, position_ids=position_ids, use_cache=False).logits
        by_cu = spell(packed, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=max(lengths), max_length_k=max(lengths)).logits
        eager_packed = eager(packed, position_ids=position_ids, use_cache=False).logits
        unpacked = torch.cat([spell(s).logits for s in sequences], dim=1)  # no mask path
    for got in (by_positions, by_cu, eager_packed, unpacked):
        torch.testing.assert_close(got, separate, atol=2e-5, rtol=1e-5)


def test_packed_gradients_match_eager():
    eager, spell = _pair("llama")
    lengths = [9, 4, 6]
    packed = _ids(1, sum(lengths), seed=3)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    grads = []
    for model in (eager, spell):
        model.zero_grad()
        out = model(packed, position_ids=position_ids, labels=packed, use_cache=False)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for param in grads[0]:
        torch.testing.assert_close(grads[1][param], grads[0][param], atol=2e-5, rtol=1e-4, msg=param)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_generation_with_cache_and_left_padding(name):
    eager, spell = _pair(name)
    ids = _ids(2, 11, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    want = eager.generate(ids, **kwargs)
    got = spell.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):
        torch.testing.assert_close(s_got, s_want, atol=2e-5, rtol=1e-5)


def test_unsupported_options_raise():
    eager, spell = _pair("llama")
    attn = spell.model.layers[0].self_attn
    q = torch.zeros(1, 6, 3, 16)
    kv = torch.zeros(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        spell_transformers.spell_attention_forward(attn, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="2D"):
        spell_transformers.spell_attention_forward(attn, q, kv, kv, torch.ones(1, 1, 3, 3, dtype=torch.bool))
