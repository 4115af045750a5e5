"""Role-specific dynamic sampling (SPEC.md, "What trains"): which questions, responder groups
and verifier groups of a step become training data.

- Responder: groups whose rewards are not all equal, the first N of them.
- Questioner, per task type: the questions behind the kept responder groups (positives) plus
  `negatives_ratio` × as many negatives (bad_format, bad_ground, or a responder group with
  zero variance), drawn at random. Discarded questions never train.
- Verifier: groups judging an answer whose verifier majority equals its rule reward, with
  the share of judgments agreeing with the majority in [low, high]; whole groups drawn at
  random so that the verifier's trajectories ≈ `share` × questioner positives.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from spell_core.roles import TASK_TYPES, Status
from spell_core.selfplay.rollout import Question, VerifierGroup


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _sample_in_order(items: Sequence, k: int, rng: random.Random) -> list:
    """k items drawn at random without replacement, returned in their original order."""
    chosen = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in chosen]


def kept_responder_groups(questions: Sequence[Question], n: int) -> list[Question]:
    """The first `n` questions (in generation order) whose responder group has non-zero reward variance."""
    return [q for q in questions if q.responder is not None and q.responder.has_variance][:n]


def is_negative(question: Question) -> bool:
    """A questioner negative: penalised (bad_format, bad_ground) or answered by a zero-variance group."""
    return question.status in (Status.BAD_FORMAT, Status.BAD_GROUND) or (
        question.status == Status.OK and question.zero_variance)


def select_questions(questions: Sequence[Question], kept: Sequence[Question], negatives_ratio: float,
                     rng: random.Random) -> tuple[list[Question], list[Question]]:
    """(positives, negatives) of the questioner: per task type, the kept questions and
    round(negatives_ratio × their number) negatives of the same type drawn at random
    (fewer when there are not that many)."""
    if negatives_ratio < 0:
        raise ValueError(f"negatives_ratio must be >= 0, got {negatives_ratio}")
    kept_ids = {q.id for q in kept}
    positives, negatives = [], []
    for task_type in TASK_TYPES:
        pos = [q for q in questions if q.task_type == task_type and q.id in kept_ids]
        pool = [q for q in questions if q.task_type == task_type and q.id not in kept_ids and is_negative(q)]
        k = min(len(pool), _round_half_up(negatives_ratio * len(pos)))
        positives += pos
        negatives += _sample_in_order(pool, k, rng)
    return positives, negatives


def verifier_candidates(groups: Sequence[VerifierGroup], low: float = 0.51, high: float = 0.99) -> list[VerifierGroup]:
    """Groups whose majority equals the judged answer's rule reward and whose agreement is in [low, high]."""
    return [g for g in groups
            if g.majority is not None and g.majority == int(g.rule_reward) and low <= g.agreement <= high]


def select_verifier_groups(candidates: Sequence[VerifierGroup], target_trajectories: float,
                           rng: random.Random) -> list[VerifierGroup]:
    """Whole groups drawn at random so that their judgments number about `target_trajectories`:
    round(target / G) groups, at least one when the target is positive, at most all."""
    if not candidates or target_trajectories <= 0:
        return []
    group_size = len(candidates[0].samples)
    k = min(len(candidates), max(1, _round_half_up(target_trajectories / group_size)))
    return _sample_in_order(candidates, k, rng)
