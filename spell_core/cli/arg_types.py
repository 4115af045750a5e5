"""Argument types for the commands' parsers: each turns the text of one option into its value or
raises `argparse.ArgumentTypeError` with what is wrong and what to write instead, so that argparse
prints that message (for a plain ValueError it prints only "invalid <function> value") and the
command stops before anything loads."""
from __future__ import annotations

import argparse
import math


def count(minimum: int, why: str = ""):
    """A whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}; write a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" + (f": {why}" if why else ""))
        return value
    parse.__name__ = f"count_from_{minimum}"
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}; write a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
              why: str = ""):
    """A finite number in [low, high] (either end open when asked)."""
    def parse(text: str) -> float:
        value = _finite(text)
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
            span = f"{lo}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{hi}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}" + (f": {why}" if why else ""))
        return value
    parse.__name__ = "number"
    return parse


CLIP_LOW = number_in(0.0, 1.0, high_open=True,
                     why="the ratio is clipped to [1 - clip-low, 1 + clip-high]; 0.2 is the method's value")
CLIP_HIGH = number_in(0.0, why="the ratio is clipped to [1 - clip-low, 1 + clip-high]; 0.2 is the method's value")
TEMPERATURE = number_in(0.0, why="0 samples greedily")
TOP_P = number_in(0.0, 1.0, low_open=True, why="1 keeps every token")
SECONDS = number_in(0.0, low_open=True)


def dual_clip(text: str) -> float:
    """0 (off) or a finite number > 1."""
    value = _finite(text)
    if value != 0 and value <= 1:
        raise argparse.ArgumentTypeError(f"must be > 1, or 0 for off, got {text}: the loss of a negative-advantage "
                                         "token is bounded by -A x dual-clip")
    return value


def learning_rate(text: str) -> float:
    """A positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def context_length(text: str) -> int:
    """16k, 128k, 131072, 1m (spell_core.selfplay.config.parse_ctx)."""
    from spell_core.selfplay.config import parse_ctx

    try:
        return parse_ctx(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, the GPU present when one is named."""
    import torch

    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"device {text!r} is not understood: use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but no CUDA GPU is available; use cpu")
    return text
