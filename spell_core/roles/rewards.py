"""Rewards of the three roles (SPEC.md, "Rewards"): rule rewards, verifier majority,
responder / verifier / questioner rewards and the questioner reward ablations."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .tasks import DOC_MATH, DOC_QA, Status, Task, check_task_type
from .text import normalize_answer, parse_choice, parse_number

REL_TOL = 0.0015  # numeric answers equal within 0.15 % relative
SCALE_FACTORS = (100.0, 1e3, 1e6, 1e9)  # "12%" vs 0.12, "3.2 million" vs 3200000, ...
SIGMA = 0.5 / 3  # width of the questioner's Gaussian reward
QUESTIONER_SCHEMES = ("gaussian", "linear", "triangle")
BAD_GROUND_REWARD = -0.5
BAD_FORMAT_REWARD = -1.0

# --- rule rewards -------------------------------------------------------------------------


def cover_exact_match(prediction: str | None, reference: str) -> float:
    """1.0 if the normalised reference is a substring of the normalised prediction.
    A reference that normalises to nothing (e.g. "The.") matches nothing."""
    if prediction is None:
        return 0.0
    ref = normalize_answer(reference)
    return float(bool(ref) and ref in normalize_answer(prediction))


def _close(p: float, r: float, rel_tol: float) -> bool:
    # the tiny absolute slack keeps the 0.15 % boundary inclusive despite float rounding
    return abs(p - r) <= rel_tol * abs(r) + 1e-12 * max(abs(p), abs(r))


def ceil_3_decimals(x: float) -> float:
    """The released `round_up_to_decimal(x, 3)`: ceil(x * 1000) / 1000."""
    return math.ceil(x * 1000) / 1000


def numbers_match(p: float, r: float, rel_tol: float = REL_TOL) -> bool:
    """p equals r within `rel_tol` relative, or when the absolute values agree after
    rounding up to 3 decimals (as released: ceil(|x| * 1000) / 1000, so 2.0004 and 2.0009
    match and, as released, so do -2 and 2), or up to a factor 100, 1e3, 1e6 or
    1e9 either way (the scaled comparison uses the same relative tolerance: 0.07 x 100 is
    7.000000000000001 in floating point)."""
    if _close(p, r, rel_tol) or ceil_3_decimals(abs(p)) == ceil_3_decimals(abs(r)):
        return True
    return any(_close(p * f, r, rel_tol) or _close(p, r * f, rel_tol) for f in SCALE_FACTORS)


def numeric_match(prediction: str | None, reference: str | float, rel_tol: float = REL_TOL) -> float:
    """The doc_math rule reward: both sides parsed by `parse_number` (so `\\boxed{}`,
    thousands separators, %, currency and units are handled), then `numbers_match`."""
    if prediction is None:
        return 0.0
    p = parse_number(prediction)
    r = reference if isinstance(reference, (int, float)) else parse_number(reference)
    if p is None or r is None:
        return 0.0
    return float(numbers_match(p, float(r), rel_tol))


def choice_match(prediction: str | None, reference: str, options: dict[str, str] | None = None) -> float:
    """The doc_mc rule reward: 1.0 if the answer picks the reference letter ("B", "(B)",
    "B) text", "Option B", or the exact text of option B)."""
    if prediction is None:
        return 0.0
    return float(parse_choice(prediction, options) == reference.strip().upper())


def rule_reward(task: Task, prediction: str | None, *, rel_tol: float = REL_TOL) -> float:
    """R_rule(prediction, reference) for the task's type; an unparsable (None) prediction
    earns 0."""
    check_task_type(task.task_type)
    if task.task_type == DOC_QA:
        return cover_exact_match(prediction, task.answer)
    if task.task_type == DOC_MATH:
        return numeric_match(prediction, task.answer, rel_tol)
    return choice_match(prediction, task.answer, task.options)


# --- verifier -----------------------------------------------------------------------------


def verifier_majority(verdicts: Sequence[bool | None]) -> int | None:
    """v_i from the G verdicts on one answer (True = YES, False = NO, None = unparsable): the
    plurality of YES / NO / unparsable, a tie going to the outcome seen first (the released
    trainer's `Counter(...).most_common()[0]`). 1 for YES, 0 for NO; None when unparsable
    wins (the responder then keeps its rule reward) or there are no verdicts."""
    counts: dict = {}
    for verdict in verdicts:
        counts[verdict] = counts.get(verdict, 0) + 1
    if not counts:
        return None
    winner = max(counts, key=counts.get)  # max keeps the first of equal counts: first seen
    return None if winner is None else int(winner)


def verifier_agreement(verdicts: Sequence[bool | None], majority: int | None) -> float:
    """Share of the parsable judgments that agree with the majority (the released trainer's
    mean over parsable judgments); 0 when the majority is undecided or nothing parsed."""
    parsable = [v for v in verdicts if v is not None]
    if majority is None or not parsable:
        return 0.0
    return sum(int(v) == majority for v in parsable) / len(parsable)


def verifier_rewards(verdicts: Sequence[bool | None], majority: int | None) -> list[float]:
    """Per judgment: 1 if it agrees with the majority, 0 if not, -1 if unparsable. With an
    undecided majority there is nothing to agree with: parsable judgments get 0 (such
    groups are never trained: their majority cannot equal the rule reward)."""
    rewards = []
    for verdict in verdicts:
        if verdict is None:
            rewards.append(-1.0)
        elif majority is None:
            rewards.append(0.0)
        else:
            rewards.append(float(int(verdict) == majority))
    return rewards


# --- responder ----------------------------------------------------------------------------


def responder_reward(rule: float, majority: int | None, *, parsable: bool = True) -> float:
    """r_i = max(R_rule, v_i); an undecided majority or an unparsable answer → R_rule."""
    if majority is None or not parsable:
        return float(rule)
    return float(max(rule, majority))


# --- questioner ---------------------------------------------------------------------------


def questioner_reward(mean_reward: float | None, status: Status | str = Status.OK, *,
                      scheme: str = "gaussian", sigma: float = SIGMA) -> float | None:
    """The questioner's reward from the mean responder reward r̄ of its question.

    status BAD_FORMAT → -1, BAD_GROUND → -0.5, DISCARDED → None (no training signal).
    For OK: 0 when r̄ is 0 or 1, otherwise, by `scheme`:
      "gaussian"  exp(-(r̄ - 0.5)² / (2σ²)), σ = 0.5/3 (SPELL's reward)
      "linear"    1 - r̄                (ablation: harder is better)
      "triangle"  1 - 2|r̄ - 0.5|       (ablation: peak at r̄ = 0.5, linear sides)
    """
    status = Status(status)
    if status == Status.BAD_FORMAT:
        return BAD_FORMAT_REWARD
    if status == Status.BAD_GROUND:
        return BAD_GROUND_REWARD
    if status == Status.DISCARDED:
        return None
    if scheme not in QUESTIONER_SCHEMES:
        raise ValueError(f"unknown questioner reward scheme {scheme!r}; expected one of {', '.join(QUESTIONER_SCHEMES)}")
    if mean_reward is None or not 0.0 <= mean_reward <= 1.0:
        raise ValueError(f"mean responder reward must be in [0, 1], got {mean_reward!r}")
    if mean_reward in (0.0, 1.0):
        return 0.0
    if scheme == "gaussian":
        return math.exp(-((mean_reward - 0.5) ** 2) / (2 * sigma**2))
    if scheme == "linear":
        return 1.0 - mean_reward
    return 1.0 - 2.0 * abs(mean_reward - 0.5)
