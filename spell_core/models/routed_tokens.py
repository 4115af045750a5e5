"""The sampler's expert choices kept beside each trajectory, for the trainer to replay (issue 22).

Per token the sampler forwarded, the ids each MoE layer chose: a (T, L, k) tensor, L = the
model's MoE layers in order (`moe_layers`), k = num_experts_per_tok, stored in the dtype of
`models.moe.expert_id_dtype` (uint8 up to 256 experts): k bytes per token per layer. A sample's record
(`RoutedTokens`) is its prompt's rows (one tensor shared by the prompt's samples) and its
response's rows. The sampler never forwards a sample's last token (it is drawn and the sample
ends), so a response of N tokens has N - 1 rows; the trainer's forward of that last token
reaches no log-prob (nothing comes after it), and `packed_rows` gives it a copy of the row
before it.

`as_replay` turns packed rows into the `Routing("replay", ...)` that `forward_hidden` takes
(spell_core/models/routing.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spell_core.models.routing import Routing

__all__ = ["RoutedTokens", "moe_layers", "stack_record", "as_replay", "expert_load_metrics",
           "packed_rows", "RoutingRecordError"]


class RoutingRecordError(ValueError):
    """A trajectory's expert record is missing or does not match its tokens."""


def moe_layers(config) -> tuple[int, ...]:
    """Indices of the decoder layers with a routed MoE block; () for a dense model."""
    if not getattr(config, "num_experts", 0):
        return ()
    return tuple(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))


def stack_record(routing: Routing, layers: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(T, L, k) ids of a forward pass run with `routing` in record mode (stays on its device)."""
    missing = [i for i in layers if i not in routing.experts]
    if missing:
        raise RuntimeError(f"MoE layer(s) {missing} recorded no expert ids (Routing('record') was passed to "
                           "forward_hidden but did not reach them)")
    return torch.stack([routing.experts[i].to(dtype) for i in layers], dim=1)


def as_replay(rows: torch.Tensor, layers: tuple[int, ...]) -> Routing:
    """Routing('replay') from packed (T, L, k) ids, on the rows' device."""
    return Routing("replay", {layer: rows[:, j] for j, layer in enumerate(layers)})


@dataclass
class RoutedTokens:
    """One sample's expert ids: prompt (P, L, k), shared by the prompt's samples; response
    (N - 1, L, k), every generated token but the last (never forwarded by the sampler)."""
    prompt: torch.Tensor
    response: torch.Tensor

    def check(self, prompt_len: int, response_len: int, layers: tuple[int, ...], k: int, what: str) -> None:
        """A clear error when the record does not fit `prompt_len` + `response_len` tokens of a
        model with `layers` MoE layers choosing k experts each."""
        shape = (len(layers), k)
        for name, rows, want in (("prompt", self.prompt, prompt_len), ("response", self.response,
                                                                         max(response_len - 1, 0))):
            if rows.dim() != 3 or tuple(rows.shape[1:]) != shape:
                raise RoutingRecordError(
                    f"{what}: its {name} expert record has shape {tuple(rows.shape)}, expected (tokens, {shape[0]} "
                    f"MoE layers, {k} experts per token): was it sampled by another model?")
            if rows.shape[0] != want:
                raise RoutingRecordError(
                    f"{what}: its {name} expert record has {rows.shape[0]} rows for {want} tokens the sampler "
                    f"forwarded ({name} of {prompt_len if name == 'prompt' else response_len} tokens"
                    f"{'' if name == 'prompt' else ', the last never forwarded'}); the record and the token ids "
                    "must come from the same generate call")


def packed_rows(prompt: torch.Tensor, responses: list[torch.Tensor], response_lens: list[int]) -> list[torch.Tensor]:
    """The rows of one packed unit, in the trainer's token order: the prompt once, then each
    response's rows plus one for its last token (a copy of the row before it); a plain
    [prompt + response] sequence is the same with one response."""
    pieces = [prompt]
    for rows, n in zip(responses, response_lens):
        if n:
            pieces += [rows, rows[-1:] if len(rows) else prompt[-1:]]
    return pieces


def expert_load_metrics(model) -> dict:
    """The model's expert load since the last call (CausalLM.read_expert_load, which resets it):
    "expert_load", per MoE layer the token slots routed to each expert, and
    "expert_load_imbalance", the busiest expert's count over the mean, worst layer (1.0: even;
    None without tokens). {} for a dense model."""
    read = getattr(model, "read_expert_load", None)
    load = read() if read is not None else {}
    if not load:
        return {}
    counts = torch.stack([load[i] for i in sorted(load)]).cpu()
    mean = counts.double().mean(dim=1)
    busy = mean > 0
    imbalance = float((counts.double().amax(dim=1)[busy] / mean[busy]).max()) if bool(busy.any()) else None
    return {"expert_load": counts.tolist(), "expert_load_imbalance": imbalance}
