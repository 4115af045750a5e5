"""verl: the `linear_cross_entropy` its fused-kernel hook calls (use_fused_kernels=True; verl's
monkey_patch computes `log_probs, entropy = linear_cross_entropy(hidden, weight, labels, temperature,
"none")` from the last hidden states and the LM head), and the remove-padding attention path
(verl unpads to flash-attn's varlen layout and calls flash_attn_varlen_func: spell's takes the same
arguments in the same order). verl itself is not imported.

    from spell_kernels.integrations import verl as spell_verl
    spell_verl.apply()   # patches verl.utils.kernel.linear_cross_entropy when verl is installed
"""
import torch

from ..logprob import fused_linear_logprob

REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None):
    """(log_probs, entropy) of `labels` under softmax(hidden @ weight.T / temperature).

    hidden (..., H), weight (V, H), labels (...) -> log_probs and entropy of labels' shape, fp32,
    per token for reduction="none", else summed / averaged over tokens. A vocabulary sharded over
    a tensor-parallel group (dist_process_group) is not supported."""
    if dist_process_group is not None:
        raise NotImplementedError("linear_cross_entropy: dist_process_group (a vocabulary split over tensor-parallel "
                                  "ranks) is not supported; gather the LM head or use tensor parallel size 1")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    logp, entropy = fused_linear_logprob(hidden, weight, labels, float(temperature), True)
    if reduction == "sum":
        return logp.sum(), entropy.sum()
    if reduction == "mean":
        return logp.mean(), entropy.mean()
    return logp, entropy


def apply():
    """Replace verl's fused-kernel linear_cross_entropy with spell's (needs verl installed)."""
    from ._require import require

    require("verl", None)  # no extra: verl pins its own torch/vLLM stack
    import verl.utils.kernel.linear_cross_entropy as target

    target.linear_cross_entropy = linear_cross_entropy
    return target
