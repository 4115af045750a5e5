"""TRL: run GRPOTrainer's (and RLOO's, KTO's) per-token log-prob and entropy computation on
spell_kernels' fused linear log-prob.

    from spell_kernels.integrations import trl as spell_trl
    spell_trl.apply()                      # before constructing the trainer
    trainer = GRPOTrainer(model=..., ...)  # or: spell_trl.SpellGRPOTrainer(...)

TRL >= 1.x computes log-probs through `add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
outputs)`, which makes `model(..., labels=, fused_lm_head=True)` return log_probs/entropy; apply()
swaps in spell's head with the same contract (spell_kernels.integrations.transformers.add_logprob_head).
TRL's loss then works on (B, T) log-prob tensors, which hold no vocabulary dimension.
"""
from ._require import require

require("trl", "trl")
from trl.trainer import grpo_trainer as _grpo  # noqa: E402

from .transformers import add_logprob_head  # noqa: E402

_PATCHED_MODULES = ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer", "trl.trainer.kto_trainer")


def apply():
    """Make TRL's trainers build spell's log-prob head; returns the previous functions (for undo)."""
    import importlib

    previous = {}
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "add_fused_lm_head"):
            previous[name] = module.add_fused_lm_head
            module.add_fused_lm_head = add_logprob_head
    return previous


def undo(previous):
    import importlib

    for name, fn in previous.items():
        importlib.import_module(name).add_fused_lm_head = fn


class SpellGRPOTrainer(_grpo.GRPOTrainer):
    """GRPOTrainer whose log-probs and entropies run on spell_kernels (patched for its own construction)."""

    def __init__(self, *args, **kwargs):
        previous = {"trl.trainer.grpo_trainer": _grpo.add_fused_lm_head}
        _grpo.add_fused_lm_head = add_logprob_head
        try:
            super().__init__(*args, **kwargs)
        finally:
            undo(previous)
