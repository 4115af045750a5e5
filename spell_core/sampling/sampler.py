"""Batched generation with a KV cache: chunked prefill, shared-prompt groups, sampling.

    generate(model, tokenizer, prompts, n=8, max_new_tokens=..., temperature=0.7, top_p=0.95)

One wave of requests runs as: (1) prefill, in chunks of at most `prefill_chunk_tokens`
tokens (several short prompts share a chunk, a long prompt spans several), each prompt's
KV written once into the cache (`kv_cache.py`), the LM head applied to each prompt's last
position only; every sample of the prompt draws its first token from that one row.
(2) decode: one token per live sample and step; the samples of a prompt form a group whose
queries read the prompt KV once (`spell_kernels.decode_attn_shared_prefix`); a sample that
finishes leaves the batch. Requests whose KV does not fit `kv_budget_tokens` together run in
successive waves.

The model object is used as it is (the trainer's, with its current weights): nothing derived
from the weights is kept between calls. Returned log-probs are fp32 values of
log_softmax(logits / T) before top-k / top-p (see `sampling.py`), the trainer's scores.
A mixture-of-experts model's completions also carry the experts every forwarded token went to
(`Completion.routing`, `routing_capture.py`), for the trainer to replay.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from spell_core.models.linear import linear

from spell_core.models.routed_tokens import RoutedTokens
from spell_core.sampling.kv_cache import DecodeAttention, KVCache, PrefillAttention, WaveLayout, kv_bytes_per_token, \
    plan_waves
from spell_core.sampling.routing_capture import RoutingCapture
from spell_core.sampling.token_selection import check_sampling_params, draw_uniforms, make_generators, random_seeds, \
    sample_seed, select_tokens, temperature_scale

__all__ = ["generate", "Completion", "ProgressEvent", "default_stop_token_ids", "sample_seed",
           "DEFAULT_PREFILL_CHUNK_TOKENS"]

DEFAULT_PREFILL_CHUNK_TOKENS = {"cpu": 2048, "cuda": 8192}
# end-of-turn / end-of-text tokens of the chat templates of the supported families
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>")


@dataclass
class Completion:
    """One sample. token_ids: the generated ids, the stop token (or the token that completed a
    stop string) included; logprobs: their fp32 log-probs at the sampling temperature;
    finish_reason: "stop" (stop token or string) or "length" (max_new_tokens or the model's
    context); text: the decoded ids without a final stop token, cut before a stop string;
    routing: an MoE model's expert ids of the prompt and of the generated tokens it forwarded
    (spell_core/models/routed_tokens.py), None for a dense model."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    routing: RoutedTokens | None = field(default=None, compare=False)


@dataclass
class ProgressEvent:
    """What `progress` receives after every prefill chunk and every decode step."""
    stage: str  # "prefill" or "decode"
    tokens: int  # prompt tokens (prefill) or generated tokens (decode) of this update
    seconds: float  # wall time of this update
    live: int  # samples still generating
    kv_cache_bytes: int  # size of the KV cache allocation


def default_stop_token_ids(tokenizer, model=None) -> set[int]:
    """Ids that always end a sample: the tokenizer's eos, the chat templates' end-of-turn
    tokens present in its vocabulary, and the eos id(s) of the model's config."""
    ids = set()
    if tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    config_eos = getattr(getattr(model, "config", None), "raw", {}).get("eos_token_id")
    if config_eos is not None:
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(i) for i in ids}


@dataclass
class _Sample:
    request: int  # index into the wave's requests
    index: int  # among the samples of its request
    prompt_len: int
    capacity: int  # new tokens allowed (max_new_tokens, or fewer near the context's end)
    own_start: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class _StopStrings:
    """Finds stop strings in a sample's text as it grows: after each token, the decoded last
    few tokens (enough to hold the longest stop string) are searched."""

    def __init__(self, tokenizer, strings: list[str]):
        self.tokenizer, self.strings = tokenizer, strings
        self.window = max((len(s.encode()) for s in strings), default=0) + 2

    def __bool__(self):
        return bool(self.strings)

    def hit(self, token_ids: list[int]) -> bool:
        tail = self.tokenizer.decode(token_ids[-self.window:])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(found)] if found else text


class _Progress:
    def __init__(self, hook, kv_bytes: int):
        self.hook, self.kv_bytes = hook, kv_bytes

    def __call__(self, stage: str, tokens: int, seconds: float, live: int):
        if self.hook is None:
            return
        if hasattr(self.hook, "update"):  # a tqdm bar
            self.hook.set_description(stage, refresh=False)
            self.hook.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tok/s, {live} live", refresh=False)
            self.hook.update(tokens)
        else:
            self.hook(ProgressEvent(stage, tokens, seconds, live, self.kv_bytes))


# ----------------------------------------------------------------------------- input checks

def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        raise TypeError("prompts must be a list of prompts (each a list of token ids or a 1-D tensor); "
                        "wrap a single prompt tensor in a list: [ids]")
    if not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of prompts of token ids; got {type(prompts).__name__}")
    if prompts and all(isinstance(p, int) for p in prompts):
        raise TypeError("prompts must be a list of prompts, each a list of token ids; for one prompt pass [ids]")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype.is_floating_point:
                raise TypeError(f"prompt {i}: a tensor prompt must be 1-D integer token ids; got {p.dtype} "
                                f"{tuple(p.shape)}")
            p = p.tolist()
        elif isinstance(p, str):
            raise TypeError(f"prompt {i} is a string: tokenize it first (tokenizer.apply_chat_template"
                            "(..., tokenize=True) or tokenizer(text)['input_ids'])")
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        out.append([int(t) for t in p])
    return out


def _as_counts(n, num_prompts: int) -> list[int]:
    counts = list(n) if isinstance(n, (list, tuple)) else [n] * num_prompts
    if len(counts) != num_prompts:
        raise ValueError(f"n has {len(counts)} entries but there are {num_prompts} prompts: "
                         "pass one sample count per prompt, or one int for all")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"n must be an int >= 1 (samples per prompt); got {c!r}"
                             + (f" for prompt {i}" if isinstance(n, (list, tuple)) else ""))
    return counts


def _as_seeds(seed, counts: list[int]) -> list[list[int]]:
    if seed is None:
        flat = random_seeds(sum(counts))
        it = iter(flat)
        return [[next(it) for _ in range(c)] for c in counts]
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [[sample_seed(seed, i, j) for j in range(c)] for i, c in enumerate(counts)]
    if isinstance(seed, (list, tuple)) and len(seed) == len(counts) and all(
            isinstance(s, (list, tuple)) and len(s) == c for s, c in zip(seed, counts)):
        return [[int(x) for x in s] for s in seed]
    raise ValueError("seed must be None, an int, or per-sample seeds: one list of n_i ints per prompt "
                     f"(sample counts {counts}); see spell_core.sampling.token_selection.sample_seed for the seeds an int gives")


def _check_prompts_fit(prompts: list[list[int]], config) -> None:
    ctx, vocab = config.max_position_embeddings, config.vocab_size
    for i, p in enumerate(prompts):
        if len(p) >= ctx:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, which leaves no room to generate within the model's context "
                f"of {ctx} tokens (max_position_embeddings): shorten the prompt, or extend the context with "
                f"RoPE scaling (`--ctx`, e.g. --ctx {_round_ctx(len(p))}; in code "
                "model.config = spell_core.models.rope.with_rope_scaling(model.config, target_ctx))")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt {i} holds token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                             f"[0, {vocab})")


def _round_ctx(tokens: int) -> str:
    k = 1
    while k * 1024 <= tokens:
        k *= 2
    return f"{k}k"


def _parse_stop(stop, tokenizer, model, ignore_eos: bool) -> tuple[set[int], list[str]]:
    ids = set() if ignore_eos else default_stop_token_ids(tokenizer, model)
    strings = []
    items = [stop] if isinstance(stop, (int, str)) else list(stop or [])
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError("stop strings must be non-empty")
            strings.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            ids.add(item)
        else:
            raise TypeError(f"stop takes token ids (int) and strings; got {item!r}")
    if strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    return ids, strings


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Sampling:
    """The per-call choices the loop needs at every step."""
    temperature: float
    top_k: int
    top_p: float
    stop_ids: set[int]
    stops: _StopStrings

    @property
    def scale(self) -> float:
        return temperature_scale(self.temperature)

    def choose(self, scaled_logits: torch.Tensor, group: list[_Sample]) -> None:
        """Draw one token for each sample of `group` from its row of (len(group), V) logits at
        the temperature; append it and its log-prob; mark the samples that finish."""
        uniforms = draw_uniforms([s.generator for s in group]) if self.temperature > 0 else None
        tokens, logprobs = select_tokens(scaled_logits, self.top_k, self.top_p, uniforms)
        for s, t, lp in zip(group, tokens.tolist(), logprobs.tolist()):
            s.tokens.append(t)
            s.logprobs.append(lp)
            if t in self.stop_ids or (self.stops and self.stops.hit(s.tokens)):
                s.finish_reason = "stop"
            elif len(s.tokens) >= s.capacity:
                s.finish_reason = "length"


def generate(model, tokenizer, prompts, *, n: int | Sequence[int] = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop: Sequence[int | str] | None = None, seed: int | Sequence[Sequence[int]] | None = None,
             kv_budget_tokens: int | None = None, prefill_chunk_tokens: int | None = None,
             ignore_eos: bool = False, cuda_graph: bool = False,
             progress: Callable[[ProgressEvent], None] | None = None) -> list[list[Completion]]:
    """Sample `n` completions of each prompt; returns one list of `n` Completions per prompt.

    prompts: token-id lists (or 1-D tensors); n: an int, or one count per prompt.
    temperature 0 is greedy; top_k 0 and top_p 1 are off. stop: extra stop token ids and
    stop strings; the tokenizer's eos and the chat template's end-of-turn token always stop.
    seed: an int (sample j of prompt i then uses `sample_seed(seed, i, j)`), explicit
    per-sample seeds (`[[seed of sample j] for each prompt]`), or None (drawn from torch's
    global generator).
    kv_budget_tokens: KV cache size in tokens (default: everything at once, the sum over
    prompts of len(prompt) + n * max_new_tokens); requests that do not fit together run in
    waves. prefill_chunk_tokens: prompt tokens per forward pass (default 2048 on CPU, 8192
    on CUDA). cuda_graph: replay the decode step as a CUDA graph (CUDA only, see
    `decode_graph.py`). progress: a callable receiving `ProgressEvent`s, or a tqdm bar.
    ignore_eos: only the ids and strings of `stop` end a sample (benchmarks: fixed lengths).
    """
    check_sampling_params(temperature, top_p, top_k)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    prompts = _as_prompts(prompts)
    counts = _as_counts(n, len(prompts))
    config = model.config
    _check_prompts_fit(prompts, config)
    seeds = _as_seeds(seed, counts)
    stop_ids, stop_strings = _parse_stop(stop, tokenizer, model, ignore_eos)
    # near the end of the context a sample gets fewer new tokens (finish reason "length")
    new_tokens = [min(max_new_tokens, config.max_position_embeddings - len(p)) for p in prompts]
    needs = [len(p) + c * m for p, c, m in zip(prompts, counts, new_tokens)]
    budget = sum(needs) if kv_budget_tokens is None else int(kv_budget_tokens)
    _check_budget(needs, budget, prompts, counts, new_tokens, config, model.lm_head_weight.dtype)
    device = model.lm_head_weight.device
    chunk = prefill_chunk_tokens or DEFAULT_PREFILL_CHUNK_TOKENS.get(device.type, 2048)
    if chunk < 1:
        raise ValueError(f"prefill_chunk_tokens must be >= 1; got {chunk}")
    if cuda_graph:
        from spell_core.sampling.decode_graph import check_cuda_graph_support
        check_cuda_graph_support(model)
    if not prompts:
        return []

    sampling = _Sampling(temperature, top_k, top_p, stop_ids, _StopStrings(tokenizer, stop_strings))
    waves = plan_waves(needs, budget)
    results: list[list[Completion | None]] = [[None] * c for c in counts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            scratch = 1 if cuda_graph else 0  # a slot for the graph's padding rows to write to
            cache = KVCache(config, max(sum(needs[i] for i in w) for w in waves) + scratch,
                            model.lm_head_weight.dtype, device)
            report = _Progress(progress, cache.nbytes)
            for wave in waves:
                samples, routing = _run_wave(model, cache, [prompts[i] for i in wave],
                                             [counts[i] for i in wave], [new_tokens[i] for i in wave],
                                             [seeds[i] for i in wave], sampling, chunk, cuda_graph, report)
                for s, r in zip(samples, routing or [None] * len(samples)):
                    results[wave[s.request]][s.index] = _completion(s, tokenizer, sampling, r)
    finally:
        model.train(was_training)
    return results


def _check_budget(needs, budget, prompts, counts, new_tokens, config, dtype) -> None:
    if not needs:
        return
    i = max(range(len(needs)), key=needs.__getitem__)
    if needs[i] > budget:
        raise ValueError(
            f"kv_budget_tokens={budget} is too small: prompt {i} needs {needs[i]} tokens of KV cache "
            f"({len(prompts[i])} prompt + {counts[i]} samples x {new_tokens[i]} new tokens = "
            f"{needs[i] * kv_bytes_per_token(config, dtype) / 2**20:.1f} MiB); raise it to at least "
            f"{needs[i]}, or lower n / max_new_tokens")


def _completion(s: _Sample, tokenizer, sampling: _Sampling, routing: RoutedTokens | None) -> Completion:
    text = ""
    if tokenizer is not None:
        stopped_by_token = s.finish_reason == "stop" and s.tokens[-1] in sampling.stop_ids
        text = tokenizer.decode(s.tokens[:-1] if stopped_by_token else s.tokens)
        if sampling.stops:
            text = sampling.stops.cut(text)
    return Completion(list(s.tokens), list(s.logprobs), s.finish_reason, text, routing)


def _run_wave(model, cache, prompts, counts, new_tokens, seeds, sampling: _Sampling, chunk, cuda_graph,
              report) -> tuple[list[_Sample], list[RoutedTokens] | None]:
    layout = WaveLayout.build([len(p) for p in prompts], counts, new_tokens)
    samples, by_request = [], []
    for r, (c, seeds_r) in enumerate(zip(counts, seeds)):
        by_request.append([])
        for j in range(c):
            s = _Sample(r, j, len(prompts[r]), new_tokens[r], layout.own_start[len(samples)],
                        make_generators([seeds_r[j]])[0])
            samples.append(s)
            by_request[r].append(s)

    scale = sampling.scale
    routing = RoutingCapture(model) if RoutingCapture.enabled(model) else None
    for done_requests, hidden in _prefill(model, cache, prompts, layout, chunk, report, len(samples), routing):
        # one LM head row per prompt; each of its samples draws from that row
        logits = _lm_head(model, hidden, scale)
        rows = torch.tensor([counts[r] for r in done_requests], device=logits.device)
        sampling.choose(logits.repeat_interleave(rows, dim=0), [s for r in done_requests for s in by_request[r]])

    step = functools.partial(_decode_step, model, cache, layout, scale=scale, routing=routing)
    if cuda_graph:
        from spell_core.sampling.decode_graph import CudaGraphDecoder
        step = CudaGraphDecoder(model, cache, layout, counts, max(new_tokens), scale, _decode_tables,
                                _decode_step, routing=routing)
    live = [s for s in samples if s.finish_reason is None]
    while live:
        t0 = time.perf_counter()
        sampling.choose(step(live), live)
        decoded = len(live)
        live = [s for s in live if s.finish_reason is None]
        report("decode", decoded, time.perf_counter() - t0, len(live))
    return samples, (routing.records(layout, samples) if routing is not None else None)


def _prefill(model, cache, prompts, layout, chunk_tokens, report, num_samples, routing: RoutingCapture | None):
    """Yields (requests whose prompt ended in this chunk, their last hidden states (k, H)).
    routing: records each chunk's expert ids (MoE models)."""
    device = cache.k.device
    ends = [start + length for start, length in zip(layout.prompt_start, layout.prompt_len)]
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    total = ends[-1]
    r = 0  # first prompt overlapping the chunk
    for c0 in range(0, total, chunk_tokens):
        t0 = time.perf_counter()
        c1 = min(c0 + chunk_tokens, total)
        while ends[r] <= c0:
            r += 1
        cu_q, cu_k, positions, done, last_rows = [0], [0], [], [], []
        key_start = layout.prompt_start[r]
        p = r
        while p < len(prompts) and layout.prompt_start[p] < c1:
            start, end = layout.prompt_start[p], ends[p]
            lo, hi = max(c0, start), min(c1, end)
            cu_q.append(cu_q[-1] + hi - lo)
            cu_k.append(hi - key_start)  # this prompt's keys: [start, hi), right after the previous prompt's
            positions.append(torch.arange(lo - start, hi - start))
            if hi == end:
                done.append(p)
                last_rows.append(cu_q[-1] - 1)
            p += 1
        as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        attn = PrefillAttention(cache, c0, key_start, as_int(cu_q), as_int(cu_k),
                                max(b - a for a, b in zip(cu_q, cu_q[1:])), max(b - a for a, b in zip(cu_k, cu_k[1:])))
        record = {} if routing is None else {"routing": routing.recorder()}
        hidden = model.forward_hidden(flat[c0:c1], as_int(cu_q), torch.cat(positions).to(device), attn=attn, **record)
        if routing is not None:
            routing.prefill(record["routing"])
        report("prefill", c1 - c0, time.perf_counter() - t0, num_samples)
        if done:
            yield done, hidden.index_select(0, torch.tensor(last_rows, device=device))


def _decode_tables(layout, live: list[_Sample], device):
    """Inputs and attention tables of one decode step (live samples are grouped by request)."""
    ids, positions, slots, own_start, own_len = [], [], [], [], []
    prefix_start, prefix_len, cu = [], [], [0]
    for i, s in enumerate(live):
        k = len(s.tokens)
        ids.append(s.tokens[-1])
        positions.append(s.prompt_len + k - 1)
        slots.append(s.own_start + k - 1)
        own_start.append(s.own_start)
        own_len.append(k)
        if i == 0 or live[i - 1].request != s.request:
            prefix_start.append(layout.prompt_start[s.request])
            prefix_len.append(layout.prompt_len[s.request])
            cu.append(cu[-1])
        cu[-1] += 1
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    group_sizes = [b - a for a, b in zip(cu, cu[1:])]
    return dict(
        input_ids=as_long(ids), position_ids=as_long(positions), write_slots=as_long(slots),
        prefix_start=as_int(prefix_start), prefix_len=as_int(prefix_len), cu_group_queries=as_int(cu),
        own_start=as_int(own_start), own_len=as_int(own_len),
        max_group_queries=max(group_sizes), max_prefix_len=max(prefix_len), max_own_len=max(own_len))


def _lm_head(model, hidden: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits at the sampling temperature, (hidden * 1/T) @ W^T: the trainer's order of operations."""
    return linear(hidden * scale if scale != 1.0 else hidden, model.lm_head_weight)


def _decode_step(model, cache, layout, live: list[_Sample], scale: float = 1.0,
                 routing: RoutingCapture | None = None) -> torch.Tensor:
    """Logits (B, V) at the sampling temperature of the next token of every live sample (eager);
    routing: records the step's expert ids (MoE models)."""
    t = _decode_tables(layout, live, cache.k.device)
    attn = DecodeAttention(cache, t["write_slots"], t["prefix_start"], t["prefix_len"], t["cu_group_queries"],
                           t["own_start"], t["own_len"], t["max_group_queries"], t["max_prefix_len"],
                           t["max_own_len"])
    b = len(live)
    cu = torch.arange(b + 1, dtype=torch.int32, device=cache.k.device)
    record = {} if routing is None else {"routing": routing.recorder()}
    hidden = model.forward_hidden(t["input_ids"], cu, t["position_ids"], attn=attn, **record)
    if routing is not None:
        routing.decode(record["routing"], live)
    return _lm_head(model, hidden, scale)
