"""The expert ids of one wave of an MoE model's generation, collected as it runs (issue 22).

Each prefill chunk and each decode step runs its forward with a fresh `Routing("record")`;
`prefill` / `decode` stack that record into a (rows, L, k) tensor and keep it on the model's
device (no host sync per step: the rows of a step are known from the live list on the host).
`records` moves everything to the CPU once, at the end of the wave, and cuts it per sample into
`RoutedTokens`: the prompt's rows (one tensor per prompt, shared by its samples) and the rows of
every token the sample fed back (all generated tokens but the last).
"""
from __future__ import annotations

import torch

from spell_core.models.moe import expert_id_dtype
from spell_core.models.routed_tokens import RoutedTokens, moe_layers, stack_record
from spell_core.models.routing import Routing

__all__ = ["RoutingCapture"]


class RoutingCapture:
    def __init__(self, model):
        self.layers = moe_layers(model.config)
        self.dtype = expert_id_dtype(model.config.num_experts)
        self.prefill_rows: list[torch.Tensor] = []
        self.decode_rows: list[torch.Tensor] = []
        self.sample_rows: dict[tuple[int, int], list[int]] = {}  # (request, index) -> rows among decode_rows
        self.num_decode_rows = 0

    @staticmethod
    def enabled(model) -> bool:
        return bool(moe_layers(model.config))

    @staticmethod
    def recorder() -> Routing:
        return Routing("record")

    def prefill(self, routing: Routing) -> None:
        """One chunk's record: its rows are the next prompt tokens of the wave, in order."""
        self.prefill_rows.append(stack_record(routing, self.layers, self.dtype))

    def decode(self, routing: Routing, live: list) -> None:
        """One decode step's record: row b is live[b]'s input token (rows past len(live): a CUDA
        graph's padding, dropped)."""
        self.decode_rows.append(stack_record(routing, self.layers, self.dtype)[:len(live)])
        for b, s in enumerate(live):
            self.sample_rows.setdefault((s.request, s.index), []).append(self.num_decode_rows + b)
        self.num_decode_rows += len(live)

    def records(self, layout, samples: list) -> list[RoutedTokens]:
        """One RoutedTokens per sample (in `samples` order), on the CPU."""
        prompt_rows = torch.cat(self.prefill_rows).cpu()
        decode_rows = torch.cat(self.decode_rows).cpu() if self.decode_rows else prompt_rows.new_empty(
            (0,) + tuple(prompt_rows.shape[1:]))
        prompts = [prompt_rows[start:start + length].clone()
                   for start, length in zip(layout.prompt_start, layout.prompt_len)]
        out = []
        for s in samples:
            rows = self.sample_rows.get((s.request, s.index), [])
            out.append(RoutedTokens(prompts[s.request], decode_rows[torch.tensor(rows, dtype=torch.long)]))
        return out
