"""Checks that need the model's size or speed, done before minutes are spent: how big a training
checkpoint will be (from the safetensors headers, no weights read) and how long a --ctx far
beyond the model's context will take on this machine."""
from __future__ import annotations

import time
import torch

# YaRN is documented (Qwen) up to a factor of 4 over the native context; further it degrades
MAX_ROPE_FACTOR = 4
SLOW_STEP_S = 600  # warn when reading one step's prompts alone is estimated above this
SHORT_CTX = 16 * 1024  # up to this (or the native context) no estimate is made

_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def parameter_count(model_folder) -> tuple[int, int]:
    """(parameters, bytes per stored parameter) from the safetensors headers of a model folder."""
    from safetensors import safe_open

    from spell_core.models.checkpoint import weight_files

    files = weight_files(model_folder)
    numel, nbytes = 0, 0
    for file in set(files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                n = 1
                for d in view.get_shape():
                    n *= d
                numel += n
                nbytes += n * _BYTES.get(view.get_dtype(), 4)
    return numel, max(1, round(nbytes / max(numel, 1)))


def checkpoint_bytes(model_folder, device: str) -> int:
    """A training checkpoint: weights + AdamW's two moments, in the training dtype (fp32 on a
    CPU, the stored dtype on a GPU), plus a margin for the tokenizer and the random states."""
    numel, stored = parameter_count(model_folder)
    train = 4 if not str(device).startswith("cuda") else stored
    return 3 * numel * train + 64 * 2**20


def _flops_per_second(device, dtype) -> float:
    """Measured: a few square matmuls in the model's dtype (a fraction of a second); large enough on
    a GPU that launch overheads do not count."""
    n = 4096 if torch.device(device).type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    if a.is_cuda:
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 3 if not a.is_cuda else 50
    for _ in range(reps):
        a @ a
    if a.is_cuda:
        torch.cuda.synchronize()
    return reps * 2 * n**3 / max(time.perf_counter() - start, 1e-9)


def long_context_warning(model, ctx: int, native_ctx: int, prompts_per_step: int) -> str | None:
    """A warning when --ctx goes beyond what RoPE scaling serves (MAX_ROPE_FACTOR x native) or when,
    above the native context and SHORT_CTX, reading one step's prompts of ctx tokens is estimated to
    take longer than SLOW_STEP_S here."""
    too_long = ctx > MAX_ROPE_FACTOR * native_ctx
    if not too_long and ctx <= max(native_ctx, SHORT_CTX):
        return None  # nothing to measure: the context the model was made for
    weight = model.lm_head_weight
    n_params = active_parameters(model)
    layers, hidden = model.config.num_hidden_layers, model.config.num_attention_heads * model.config.head_dim
    flops = 2 * n_params * ctx + 2 * layers * hidden * ctx * ctx  # weights, plus causal attention (QK and PV)
    per_prompt = flops / _flops_per_second(weight.device, weight.dtype)
    per_step = per_prompt * prompts_per_step
    if not too_long and per_step < SLOW_STEP_S:
        return None
    reason = (f"--ctx {ctx:,} is {ctx / native_ctx:.0f}x the model's native context of {native_ctx:,} (RoPE "
              f"scaling is reliable up to about {MAX_ROPE_FACTOR}x)" if too_long else f"--ctx {ctx:,} is long for "
              "this machine")
    return (f"spell: warning: {reason}. Expected time on this machine: about {_duration(per_prompt)} to read one "
            f"prompt of that length, {_duration(per_step)} for the {prompts_per_step} prompts of a step, before any "
            "token is generated (progress shows 0 tok meanwhile); lower --ctx for a quicker run")


def active_parameters(model) -> int:
    """Parameters a token meets: all of them, less the experts a mixture-of-experts layer does not
    route it to (each SparseMoeBlock runs top_k of its num_experts)."""
    total = sum(p.numel() for p in model.parameters())
    modules = model.modules() if hasattr(model, "modules") else ()
    for block in modules:
        if hasattr(block, "top_k") and hasattr(block, "experts"):
            experts = sum(p.numel() for p in block.experts.parameters())
            total -= experts * (block.num_experts - block.top_k) // block.num_experts
    return total


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
