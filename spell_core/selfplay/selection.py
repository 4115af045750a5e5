"""Role-specific dynamic sampling (SPEC.md, "What trains"): which questions, responder groups
and verifier groups of a step become training data.

- Responder: groups whose rewards are not all equal, the first N of them.
- Questioner, per task type: the questions behind the kept responder groups (positives) plus
  floor(`negatives_ratio` × their number) negatives (bad_format, bad_ground, or a responder
  group with zero variance), drawn at random; a task short of negatives hands its shortfall
  on to the next task (the released trainer's order: most positives first). Discarded
  questions never train.
- Verifier: groups judging an answer whose verifier majority equals its rule reward, with
  the share of parsable judgments agreeing with the majority in [low, high]; exactly
  floor(`share` × questioner positives / G) whole groups drawn at random (16 at SPEC scale:
  1024 responder trajectories × 0.125 / 8), none at all when fewer candidates exist (as
  released: that step trains no verifier).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from spell_core.roles import TASK_TYPES, Status
from spell_core.selfplay.rollout import Question, VerifierGroup


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
    """(positives, negatives) of the questioner. Tasks are visited as the released trainer
    visits them, most positives first (ties: the task whose first positive came first);
    each takes floor(negatives_ratio × its positives) + the previous task's shortfall
    negatives of its own type, drawn at random; when it has fewer, it takes them all and
    the shortfall moves on. A task with no positive takes no negatives."""
    if negatives_ratio < 0:
        raise ValueError(f"negatives_ratio must be >= 0, got {negatives_ratio}")
    kept_ids = {q.id for q in kept}
    positives = [q for q in questions if q.id in kept_ids]
    counts: dict[str, int] = {}
    for q in positives:
        counts[q.task_type] = counts.get(q.task_type, 0) + 1
    order = sorted(counts, key=lambda t: -counts[t])  # stable: first seen wins a tie
    negatives, carry = [], 0
    for task_type in order:
        pool = [q for q in questions if q.task_type == task_type and q.id not in kept_ids and is_negative(q)]
        wanted = math.floor(negatives_ratio * counts[task_type]) + carry
        k = min(wanted, len(pool))
        carry = wanted - k
        negatives += _sample_in_order(pool, k, rng)
    by_type = {t: i for i, t in enumerate(TASK_TYPES)}
    positives.sort(key=lambda q: by_type[q.task_type])
    return positives, negatives


def verifier_candidates(groups: Sequence[VerifierGroup], low: float = 0.51, high: float = 0.99) -> list[VerifierGroup]:
    """Groups whose majority equals the judged answer's rule reward and whose agreement is in [low, high]."""
    return [g for g in groups
            if g.majority is not None and g.majority == int(g.rule_reward) and low <= g.agreement <= high]


def select_verifier_groups(candidates: Sequence[VerifierGroup], target_trajectories: float,
                           rng: random.Random) -> list[VerifierGroup]:
    """floor(target / G) whole groups drawn at random; none when there are fewer candidates
    than that (the released trainer then skips the verifier update for the step)."""
    if not candidates or target_trajectories <= 0:
        return []
    group_size = len(candidates[0].samples)
    k = math.floor(target_trajectories / group_size + 1e-9)
    if k > len(candidates):
        return []
    return _sample_in_order(candidates, k, rng)
