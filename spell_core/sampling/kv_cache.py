"""The sampler's KV cache: one flat slot pool per layer, its layout, and the two attention
backends (chunked prefill, decode) that plug into `CausalLM.forward_hidden`'s attention seam.

Layout of one wave of requests (request r: prompt of P_r tokens, n_r samples, up to N_r new
tokens each), slots in this order:

    [prompt_0 | prompt_1 | ... | sample (0,0) | sample (0,1) | ... | sample (1,0) | ...]
     P_0        P_1              N_0            N_0                   N_1

The prompts are stored once, whatever n_r; each sample owns N_r slots for the keys of the
tokens it generates. The pool is allocated once, for the largest wave, and reused.
"""
from dataclasses import dataclass

import torch

import spell_kernels

__all__ = ["KVCache", "WaveLayout", "plan_waves", "kv_bytes_per_token", "PrefillAttention", "DecodeAttention"]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V of one token over all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def plan_waves(needs: list[int], budget: int) -> list[list[int]]:
    """Requests (indices, in order) grouped into waves whose KV needs sum to at most `budget`.
    Each need must fit the budget on its own (the caller checks and explains)."""
    waves, current, used = [], [], 0
    for i, need in enumerate(needs):
        if current and used + need > budget:
            waves.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    if current:
        waves.append(current)
    return waves


@dataclass
class WaveLayout:
    """Slot ranges of one wave: prompt r at [prompt_start[r], +prompt_len[r]); sample s
    (samples numbered request by request) at [own_start[s], +own_capacity[s])."""
    prompt_start: list[int]
    prompt_len: list[int]
    own_start: list[int]
    own_capacity: list[int]
    num_slots: int

    @classmethod
    def build(cls, prompt_lens: list[int], samples: list[int], new_tokens: list[int]) -> "WaveLayout":
        prompt_start, cursor = [], 0
        for length in prompt_lens:
            prompt_start.append(cursor)
            cursor += length
        own_start, own_capacity = [], []
        for n, cap in zip(samples, new_tokens):
            for _ in range(n):
                own_start.append(cursor)
                own_capacity.append(cap)
                cursor += cap
        return cls(prompt_start, list(prompt_lens), own_start, own_capacity, cursor)


class KVCache:
    """k[layer], v[layer]: (num_slots, Hkv, D) views of one allocation each."""

    def __init__(self, config, num_slots: int, dtype: torch.dtype, device: torch.device):
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class PrefillAttention:
    """Attention backend for one prefill chunk: a contiguous run of the wave's prompt tokens
    (the tail of one prompt, whole prompts, the head of another), which occupies slots
    [chunk_start, chunk_start + T). Writes the chunk's K/V there, then each segment's queries
    attend causally (bottom-right aligned) to its prompt's cached keys and its own.

    key_start: first slot of the chunk's first prompt; cu_seqlens_k runs over slots
    [key_start, chunk_start + T), which holds exactly the segments' keys, back to back."""

    def __init__(self, cache: KVCache, chunk_start: int, key_start: int, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int):
        self.cache, self.chunk_start, self.key_start = cache, chunk_start, key_start
        self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        self.max_q, self.max_k = max_seqlen_q, max_seqlen_k

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.chunk_start + q.shape[0]
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache[self.chunk_start:end] = k
        v_cache[self.chunk_start:end] = v
        return spell_kernels.flash_attn_varlen_func(
            q, k_cache[self.key_start:end], v_cache[self.key_start:end], self.cu_q, self.cu_k,
            self.max_q, self.max_k, causal=True)


class DecodeAttention:
    """Attention backend for one decode step: query b (one token per live sample) writes its
    K/V to slot write_slots[b] (the next of its own slots), then attends to its group's
    prompt slots and its own slots (`spell_kernels.decode_attn_shared_prefix`), so the prompt
    KV is read once per group, not once per sample."""

    def __init__(self, cache: KVCache, write_slots: torch.Tensor, prefix_start: torch.Tensor,
                 prefix_len: torch.Tensor, cu_group_queries: torch.Tensor, own_start: torch.Tensor,
                 own_len: torch.Tensor, max_group_queries: int, max_prefix_len: int, max_own_len: int):
        self.cache, self.write_slots = cache, write_slots
        self.tables = (prefix_start, prefix_len, cu_group_queries, own_start, own_len)
        self.maxima = dict(max_group_queries=max_group_queries, max_prefix_len=max_prefix_len,
                           max_own_len=max_own_len)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.write_slots, k)
        v_cache.index_copy_(0, self.write_slots, v)
        return spell_kernels.decode_attn_shared_prefix(q, k_cache, v_cache, *self.tables, **self.maxima)
