"""Which implementation an op runs: the Triton kernels or the PyTorch path.

CUDA tensors run Triton; CPU tensors run PyTorch. The environment variable SPELL_KERNELS
overrides this at call time: `triton` forces the Triton kernels on CPU tensors (together
with TRITON_INTERPRET=1, for tests), `torch` forces the PyTorch path everywhere. Without the
`triton` package a Triton path is refused with a clear error (the PyTorch paths need no Triton).
"""
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("SPELL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"SPELL_KERNELS={mode!r}: expected one of {', '.join(_CHOICES)}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if any(t.device.type == "cpu" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "SPELL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                "spell_kernels' Triton modules are imported"
            )
        return _require_triton()
    return all(t.device.type == "cuda" for t in tensors) and _require_triton()


def _require_triton() -> bool:
    from ._triton import HAS_TRITON, MISSING_TRITON  # here: importing this module must not import Triton

    if not HAS_TRITON:
        raise RuntimeError(f"spell_kernels: these tensors run the Triton kernels, but {MISSING_TRITON}")
    return True
