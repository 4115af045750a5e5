"""One decoder for the Llama, Qwen2, Qwen3 and Qwen3-MoE families, on packed inputs.

Inputs are packed: input_ids (T,), cu_seqlens (B+1,) int32, position_ids (T,); there is no
padding anywhere. Module and parameter names mirror transformers' (`model.layers.3.self_attn.
q_proj.weight`, `lm_head.weight`), so HF checkpoints load and save without a name map.

Attention seam: every layer computes q (T, Hq, D), k and v (T, Hkv, D) after q/k norm and
RoPE, then calls an attention backend `attn(layer_idx, q, k, v) -> out (T, Hq, D)`. The
default is causal varlen attention within each packed sequence; the sampler passes a
backend that keeps a KV cache, the trainer one that shares a prefix across responses.

Qwen3-MoE layers swap the MLP for `models.moe.SparseMoeBlock`; `forward_hidden(..., routing=)`
records or replays their expert choices (`models.routing`).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import spell_kernels
from spell_core.models import checkpoint as ckpt
from spell_core.models import moe_checkpoint
from spell_core.models.linear import Linear
from spell_core.models.moe import RouterStats, SparseMoeBlock, is_moe_layer, moe_fields, router_aux_loss
from spell_core.models.rope import apply_rotary, rope_parameters_from_hf, rotary_cos_sin, with_rope_scaling
from spell_core.models.routing import Routing

__all__ = ["ModelConfig", "CausalLM", "VarlenCausalAttention", "load_pretrained", "save_pretrained",
           "config_from_folder", "with_rope_scaling", "SUPPORTED_ARCHITECTURES", "read_weights", "hf_tensors"]

# model_type -> the architecture name transformers knows it by
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM"}

AttentionBackend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs from an HF config.json; `raw` keeps the whole file for saving."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    dtype: torch.dtype | None = None  # the checkpoint's storage dtype, when config.json says
    # qwen3_moe only (num_experts 0: every layer dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
            raise ValueError(f"{source}: model_type {model_type!r} (architectures {architectures}) is not "
                             f"supported; supported: {supported}")
        unknown = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES.values()]
        if unknown:
            raise ValueError(f"{source}: architecture {unknown[0]!r} is not supported; supported: "
                             + ", ".join(SUPPORTED_ARCHITECTURES.values()))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        if any(t != "full_attention" for t in raw.get("layer_types") or []) or raw.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention layers are not supported; "
                             "set use_sliding_window to false")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
        raw = dict(raw)
        raw.setdefault("max_position_embeddings", 2048 if model_type == "llama" else 32768)
        attention_bias = bool(raw.get("attention_bias", False))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype")
        moe = moe_fields(raw, raw["num_hidden_layers"], source) if model_type == "qwen3_moe" else {}
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw["max_position_embeddings"],
            rope=rope_parameters_from_hf(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,  # Qwen2 always has q/k/v bias
            o_bias=attention_bias if model_type != "qwen2" else False,
            mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            dtype=_DTYPES.get(dtype_name),
            raw=raw,
            **moe,
        )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return is_moe_layer(layer_idx, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers)

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """config.json contents: the raw dict, with the architecture and (if given) dtype."""
        raw = dict(self.raw, model_type=self.model_type, architectures=[SUPPORTED_ARCHITECTURES[self.model_type]])
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            raw["dtype"] = name
            if "torch_dtype" in raw:
                raw["torch_dtype"] = name
        return raw


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.head_dim = d
        self.q_proj = Linear(config.hidden_size, hq * d, bias=config.qkv_bias)
        self.k_proj = Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.v_proj = Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.o_proj = Linear(hq * d, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn: AttentionBackend, layer_idx: int):
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)
        k = self.k_proj(x).view(t, -1, self.head_dim)
        v = self.v_proj(x).view(t, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # under autocast the fp32 norm weights promote q/k while v stays in the autocast dtype;
        # attention kernels take one dtype (transformers' SDPA gets this from autocast itself)
        q, k = q.to(v.dtype), k.to(v.dtype)
        return self.o_proj(attn(layer_idx, q, k, v).reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                                      config.moe_intermediate_size, config.norm_topk_prob)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn: AttentionBackend, layer_idx: int, routing: Routing | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, layer_idx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, layer_idx, routing) if isinstance(self.mlp, SparseMoeBlock) else self.mlp(h))


class Decoder(nn.Module):
    """Embedding, layers, final norm (transformers' `model.` submodule)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class VarlenCausalAttention:
    """Default attention backend: causal attention within each packed sequence."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None):
        self.cu_seqlens = cu_seqlens
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if len(cu_seqlens) > 1 else 0
        self.max_seqlen = max_seqlen

    def __call__(self, layer_idx: int, q, k, v):
        return spell_kernels.flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens,
                                                    self.max_seqlen, self.max_seqlen, causal=True)


class CausalLM(nn.Module):
    """Decoder + LM head. `lm_head_weight` is the (V, H) head (the embedding when tied).

    MoE models: with `router_aux_loss_coef` > 0 (off by default: RL does not want it) every
    forward leaves `router_aux_loss` = coef x transformers' load-balancing loss over its MoE
    layers, for the caller to add to its loss; `read_expert_load()` returns and resets the
    per-layer token counts per expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.gradient_checkpointing = False
        self.router_aux_loss_coef = 0.0
        self.router_aux_loss: torch.Tensor | None = None

    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        """Layer index -> its sparse block, for the MoE layers."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)}

    def read_expert_load(self) -> dict[int, torch.Tensor]:
        """Layer index -> (E,) int64 tokens routed to each expert (each token counts k times) by
        the forwards since the last read; stays on the device (no host sync) and resets."""
        return {i: block.read_expert_load() for i, block in self.moe_blocks().items()}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward_hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, attn: AttentionBackend | None = None,
                       routing: Routing | None = None) -> torch.Tensor:
        """Final-norm hidden states (T, hidden) of packed input_ids (T,).

        cu_seqlens defaults to one sequence; position_ids to 0..L-1 per sequence; attn to
        causal attention within each sequence of cu_seqlens; routing records or replays the
        MoE layers' expert ids (`models.routing`; ignored by dense models)."""
        blocks = self.moe_blocks().values()
        stats = None
        if self.router_aux_loss_coef and blocks:
            zeros = torch.zeros(self.config.num_experts, dtype=torch.float32, device=input_ids.device)
            stats = RouterStats(zeros, zeros.clone())
        for block in blocks:
            block.live, block.stats = True, stats
        try:
            hidden = self._forward_hidden(input_ids, cu_seqlens, position_ids, attn, routing)
        finally:
            for block in blocks:
                block.live, block.stats = False, None
        self.router_aux_loss = (self.router_aux_loss_coef * router_aux_loss(stats, self.config.num_experts)
                                if stats is not None else None)
        return hidden

    def _forward_hidden(self, input_ids, cu_seqlens, position_ids, attn, routing) -> torch.Tensor:
        cu_seqlens = _check_packed(input_ids, cu_seqlens, position_ids)
        if position_ids is None:
            position_ids = spell_kernels.position_ids_from_cu_seqlens(cu_seqlens)
        if attn is None:
            attn = VarlenCausalAttention(cu_seqlens)
        c = self.config
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(c.rope, c.head_dim, c.max_position_embeddings, position_ids, cu_seqlens,
                                  dtype=x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn, i, routing, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, i, routing)
        return self.model.norm(x)

    def forward(self, input_ids, cu_seqlens=None, position_ids=None, attn=None, routing=None) -> torch.Tensor:
        """Logits (T, vocab). Prefer token_logprobs when only the targets' log-probs are needed."""
        return F.linear(self.forward_hidden(input_ids, cu_seqlens, position_ids, attn, routing), self.lm_head_weight)

    def token_logprobs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                       routing: Routing | None = None) -> torch.Tensor:
        """(T,) float32: log p(token t | earlier tokens of its sequence); the first token of
        each sequence gets 0. Logits are never materialised (fused linear log-prob)."""
        cu_seqlens = _check_packed(input_ids, cu_seqlens, position_ids)
        hidden = self.forward_hidden(input_ids, cu_seqlens, position_ids, routing=routing)
        # the hidden state at t predicts token t+1 unless t is the last token of its sequence
        targets = torch.full_like(input_ids, -100)
        targets[:-1] = input_ids[1:]
        ends = cu_seqlens[1:].long() - 1
        targets[ends[ends >= 0]] = -100
        next_logp = spell_kernels.fused_linear_logprob(hidden, self.lm_head_weight, targets,
                                                       temperature=temperature, ignore_index=-100)
        return torch.cat([next_logp.new_zeros(1), next_logp[:-1]]) if len(next_logp) else next_logp


def _check_packed(input_ids, cu_seqlens, position_ids) -> torch.Tensor:
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be packed, shape (T,); got {tuple(input_ids.shape)} "
                         "(concatenate the sequences and pass cu_seqlens)")
    t = input_ids.shape[0]
    if cu_seqlens is None:
        return torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must be int32 of shape (B+1,); got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t:
        raise ValueError(f"cu_seqlens must run from 0 to len(input_ids) = {t}; got "
                         f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if position_ids is not None and position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids must have input_ids' shape {tuple(input_ids.shape)}; "
                         f"got {tuple(position_ids.shape)}")
    return cu_seqlens


# a tied head stored anyway, and rotary buffers some older Llama checkpoints carry
_IGNORED_TENSORS = (r"rotary_emb\.inv_freq$",)


def load_pretrained(path_or_alias, dtype: torch.dtype | None = None, device=None):
    """(model, tokenizer) from a local HF checkpoint folder or a model alias (see
    `spell_core.models.assets.resolve_model`). dtype defaults to the checkpoint's on CUDA and to
    float32 on CPU."""
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    folder = resolve_model(path_or_alias)
    config = config_from_folder(folder)
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = (config.dtype or torch.float32) if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    ignore = _IGNORED_TENSORS + ((r"^lm_head\.weight$",) if config.tie_word_embeddings else ())
    state = read_weights(folder, expected, device=device, dtype=dtype, ignore=ignore)
    model.load_state_dict(state, strict=True, assign=True)
    _check_tokenizer_files(Path(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def read_weights(folder, expected: dict[str, torch.Size], device="cpu", dtype: torch.dtype | None = None,
                 ignore=()) -> dict[str, torch.Tensor]:
    """`checkpoint.load_tensors` for a model's state dict names -> shapes: MoE expert tensors are
    read in either layout (per expert or fused) and returned fused, as the model holds them."""
    on_disk = moe_checkpoint.names_on_disk(expected, set(ckpt.weight_files(folder)))
    state = ckpt.load_tensors(folder, on_disk, device=device, dtype=dtype, ignore=ignore)
    return moe_checkpoint.fuse_experts(state, expected)


def hf_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict as a checkpoint stores it (MoE experts per expert, as views)."""
    return moe_checkpoint.split_experts(state)


# any one of these sets is a tokenizer transformers can load without extra packages or downloads
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def _check_tokenizer_files(folder: Path) -> None:
    if any(all((folder / name).is_file() for name in names) for names in _TOKENIZER_FILES):
        return
    raise ckpt.CheckpointError(
        f"{folder} has no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json + merges.txt, vocab.txt "
        "is there; copy the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) "
        "from the model it was trained from into this folder")


def save_pretrained(model: CausalLM, tokenizer, path, max_shard_bytes: int = ckpt.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write an HF checkpoint folder (config.json, safetensors, tokenizer files) that
    transformers' AutoModelForCausalLM.from_pretrained loads. A tied head is not written."""
    tensors = model.state_dict()  # the tied head is the embedding: lm_head is None, nothing to drop
    tensors = hf_tensors(tensors)  # the Hub's per-expert layout, what transformers writes
    dtype = next(iter(tensors.values())).dtype
    config = model.config.to_hf(dtype=dtype)
    write_tokenizer = (lambda folder: tokenizer.save_pretrained(folder)) if tokenizer is not None else None
    return ckpt.save_checkpoint(path, config, tensors, max_shard_bytes=max_shard_bytes, write_extra=write_tokenizer)


def config_from_folder(folder) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, without loading weights."""
    folder = Path(folder)
    return ModelConfig.from_hf(ckpt.read_config(folder), source=str(folder / ckpt.CONFIG_NAME))
