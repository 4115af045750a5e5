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


# --- log-prob head --------------------------------------------------------------------

def _logit_transform(config):
    """(softcap, logit_scale) of the model's final logits, from its config (Gemma 2's
    final_logit_softcapping, Cohere's logit_scale); (None, 1.0) for Llama / Qwen2 / Qwen3."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    return softcap, 1.0 if scale is None else float(scale)


def add_logprob_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                     outputs: tuple = ("log_probs",)):
    """Give `model` a log-prob head: `model(input_ids, ..., labels=labels, fused_lm_head=True)`
    returns an output with `log_probs` (B, L-1): log p(labels[:, t+1] | tokens <= t) under
    softmax(logits / temperature), 0 where the label is -100, and `entropy` (same shape) when
    "entropy" is in `outputs`, without forming the (B, L, V) logits (spell_kernels.fused_linear_logprob
    over the positions whose label is not -100). `shift_labels` (B, L) are scored unshifted.
    `loss` is the mean negative log-likelihood over the scored tokens (or their sum / num_items_in_batch).
    Without fused_lm_head the forward is the original one (generation is unchanged). This is the
    contract of TRL's `add_fused_lm_head` (trl.trainer.utils), so TRL's trainers run on it too."""
    from ..logprob import fused_linear_logprob
    from transformers.utils import ModelOutput
    import functools
    import types
    from dataclasses import dataclass

    @dataclass
    class LogprobOutput(ModelOutput):
        loss: torch.Tensor | None = None
        log_probs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        label_mask: torch.Tensor | None = None
        aux_loss: torch.Tensor | None = None
        log_sum_sq_probs: torch.Tensor | None = None
        mean_logits: torch.Tensor | None = None
        is_top1: torch.Tensor | None = None

    unsupported = set(outputs) - {"log_probs", "entropy"}
    if unsupported:
        raise NotImplementedError(f"add_logprob_head computes log_probs and entropy; not {sorted(unsupported)}")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise NotImplementedError("add_logprob_head: an LM head with a bias is not supported")
    softcap, logit_scale = _logit_transform(model.config)
    with_entropy = "entropy" in outputs
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True scores given labels: pass labels (B, L) or shift_labels")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        weight = self.get_output_embeddings().weight
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
        mask = targets != -100
        picked = fused_linear_logprob(hidden[mask], weight, targets[mask], temperature, with_entropy,
                                      softcap=softcap, logit_scale=logit_scale)
        logp, entropy = picked if with_entropy else (picked, None)
        # masked_scatter keeps an all-masked batch connected to the graph (a zero that backpropagates)
        logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        if entropy is not None:
            entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return LogprobOutput(loss=-logp.sum() / count, log_probs=logp, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return model


def apply_all(model, temperature: float = 1.0, outputs: tuple = ("log_probs", "entropy")):
    """Attention and log-prob head in one call (Llama, Qwen2, Qwen3, ...); returns the model."""
    apply(model)
    return add_logprob_head(model, temperature, outputs=outputs)
