"""Rotary position embeddings with the scaling types Llama / Qwen2 / Qwen3 configs use.

The frequency formulas follow transformers' `modeling_rope_utils` so that logits match it.
A rope dict (see `rope_parameters_from_hf`) always carries `rope_type` and `rope_theta`,
plus the fields its type needs (`factor`, `original_max_position_embeddings`, ...).
"""
import dataclasses
import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_parameters_from_hf(raw: dict, source: str = "config.json") -> dict:
    """The rope dict of an HF config: transformers 5 writes `rope_parameters` (theta inside),
    older configs write `rope_theta` + `rope_scaling` (type under `type` or `rope_type`)."""
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope = dict(scaling)
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type != "default" and rope.get("factor") is None and rope_type != "yarn":
        raise ValueError(f"{source}: RoPE type {rope_type!r} needs a 'factor'")
    if rope_type in ("yarn", "llama3"):
        # transformers lets a top-level original_max_position_embeddings override the dict's
        original = raw.get("original_max_position_embeddings")
        if original is None:
            original = rope.get("original_max_position_embeddings", raw["max_position_embeddings"])
        rope["original_max_position_embeddings"] = original
    return rope


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(rope: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    theta = rope["rope_theta"]
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(rope: dict, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(rope["rope_theta"], dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(rope: dict, head_dim: int, max_position_embeddings: int,
                        seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) float32 on CPU, attention_factor multiplying cos and sin).
    `seq_len` only matters for `dynamic`: the NTK base grows once a sequence passes
    max_position_embeddings."""
    rope_type, theta = rope["rope_type"], rope["rope_theta"]
    if rope_type == "default":
        return _default_inv_freq(theta, head_dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(theta, head_dim) / rope["factor"], 1.0
    if rope_type == "dynamic":
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        factor = rope["factor"]
        base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(base, head_dim), 1.0
    if rope_type == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    if rope_type == "llama3":
        return _llama3(rope, head_dim), 1.0
    raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rotary_cos_sin(rope: dict, head_dim: int, max_position_embeddings: int, position_ids: torch.Tensor,
                   cu_seqlens: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """cos, sin (T, head_dim) in `dtype` for packed position ids (T,).

    `dynamic` scaling depends on sequence length: each packed sequence (from cu_seqlens, or all
    tokens as one sequence without it) gets the frequencies transformers computes for that
    sequence run alone, with length = its largest position + 1."""
    device = position_ids.device
    positions = position_ids.float()
    if rope["rope_type"] == "dynamic" and position_ids.numel():
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, position_ids.numel()], device=device)
        lengths = cu_seqlens.diff().long()
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        seq_len = torch.zeros(len(lengths), dtype=torch.long, device=device).scatter_reduce(
            0, seq_of_token, position_ids.long() + 1, "amax")
        table = {n: inverse_frequencies(rope, head_dim, max_position_embeddings, n)[0]
                 for n in set(seq_len.tolist())}
        inv_freq = torch.stack([table[n] for n in seq_len.tolist()]).to(device)[seq_of_token]  # (T, D/2)
        freqs, attention_factor = positions[:, None] * inv_freq, 1.0
    else:
        inv_freq, attention_factor = inverse_frequencies(rope, head_dim, max_position_embeddings)
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by cos/sin (T, head_dim), half-split layout (HF's)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    # in x's dtype, as transformers does: under bf16 autocast q/k must stay bf16 like v
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def with_rope_scaling(config, target_ctx: int):
    """A copy of a model config (`spell_core.models.model.ModelConfig`) that covers `target_ctx`
    tokens; the config itself when its native context already does.

    The choice is YaRN with factor = target_ctx / native context: its frequencies are
    static, so keys cached by the sampler stay valid as a sequence grows and the log-probs
    seen at sampling and at training time agree (dynamic NTK changes every frequency with
    the current length, which breaks both). YaRN keeps the high-frequency dimensions of the
    native model untouched and is the recipe Qwen documents for its long-context releases.
    A checkpoint already using YaRN gets its factor raised against its original context;
    other existing scalings (linear, dynamic, llama3) are refused, not stacked.
    """
    native = config.max_position_embeddings
    if target_ctx <= native:
        return config
    rope = dict(config.rope)
    if rope["rope_type"] == "default":
        original = native
    elif rope["rope_type"] == "yarn":
        original = rope["original_max_position_embeddings"]
    else:
        raise ValueError(
            f"the checkpoint already uses {rope['rope_type']!r} RoPE scaling up to {native} tokens; "
            f"extending it to {target_ctx} is not supported: edit rope_parameters in its config.json "
            f"(or pick a context of at most {native})")
    rope.update(rope_type="yarn", factor=target_ctx / original, original_max_position_embeddings=original)
    raw = dict(config.raw, max_position_embeddings=target_ctx)
    if "rope_parameters" in raw or "rope_scaling" not in raw:  # keep the file's own style
        raw.pop("rope_scaling", None)
        raw["rope_parameters"] = rope
    else:
        raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        raw["rope_theta"] = rope["rope_theta"]
    return dataclasses.replace(config, rope=rope, max_position_embeddings=target_ctx, raw=raw)
