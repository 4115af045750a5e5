"""Make a transformers model (Llama, Qwen2, Qwen3, ...) run its attention through
`spell_kernels.flash_attn_varlen_func`, via transformers' own attention registry:

    from spell_kernels.integrations import transformers as spell_tf
    spell_tf.apply(model)          # or: register(); from_pretrained(..., attn_implementation="spell")

Batches arrive in transformers' (B, H, L, D) layout and are turned into varlen form:
a 2D padding mask is unpadded (as transformers does for flash-attn), packed rows are split
at `position_ids` restarts or by `cu_seq_lens_q/k` kwargs (padding-free training), and
without either every row is one sequence. Causal masks are bottom-right aligned, which is
what a KV cache needs (the new queries are the last positions of their sequences).
"""
import torch

from ..flash_attn import flash_attn_varlen_func
from ._require import require

require("transformers", "transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402

NAME = "spell"


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _packed_starts(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """Flat token indices where a sequence starts, when some row packs several sequences
    (a position that does not follow its predecessor by one starts a new sequence, as in
    transformers' masking_utils); None when every row is one sequence."""
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if starts[:, 1:].any():
        return starts.flatten().nonzero().flatten()
    return None


def spell_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention function: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) ->
    (attn_output (B, Lq, Hq, D), None). `attention_mask` is the 2D (B, Lk) padding mask
    (True/1 = token) or None, as transformers' flash-attention mask function provides it."""
    if dropout:
        raise NotImplementedError("spell attention has no dropout: set the model's attention_dropout to 0 "
                                  "(or call model.eval())")
    if sliding_window is not None or softcap is not None:
        raise NotImplementedError("spell attention supports neither sliding windows nor logit softcapping; "
                                  "use a model config without them")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("spell attention does not support attention sinks (s_aux)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"spell attention takes a 2D (batch, kv_length) padding mask; got shape "
                         f"{tuple(attention_mask.shape)} (custom 4D masks are not supported)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, hq, lq, d = query.shape
    lk = key.shape[2]
    q = query.transpose(1, 2)  # (B, L, H, D)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    varlen = dict(softmax_scale=scaling, causal=causal)

    if attention_mask is not None:
        mask = attention_mask.bool()[:, -lk:]
        k_index = mask.flatten().nonzero().flatten()
        # queries are the last lq positions; a single query (decoding) always runs, as in transformers
        q_mask = mask[:, -lq:] if lq > 1 else torch.ones_like(mask[:, -1:])
        q_index = q_mask.flatten().nonzero().flatten()
        cu_k = _cu_seqlens(mask.sum(-1))
        cu_q = _cu_seqlens(q_mask.sum(-1))
        out = flash_attn_varlen_func(
            q.reshape(batch * lq, hq, d).index_select(0, q_index),
            k.reshape(batch * lk, -1, d).index_select(0, k_index),
            v.reshape(batch * lk, -1, v.shape[-1]).index_select(0, k_index),
            cu_q, cu_k, int(q_mask.sum(-1).max()), int(mask.sum(-1).max()), **varlen)
        padded = out.new_zeros(batch * lq, hq, out.shape[-1]).index_copy(0, q_index, out)
        return padded.view(batch, lq, hq, -1), None

    flat_q = q.reshape(batch * lq, hq, d)
    flat_k = k.reshape(batch * lk, -1, d)
    flat_v = v.reshape(batch * lk, -1, v.shape[-1])
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        out = flash_attn_varlen_func(flat_q, flat_k, flat_v, cu_q.to(torch.int32), cu_k.to(torch.int32),
                                     max_q, max_k, **varlen)
        return out.view(batch, lq, hq, -1), None

    starts = _packed_starts(kwargs.get("position_ids"), batch, lq) if lq == lk else None
    if starts is not None:
        cu = torch.cat([starts.to(torch.int32), starts.new_tensor([batch * lq], dtype=torch.int32)])
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(flat_q, flat_k, flat_v, cu, cu, max_len, max_len, **varlen)
        return out.view(batch, lq, hq, -1), None

    rows = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    out = flash_attn_varlen_func(flat_q, flat_k, flat_v, rows * lq, rows * lk, lq, lk, **varlen)
    return out.view(batch, lq, hq, -1), None


def register(name: str = NAME) -> str:
    """Register spell's attention (and the 2D padding-mask preparation flash-attn uses)
    under `name` in transformers' registries; returns the name for `attn_implementation=`."""
    AttentionInterface.register(name, spell_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def apply(model, name: str = NAME):
    """Switch `model` (a transformers PreTrainedModel) to spell's attention; returns the model."""
    register(name)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r} "
                           "(it does not dispatch attention through transformers' AttentionInterface)")
    return model
