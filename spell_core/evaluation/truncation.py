"""Middle truncation of a prompt that is longer than the evaluation's input budget.

A prompt of more than `budget` tokens keeps its first budget // 2 and its last
budget - budget // 2 tokens and drops the middle, as LongBench and the method's evaluation do:
the instructions at the start and the question at the end survive, the middle of the
documents goes. The method evaluates at two budgets, `--ctx 16k` (16,384 tokens) and
`--ctx 100k` (100,000 tokens: its scripts' number, not 100 x 1024).
"""
from __future__ import annotations

from collections.abc import Sequence

from spell_core.selfplay.config import parse_ctx

# the method's two settings as its scripts write them
METHOD_BUDGETS = {"16k": 16384, "100k": 100000}


def parse_budget(text: str | int) -> int:
    """A prompt budget in tokens: `16k` -> 16384, `100k` -> 100000 (the method's two settings),
    otherwise as `--ctx` everywhere else (k = 1024, or a plain number)."""
    key = str(text).strip().lower()
    return METHOD_BUDGETS[key] if key in METHOD_BUDGETS else parse_ctx(text)


def truncate_middle(ids: Sequence[int], budget: int) -> tuple[list[int], int]:
    """(kept ids, number of ids dropped): all of `ids` when they fit, else head + tail."""
    if budget < 2:
        raise ValueError(f"the prompt budget must be at least 2 tokens (a head and a tail), got {budget}")
    ids = list(ids)
    if len(ids) <= budget:
        return ids, 0
    head = budget // 2
    tail = budget - head
    return ids[:head] + ids[-tail:], len(ids) - budget
