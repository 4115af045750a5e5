"""A linear layer that is quicker for the few rows of a CPU decode step.

MKL's sgemm computes y = x W^T slowly when x has a few rows (a decode step: one row per live
sample) and W is large: at 2 threads and 4-128 rows, for the MLP's 896 x 4864 weights and the
151,936-row LM head, y^T = W x^T is 1.1-2.9x quicker (bench/results/sampler.md,
bench/test_bench_linear.py). It is the same product with another summation order (fp32
differences of a few 1e-6 relative). Only for inference (no gradient) on a CPU: training's
micro-batches have thousands of rows, and a GPU has its own kernels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = (2, 128)  # measured range where W x^T wins; one row gains nothing
LARGE_WEIGHT = 1 << 22  # elements: 896 x 4864 wins; 896 x 896 and smaller do not reliably


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (weight @ x^T)^T for a few rows on a CPU without grad."""
    rows = x.shape[0] if x.dim() == 2 else -1
    if (FEW_ROWS[0] <= rows <= FEW_ROWS[1] and x.device.type == "cpu" and weight.numel() >= LARGE_WEIGHT
            and not torch.is_grad_enabled() and x.dtype == weight.dtype == torch.float32):
        out = (weight @ x.t()).t()
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
