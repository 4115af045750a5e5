"""generate() against transformers (greedy, token for token), against the trainer's scoring
(log-probs), and against itself run differently (n samples vs n requests, chunked vs one-shot
prefill, waves vs one batch); stop handling and every input error.

Small random Llama / Qwen2 / Qwen3 models for most cases; the default SmolLM2 checkpoint
with chat-template prompts of the default corpus for the parity cases."""
import copy

import pytest
import torch
import transformers

from spell_core.sampling.kv_cache import kv_bytes_per_token
from spell_core.sampling.sampler import Completion, default_stop_token_ids, generate, sample_seed
from tests.core.tiny_models import ours_from_hf, perturbed_hf_model

LOGPROB_TOL = 1e-5  # fp32, max abs difference (the bound)
VOCAB = 101

TINY = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=48, intermediate_size=64, num_attention_heads=6,
                                             num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(hidden_size=40, intermediate_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16)),
}


def tiny_pair(arch="llama", seed=0, vocab=VOCAB, **overrides):
    """(transformers model, our model) with the same random weights, every weight perturbed."""
    config_cls, kwargs = TINY[arch]
    hf = perturbed_hf_model(config_cls(vocab_size=vocab, num_hidden_layers=2, **{**kwargs, **overrides}), seed).eval()
    hf.generation_config.eos_token_id = None  # hf_greedy says which eos ids stop
    return hf, ours_from_hf(hf)


def random_prompts(lengths, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(hf, prompt, max_new_tokens, eos=None):
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                           pad_token_id=0, use_cache=True)
    out = hf.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


def trainer_logprobs(model, prompt, completion: Completion, temperature):
    """What the trainer computes for the sampled tokens (CausalLM.token_logprobs)."""
    seq = torch.tensor(prompt + completion.token_ids)
    with torch.no_grad():
        return model.token_logprobs(seq, temperature=temperature)[len(prompt):]


def max_logprob_error(model, prompts, results, temperature):
    errors = [(trainer_logprobs(model, p, c, temperature or 1.0) - torch.tensor(c.logprobs)).abs().max().item()
              for p, cs in zip(prompts, results) for c in cs]
    return max(errors)


# ----------------------------------------------------------------------------- small models

@pytest.mark.parametrize("arch", list(TINY))
def test_greedy_equals_transformers_generate(arch):
    hf, ours = tiny_pair(arch)
    prompts = random_prompts([7, 1, 23, 12])
    eos = sorted(default_stop_token_ids(None, ours))  # the config's eos_token_id, if any
    assert eos == [i for i in [hf.config.eos_token_id] if i is not None]
    results = generate(ours, None, prompts, max_new_tokens=16, temperature=0, prefill_chunk_tokens=10)
    for prompt, (completion,) in zip(prompts, results):
        expected = hf_greedy(hf, prompt, 16, eos=eos or None)
        assert completion.token_ids == expected
        assert completion.finish_reason == ("stop" if expected[-1] in eos else "length")


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.0, 0, 1.0)])
def test_logprobs_equal_the_trainers_at_the_same_temperature(arch, temperature, top_k, top_p):
    _, ours = tiny_pair(arch)
    prompts = random_prompts([9, 3, 14])
    results = generate(ours, None, prompts, n=[2, 3, 1], max_new_tokens=12, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=5)
    assert all(len(c.logprobs) == len(c.token_ids) >= 1 for cs in results for c in cs)
    assert max_logprob_error(ours, prompts, results, temperature) <= LOGPROB_TOL


def test_n_samples_equal_n_separate_requests_with_the_same_seeds():
    _, ours = tiny_pair("qwen2")
    prompts = random_prompts([11, 4, 20])
    counts = [3, 1, 2]
    together = generate(ours, None, prompts, n=counts, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=42)
    for i, (prompt, n) in enumerate(zip(prompts, counts)):
        for j in range(n):
            (alone,), = generate(ours, None, [prompt], n=1, max_new_tokens=10, temperature=0.9, top_p=0.95,
                                 seed=[[sample_seed(42, i, j)]])
            assert together[i][j].token_ids == alone.token_ids
            assert max(abs(a - b) for a, b in zip(together[i][j].logprobs, alone.logprobs)) <= LOGPROB_TOL
    # the samples of one prompt differ from each other, and a seed reproduces the whole call
    assert len({tuple(c.token_ids) for c in together[0]}) == 3
    again = generate(ours, None, prompts, n=counts, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=42)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in together]


def test_chunked_prefill_equals_one_shot_prefill():
    _, ours = tiny_pair("qwen3")
    prompts = random_prompts([1, 9, 30, 17, 2])
    kwargs = dict(n=2, max_new_tokens=8, temperature=0.8, seed=3)
    one_shot = generate(ours, None, prompts, prefill_chunk_tokens=1000, **kwargs)
    for chunk in (1, 4, 7, 30):  # chunks that split prompts, hold several, or end exactly on a prompt
        chunked = generate(ours, None, prompts, prefill_chunk_tokens=chunk, **kwargs)
        for a, b in zip((c for cs in one_shot for c in cs), (c for cs in chunked for c in cs)):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= LOGPROB_TOL


def test_requests_that_do_not_fit_the_budget_run_in_waves():
    _, ours = tiny_pair("llama")
    prompts = random_prompts([10, 6, 15])
    kwargs = dict(n=[2, 1, 2], max_new_tokens=5, temperature=0.8, seed=9)
    all_at_once = generate(ours, None, prompts, **kwargs)
    events = []
    waves = generate(ours, None, prompts, kv_budget_tokens=26, progress=events.append, **kwargs)  # needs 20, 11, 25
    assert [[c.token_ids for c in cs] for cs in waves] == [[c.token_ids for c in cs] for cs in all_at_once]
    assert events[0].kv_cache_bytes == 25 * kv_bytes_per_token(ours.config, torch.float32)  # the largest wave
    with pytest.raises(ValueError, match=r"kv_budget_tokens=24 is too small: prompt 2 needs 25 tokens .* at least 25"):
        generate(ours, None, prompts, kv_budget_tokens=24, **kwargs)


def test_samples_share_one_copy_of_the_prompt_kv():
    _, ours = tiny_pair("llama")
    events = []
    generate(ours, None, random_prompts([40]), n=8, max_new_tokens=4, temperature=1.0, seed=0, ignore_eos=True,
             progress=events.append)
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 KV heads, head dim 8, fp32
    assert events[0].kv_cache_bytes == (40 + 8 * 4) * per_token  # not 8 x 40
    prefill = [e for e in events if e.stage == "prefill"]
    decode = [e for e in events if e.stage == "decode"]
    assert sum(e.tokens for e in prefill) == 40
    assert [e.tokens for e in decode] == [8, 8, 8]  # the first token comes from the prefill


def test_finished_samples_leave_the_batch_and_stop_tokens_stop():
    hf, ours = tiny_pair("llama")
    prompt = random_prompts([12])[0]
    free = hf_greedy(hf, prompt, 12)
    stop_id = free[4]
    first = free.index(stop_id)
    events = []
    (greedy,), = generate(ours, None, [prompt], max_new_tokens=12, temperature=0, stop=[stop_id],
                          ignore_eos=True, progress=events.append)
    assert greedy.token_ids == free[:first + 1]  # the stop token is kept (the trainer scores it)
    assert greedy.finish_reason == "stop"
    assert len([e for e in events if e.stage == "decode"]) == first
    # in a batch, the finished sample leaves and the other one carries on as if alone
    other = random_prompts([5], seed=4)[0]
    results = generate(ours, None, [prompt, other], max_new_tokens=12, temperature=0, stop=[stop_id],
                       ignore_eos=True)
    assert results[0][0].token_ids == free[:first + 1]
    assert results[1][0].token_ids == generate(ours, None, [other], max_new_tokens=12, temperature=0,
                                               stop=[stop_id], ignore_eos=True)[0][0].token_ids


def test_generation_stops_at_the_models_context():
    hf, ours = tiny_pair("llama", max_position_embeddings=24)
    prompt = random_prompts([20])[0]
    (c,), = generate(ours, None, [prompt], max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(c.token_ids) == 4 and c.finish_reason == "length"
    assert c.token_ids == hf_greedy(hf, prompt, 4)


def test_the_sampler_uses_the_current_weights_and_restores_the_mode():
    hf, ours = tiny_pair("qwen3")
    prompt = random_prompts([8])[0]
    ours.train()
    before = generate(ours, None, [prompt], max_new_tokens=10, temperature=0)[0][0].token_ids
    assert ours.training
    with torch.no_grad():  # an optimizer step, in place, on both copies
        for p_ours, p_hf in zip(ours.parameters(), [hf.state_dict()[n] for n, _ in ours.named_parameters()]):
            delta = 0.2 * torch.randn_like(p_ours)
            p_ours.add_(delta)
            p_hf.add_(delta)
    ours.eval()
    after = generate(ours, None, [prompt], max_new_tokens=10, temperature=0)[0][0].token_ids
    assert not ours.training
    assert after == hf_greedy(hf, prompt, 10) and after != before
    assert all(p.grad is None for p in ours.parameters())


def test_progress_accepts_a_tqdm_bar():
    import io

    from tqdm import tqdm

    _, ours = tiny_pair("llama")
    with tqdm(file=io.StringIO()) as bar:
        generate(ours, None, random_prompts([6, 9]), n=2, max_new_tokens=3, temperature=1.0, seed=1, ignore_eos=True,
                 progress=bar)
        assert bar.n == 15 + 2 * 2 * 2  # prompt tokens + decoded tokens (the first comes from the prefill)
        assert bar.desc.startswith("decode") and "tok/s" in bar.postfix


def test_a_one_dimensional_tensor_prompt_is_accepted():
    _, ours = tiny_pair("llama")
    prompt = random_prompts([6])[0]
    a = generate(ours, None, [torch.tensor(prompt)], max_new_tokens=4, temperature=0)
    b = generate(ours, None, [prompt], max_new_tokens=4, temperature=0)
    assert a[0][0].token_ids == b[0][0].token_ids


@pytest.mark.parametrize("prompts, kwargs, error, message", [
    ([[]], {}, ValueError, "prompt 0 is empty"),
    ([[1, 2]], dict(n=0), ValueError, r"n must be an int >= 1"),
    ([[1, 2], [3]], dict(n=[1]), ValueError, "n has 1 entries but there are 2 prompts"),
    ([[1, 2]], dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
    ([[1, 2]], dict(temperature=-1), ValueError, "temperature must be"),
    ([[1, 2]], dict(top_p=0), ValueError, "top_p must be in"),
    ([[1, 2]], dict(top_k=-2), ValueError, "top_k must be"),
    ([[1, VOCAB]], {}, ValueError, r"token id 101, outside the model's vocabulary \[0, 101\)"),
    ([1, 2, 3], {}, TypeError, r"for one prompt pass \[ids\]"),
    (["hello"], {}, TypeError, "tokenize it first"),
    ([[1, 2]], dict(seed=[1]), ValueError, "seed must be None, an int, or per-sample seeds"),
    ([[1, 2]], dict(stop=["</s>"]), ValueError, "stop strings need a tokenizer"),
])
def test_bad_requests_are_refused_with_a_clear_error(prompts, kwargs, error, message):
    _, ours = tiny_pair("llama")
    with pytest.raises(error, match=message):
        generate(ours, None, prompts, **{"max_new_tokens": 4, **kwargs})


def test_a_prompt_longer_than_the_context_points_at_rope_scaling():
    _, ours = tiny_pair("llama", max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"prompt 1 has 40 tokens.*context of 32 tokens.*--ctx.*with_rope_scaling"):
        generate(ours, None, random_prompts([5, 40]), max_new_tokens=4)


def test_first_token_frequencies_match_the_models_distribution():
    """Chi-square over a tiny vocabulary: 3000 samples of one prompt's first token."""
    hf, ours = tiny_pair("llama", vocab=5)
    prompt = [1, 3, 0, 2]
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / 0.8, -1)
    results = generate(ours, None, [prompt], n=3000, max_new_tokens=1, temperature=0.8, seed=2024)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in results[0]]), minlength=5).double()
    stat = float(((counts - 3000 * probs) ** 2 / (3000 * probs)).sum())
    assert stat < 18.467  # chi-square, 4 degrees of freedom, significance 0.001


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def smollm2():
    from spell_core.models.assets import resolve_corpus, resolve_model
    from spell_core.data.documents import load_documents
    from spell_core.models.model import load_pretrained

    model, tokenizer = load_pretrained(resolve_model("smollm2-135m-instruct"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32).eval()
    documents = load_documents(resolve_corpus())
    prompts = []
    for doc in (documents[3], documents[200], documents[500]):
        messages = [{"role": "user", "content": "Read this passage, then say who speaks first and what about.\n\n"
                                                + doc.text[:1100]}]
        prompts.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
    return model, tokenizer, hf, prompts


def test_default_model_greedy_equals_transformers_on_corpus_prompts(smollm2):
    model, tokenizer, hf, prompts = smollm2
    assert all(200 <= len(p) <= 600 for p in prompts)
    stop_ids = default_stop_token_ids(tokenizer, model)
    assert stop_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    results = generate(model, tokenizer, prompts, max_new_tokens=20, temperature=0, prefill_chunk_tokens=256)
    for prompt, (completion,) in zip(prompts, results):
        expected = hf_greedy(hf, prompt, 20, eos=sorted(stop_ids))
        assert completion.token_ids == expected
        assert completion.text == tokenizer.decode([t for t in expected if t not in stop_ids])


def test_default_model_logprobs_equal_the_trainers(smollm2):
    """On 30 layers with logits of magnitude ~30, fp32 itself is ~1e-5 off: the trainer's
    log-probs differ from a float64 run of the same model by about that. The sampler must agree
    with the trainer within 1e-5 or twice that floor, and be as close to float64 as it is."""
    model, tokenizer, _, prompts = smollm2
    results = generate(model, tokenizer, prompts[:1], n=2, max_new_tokens=12, temperature=0.7, top_p=0.95, seed=0)
    model64 = copy.deepcopy(model).double()
    ours_vs_trainer = ours_vs_fp64 = trainer_vs_fp64 = 0.0
    for prompt, completions in zip(prompts, results):
        for c in completions:
            trainer = trainer_logprobs(model, prompt, c, 0.7).double()
            fp64 = trainer_logprobs(model64, prompt, c, 0.7)
            ours = torch.tensor(c.logprobs, dtype=torch.float64)
            ours_vs_trainer = max(ours_vs_trainer, (ours - trainer).abs().max().item())
            ours_vs_fp64 = max(ours_vs_fp64, (ours - fp64).abs().max().item())
            trainer_vs_fp64 = max(trainer_vs_fp64, (trainer - fp64).abs().max().item())
    assert ours_vs_trainer <= max(LOGPROB_TOL, 2 * trainer_vs_fp64)
    assert ours_vs_fp64 <= 2 * trainer_vs_fp64


def test_stop_strings_split_across_tokens_cut_the_text(smollm2):
    model, tokenizer, _, prompts = smollm2
    (free,), = generate(model, tokenizer, prompts[:1], max_new_tokens=14, temperature=0, ignore_eos=True)
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    # a stop string made of the last character of one token and the first two of the next
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i].strip()) >= 1 and len(pieces[i + 1]) >= 2
             and (pieces[i][-1:] + pieces[i + 1][:2]) not in "".join(pieces[:i + 1]))
    stop = pieces[i][-1:] + pieces[i + 1][:2]
    (cut,), = generate(model, tokenizer, prompts[:1], max_new_tokens=14, temperature=0, stop=["@@never@@", stop],
                       ignore_eos=True)
    assert cut.token_ids == free.token_ids[:i + 2]
    assert cut.finish_reason == "stop"
    full_text = tokenizer.decode(free.token_ids)
    assert cut.text == full_text[:full_text.index(stop)]


# ----------------------------------------------------------------------------- GPU code paths on CPU

@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_cuda_graph_steps_padded_batch_equals_the_eager_step(kernels, monkeypatch):
    """decode_graph.py's static-buffer step (padding rows, unused groups, fixed maxima), run
    without capture: the CUDA graph itself needs a GPU."""
    from spell_core.sampling.decode_graph import CudaGraphDecoder
    from spell_core.sampling.kv_cache import KVCache, WaveLayout
    from spell_core.sampling.sampler import _decode_step, _decode_tables, _Sample

    monkeypatch.setenv("SPELL_KERNELS", kernels)
    _, ours = tiny_pair("qwen3")
    counts, prompt_lens, new_tokens = [2, 1, 1], [9, 5, 12], 6
    layout = WaveLayout.build(prompt_lens, counts, [new_tokens] * 3)
    cache = KVCache(ours.config, layout.num_slots + 1, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    requests = [0, 0, 1, 2]
    samples = [_Sample(r, i, prompt_lens[r], new_tokens, layout.own_start[i], None,
                       tokens=torch.randint(0, VOCAB, (i + 1,), generator=gen).tolist())
               for i, r in enumerate(requests)]
    live = [samples[0], samples[1], samples[3]]  # request 1 finished: 3 live rows, bucket 4, 3 groups
    decoder = CudaGraphDecoder(ours, cache, layout, counts, new_tokens, 1 / 0.7, _decode_tables, _decode_step,
                               capture=False)
    with torch.inference_mode():
        padded = decoder(live).clone()
        eager = _decode_step(ours, cache, layout, live, 1 / 0.7)
    assert padded.shape == eager.shape == (3, VOCAB)
    assert (padded - eager).abs().max().item() <= 1e-4


def test_generate_on_the_triton_kernels_matches_the_torch_path(monkeypatch):
    """The kernels the sampler runs on a GPU (varlen prefill, shared-prefix decode), interpreted."""
    _, ours = tiny_pair("llama")
    prompts = random_prompts([5, 11])
    kwargs = dict(n=[2, 1], max_new_tokens=4, temperature=0.9, seed=1, prefill_chunk_tokens=8, ignore_eos=True)
    monkeypatch.setenv("SPELL_KERNELS", "torch")
    reference = generate(ours, None, prompts, **kwargs)
    monkeypatch.setenv("SPELL_KERNELS", "triton")
    triton = generate(ours, None, prompts, **kwargs)
    for a, b in zip((c for cs in reference for c in cs), (c for cs in triton for c in cs)):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= LOGPROB_TOL
