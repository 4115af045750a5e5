"""nn.Module wrappers with Liger-Kernel's constructor and forward arguments, so a trainer written
for Liger's `LigerFusedLinearCrossEntropyLoss` / `LigerFusedLinearGRPOLoss` takes these instead:

  FusedLinearLogprob(temperature, ignore_index, return_entropy, softcap, logit_scale)
      forward(_input (..., H), lin_weight (V, H), target (...), bias=None) -> log-probs [, entropy]
  FusedLinearCrossEntropyLoss(ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                              reduction="mean", softcap=None, return_z_loss=False, ...)
      forward(lin_weight, _input, target, bias=None) -> loss             (Liger's argument order)
  FusedLinearGRPOLoss(beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2,
                      epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
                      importance_sampling_level="token", temperature=1.0)
      forward(_input (B, T, H), lin_weight, selected_token_ids (B, T), attention_mask (B, T),
              advantages (B,), bias=None, ref_per_token_logps=None, old_per_token_logps=None,
              ref_input=None, ref_weight=None, ref_bias=None, num_items_in_batch=None,
              importance_sampling_ratio=None) -> (loss, metrics [kl (beta != 0), clip_ratio])

Liger options spell_kernels does not implement raise NotImplementedError at construction when
set to anything but their default; `compiled` and `chunk_size` are accepted and ignored (the ops
chunk by memory budget and are torch.compile-traceable custom ops).
"""
import torch

from .logprob import fused_linear_logprob
from .policy_loss import policy_loss


def _no_bias(bias, where):
    if bias is not None:
        raise NotImplementedError(f"{where}: an LM head bias is not supported; pass bias=None")


class FusedLinearLogprob(torch.nn.Module):
    """Per-token log-probs (and entropies) of `target` under softmax(softcap(scale * x W^T) / T)."""

    def __init__(self, temperature=1.0, ignore_index=-100, return_entropy=False, softcap=None, logit_scale=1.0):
        super().__init__()
        self.temperature, self.ignore_index, self.return_entropy = temperature, ignore_index, return_entropy
        self.softcap, self.logit_scale = softcap, logit_scale

    def forward(self, _input, lin_weight, target, bias=None):
        _no_bias(bias, "FusedLinearLogprob")
        return fused_linear_logprob(_input, lin_weight, target, self.temperature, self.return_entropy,
                                    self.ignore_index, softcap=self.softcap, logit_scale=self.logit_scale)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of lin_weight @ _input against target, Liger's constructor and argument order."""

    def __init__(self, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                 reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                 return_token_accuracy=False):
        super().__init__()
        for name, value, default in (("ce_weight", ce_weight, None), ("lse_square_scale", lse_square_scale, 0.0),
                                     ("label_smoothing", label_smoothing, 0.0), ("return_z_loss", return_z_loss, False),
                                     ("use_token_scaling", use_token_scaling, False),
                                     ("return_token_accuracy", return_token_accuracy, False)):
            if value != default if default is not None else value is not None:
                raise NotImplementedError(f"FusedLinearCrossEntropyLoss: {name}={value!r} is not supported; "
                                          f"leave it at {default!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: expected mean, sum or none")
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap

    def forward(self, lin_weight, _input, target, bias=None):
        _no_bias(bias, "FusedLinearCrossEntropyLoss")
        nll = -fused_linear_logprob(_input, lin_weight, target, 1.0, False, self.ignore_index, softcap=self.softcap)
        if self.reduction == "none":
            return nll
        if self.reduction == "sum":
            return nll.sum()
        return nll.sum() / (target != self.ignore_index).sum().clamp(min=1)


class FusedLinearGRPOLoss(torch.nn.Module):
    """GRPO / DAPO / Dr. GRPO / GSPO loss from the last hidden states, as Liger's module (and TRL's
    GRPOTrainer loss): k3 KL to a reference with weight beta, clip range (1 - epsilon_low,
    1 + epsilon_high), TRL's loss_type aggregation, token- or sequence-level importance sampling."""

    def __init__(self, beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2, epsilon_high=0.2,
                 loss_type="dapo", max_completion_length=None, importance_sampling_level="token", temperature=1.0):
        super().__init__()
        if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(f"loss_type={loss_type!r}: expected grpo, bnpo, dr_grpo or dapo")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: expected token or sequence")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        self.beta, self.use_ref_model = beta, use_ref_model
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.importance_sampling_level, self.temperature = importance_sampling_level, temperature

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                num_items_in_batch=None, importance_sampling_ratio=None):
        _no_bias(bias, "FusedLinearGRPOLoss")
        _no_bias(ref_bias, "FusedLinearGRPOLoss (ref_bias)")
        batch, length, hidden_size = _input.shape
        mask = attention_mask.bool().reshape(-1)
        targets = selected_token_ids.reshape(-1)
        ref = None
        if self.beta != 0.0 and self.use_ref_model:
            if ref_per_token_logps is None:
                if ref_input is None or ref_weight is None:
                    raise ValueError("beta != 0 needs ref_per_token_logps, or ref_input and ref_weight")
                with torch.no_grad():
                    ref_per_token_logps = fused_linear_logprob(ref_input, ref_weight, selected_token_ids,
                                                               self.temperature)
            ref = ref_per_token_logps.reshape(-1)
        rows = torch.arange(batch + 1, dtype=torch.int32, device=_input.device)
        kw = {}
        if self.loss_type == "dr_grpo":
            kw["norm_length"] = self.max_completion_length
        if self.loss_type == "dapo" and num_items_in_batch is not None:
            kw["global_count"] = num_items_in_batch
        loss, stats = policy_loss(
            _input.reshape(-1, hidden_size), lin_weight, targets,
            None if old_per_token_logps is None else old_per_token_logps.reshape(-1),
            advantages.reshape(batch, 1).expand(batch, length).reshape(-1), mask,
            clip_low=self.epsilon_low, clip_high=self.epsilon_high, agg=self.loss_type, temperature=self.temperature,
            cu_seqlens=rows * length, ref_logprobs=ref, kl_coef=self.beta if ref is not None else 0.0,
            kl_estimator="k3", ratio_level=self.importance_sampling_level,
            importance_weights=None if importance_sampling_ratio is None else
            importance_sampling_ratio.expand(batch, length).reshape(-1), **kw)
        metrics = []
        if ref is not None:
            metrics.append(stats["kl"])
        metrics.append(stats["clip_frac_low"] + stats["clip_frac_high"])
        return loss, metrics
