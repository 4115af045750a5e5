"""spell_kernels: Triton kernels for long-context RL training, usable on their own.

Every public op dispatches on its inputs: CUDA tensors run the Triton kernels, CPU tensors
run a PyTorch path (see `_dispatch.use_triton`). Importing this package does not import
Triton; each op's module is imported the first time one of its names is used, so
`TRITON_INTERPRET=1` may be set any time before the first call.
"""
import sys
from importlib import import_module
from types import ModuleType

# public name -> module (inside spell_kernels) that defines it
_EXPORTS = {
    # attention
    "flash_attn_varlen_func": "flash_attn",
    "flash_attn_func": "flash_attn",
    "shared_prefix_attn_func": "shared_prefix",
    "SharedPrefixLayout": "shared_prefix",
    "SharedPrefixAttention": "shared_prefix",
    "decode_attn_shared_prefix": "decode_attn",
    "merge_attn_states": "lse_merge",
    "ring_flash_attn_varlen_func": "ring_attn",
    "zigzag_shard": "ring_attn",
    "zigzag_unshard": "ring_attn",
    "zigzag_pad": "ring_attn",
    "zigzag_unpad": "ring_attn",
    "zigzag_cu_seqlens": "ring_attn",
    "ring_shared_prefix_attn_func": "ring_shared_prefix",
    "RingSharedPrefixPlan": "ring_shared_prefix",
    # RL ops
    "fused_linear_logprob": "logprob",
    "policy_loss": "policy_loss",
    "group_advantages": "advantages",
    "broadcast_to_tokens": "advantages",
    # nn.Module wrappers (Liger-compatible arguments)
    "FusedLinearLogprob": "modules",
    "FusedLinearCrossEntropyLoss": "modules",
    "FusedLinearGRPOLoss": "modules",
    # mixture of experts
    "moe_experts": "moe",
    # packing
    "pack": "packing",
    "unpack": "packing",
    "cu_seqlens_from_lengths": "packing",
    "position_ids_from_cu_seqlens": "packing",
    "partition_by_token_budget": "packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spell_kernels' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


class _Package(ModuleType):
    """`policy_loss` names both a submodule and the function it defines. Importing the submodule
    (`import spell_kernels.policy_loss`, or another module's `from .policy_loss import ...`) makes
    the import system set the package attribute to the submodule; the function is kept instead."""

    def __setattr__(self, name, value):
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
