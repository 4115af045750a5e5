"""Shared-prefix attention: G responses to one long prompt, packed as [prefix, resp_1, ..., resp_G],
forwarded and back-propagated with the prefix computed once.

A packed batch is a list of segments (cu_seqlens, as varlen attention) plus `parent` (S,) int32:
for a response segment, the index of its prefix segment; -1 for a prefix or a plain sequence.
Every segment attends causally to itself; a response also attends to all of its parent's tokens
and never to its siblings. Response outputs equal those of running [prefix + resp_i] as one
sequence; the prefix's gradients are the sum over its G responses (and its own rows). Several
groups and plain sequences pack into one call.

The kernels are flash_attn's (a second key range per query segment, inside the same Triton
kernels; the CPU path merges the two ranges by log-sum-exp), so this module only describes
batches and wraps them for a model:

    layout = SharedPrefixLayout.from_groups([(8192, [512] * 8), 300])  # a group and a plain sequence
    attn = SharedPrefixAttention(layout.to(device))
    hidden = model.forward_hidden(input_ids, layout.cu_seqlens, layout.position_ids, attn=attn)

Positions: a response's tokens continue the prefix's (prefix 0..P-1, response P..P+R-1), exactly
as in the unpacked sequence [prefix + resp_i]; `layout.position_ids` holds them.
"""
from dataclasses import dataclass

import torch

from .flash_attn import FlashAttnVarlenFunc


def shared_prefix_attn_func(q, k, v, cu_seqlens, max_seqlen, parent, softmax_scale=None, causal=True,
                            return_lse=False):
    """Self-attention over a packed batch of segments where segment s also sees all keys of
    segment parent[s] (if parent[s] >= 0).

    q (T, Hq, D), k/v (T, Hkv, D) packed alike; cu_seqlens int32 (S+1,); max_seqlen the longest
    segment; parent int32 (S,), -1 for none, one level deep (a parent has no parent of its own).
    Returns out (T, Hq, D), and lse (Hq, T) fp32 (fp64 for fp64 inputs) when return_lse.
    Differentiable in q, k, v.
    """
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale,
                                         causal, parent)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class SharedPrefixLayout:
    """How a packed batch is cut: segments, their parents and the tokens' positions."""

    cu_seqlens: torch.Tensor  # (S+1,) int32
    parent: torch.Tensor  # (S,) int32, -1 = none
    position_ids: torch.Tensor  # (T,) int64
    max_seqlen: int

    @classmethod
    def from_segments(cls, lengths, parent, device=None):
        """Segments in packing order: lengths[s] tokens, parent[s] the index of its prefix or -1."""
        lengths, parent = [int(n) for n in lengths], [int(p) for p in parent]
        if len(lengths) != len(parent):
            raise ValueError(f"{len(lengths)} segment lengths but {len(parent)} parents")
        for s, (n, p) in enumerate(zip(lengths, parent)):
            if n < 0:
                raise ValueError(f"segment {s} has negative length {n}")
            if p != -1 and not 0 <= p < len(lengths):
                raise ValueError(f"parent[{s}] = {p} is not -1 or a segment index")
            if p == s or (p >= 0 and parent[p] != -1):
                raise ValueError(f"parent[{s}] = {p}: a parent must be another segment without a parent itself")
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        positions = [torch.arange(n) + (lengths[p] if p >= 0 else 0) for n, p in zip(lengths, parent)]
        return cls(cu_seqlens=torch.tensor(starts, dtype=torch.int32, device=device),
                   parent=torch.tensor(parent, dtype=torch.int32, device=device),
                   position_ids=(torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)).to(device),
                   max_seqlen=max(lengths, default=0))

    @classmethod
    def from_groups(cls, groups, device=None):
        """groups: each an int (a plain sequence of that length) or (prefix_len, [response lengths]),
        packed in order as prefix, responses."""
        lengths, parent = [], []
        for g in groups:
            if isinstance(g, int):
                lengths.append(g)
                parent.append(-1)
                continue
            prefix_len, response_lens = g
            p = len(lengths)
            lengths.append(int(prefix_len))
            parent.append(-1)
            for n in response_lens:
                lengths.append(int(n))
                parent.append(p)
        return cls.from_segments(lengths, parent, device)

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.numel())

    def to(self, device):
        return SharedPrefixLayout(self.cu_seqlens.to(device), self.parent.to(device), self.position_ids.to(device),
                                  self.max_seqlen)


class SharedPrefixAttention:
    """Attention backend `attn(layer_idx, q, k, v) -> out (T, Hq, D)` for a model forward over a
    packed shared-prefix batch (the model computes q/k/v with layout.position_ids)."""

    def __init__(self, layout: SharedPrefixLayout, softmax_scale=None):
        self.layout = layout
        self.softmax_scale = softmax_scale

    def __call__(self, layer_idx, q, k, v):
        return shared_prefix_attn_func(q, k, v, self.layout.cu_seqlens, self.layout.max_seqlen, self.layout.parent,
                                       self.softmax_scale, causal=True)
