"""Role-specific dynamic sampling (spell_core.selfplay.selection) on hand-built records: each rule of
SPEC.md's "What trains" with its boundary cases."""
import random

import pytest

from spell_core.roles import Status
from spell_core.selfplay.rollout import Question, ResponderGroup, Sample, VerifierGroup
from spell_core.selfplay.selection import (is_negative, kept_responder_groups, select_questions, select_verifier_groups,
                                  verifier_candidates)

SAMPLE = Sample([1], [-0.1], "x")


def question(qid, task_type="doc_qa", status=Status.OK, rewards=None):
    q = Question(qid, task_type, "c0", (), [1, 2], SAMPLE, status)
    if rewards is not None:
        q.responder = ResponderGroup(qid, [1, 2, 3], [SAMPLE] * len(rewards), ["a"] * len(rewards),
                                     list(rewards), [None] * len(rewards), list(rewards))
    return q


def verifier_group(verdicts, majority, rule, qid="q"):
    return VerifierGroup(qid, 0, [5], [SAMPLE] * len(verdicts), verdicts, majority, rule, [])


def test_responder_groups_need_variance_and_stop_at_n():
    qs = [question("a", rewards=[1, 1, 1, 1]), question("b", rewards=[0, 1, 0, 0]), question("c", rewards=[0] * 4),
          question("d", rewards=[1, 0, 1, 1]), question("e", rewards=[0.5, 0.5, 1, 0.5]),
          question("f", status=Status.BAD_FORMAT)]
    assert [q.id for q in kept_responder_groups(qs, 10)] == ["b", "d", "e"]
    assert [q.id for q in kept_responder_groups(qs, 2)] == ["b", "d"]


def test_negatives_are_penalised_or_zero_variance_never_discarded():
    assert is_negative(question("a", status=Status.BAD_FORMAT))
    assert is_negative(question("b", status=Status.BAD_GROUND))
    assert is_negative(question("c", rewards=[1, 1]))
    assert not is_negative(question("d", status=Status.DISCARDED))
    assert not is_negative(question("e", rewards=[0, 1]))


def test_questioner_takes_as_many_negatives_as_positives_per_task_type():
    qs = [question("qa+1", rewards=[0, 1]), question("qa+2", rewards=[1, 0]),
          question("qa-1", status=Status.BAD_FORMAT), question("qa-2", rewards=[0, 0]),
          question("qa-3", status=Status.BAD_GROUND), question("qa-x", status=Status.DISCARDED),
          question("m+1", "doc_math", rewards=[0, 1]),
          question("m-1", "doc_math", status=Status.BAD_FORMAT), question("m-2", "doc_math", rewards=[1, 1]),
          question("mc-1", "doc_mc", status=Status.BAD_FORMAT)]  # no doc_mc positive: no doc_mc negative
    kept = kept_responder_groups(qs, 10)
    for seed in range(20):
        positives, negatives = select_questions(qs, kept, 1.0, random.Random(seed))
        assert {q.id for q in positives} == {"qa+1", "qa+2", "m+1"}
        ids = [q.id for q in negatives]
        assert sum(i.startswith("qa-") for i in ids) == 2 and sum(i.startswith("m-") for i in ids) == 1
        assert "qa-x" not in ids and "mc-1" not in ids
    # ratio 0.5: floor(0.5 x 2) = 1 doc_qa, floor(0.5 x 1) = 0 doc_math (released int(); was half-up: 1)
    _, negatives = select_questions(qs, kept, 0.5, random.Random(0))
    assert [q.id[:2] for q in negatives] == ["qa"]
    # more asked than available: the whole pool
    _, negatives = select_questions(qs, kept, 5.0, random.Random(0))
    assert {q.id for q in negatives} == {"qa-1", "qa-2", "qa-3", "m-1", "m-2"}
    with pytest.raises(ValueError, match="negatives_ratio"):
        select_questions(qs, kept, -1, random.Random(0))


def test_questioner_negative_shortfall_carries_to_the_next_task():
    """Released `_sample_bad_cases`, worked by hand: tasks by positives, most first (doc_qa 3,
    doc_math 1). doc_qa wants floor(1 x 3) = 3 negatives, has 1: takes it, carries 2; doc_math
    wants floor(1 x 1) + 2 = 3 and has 5: takes 3. Total 4 (without the carry: 1 + 1 = 2)."""
    qs = [question(f"qa+{i}", rewards=[0, 1]) for i in range(3)] + [question("qa-1", status=Status.BAD_FORMAT)]
    qs += [question("m+1", "doc_math", rewards=[1, 0])]
    qs += [question(f"m-{i}", "doc_math", status=Status.BAD_GROUND) for i in range(5)]
    kept = kept_responder_groups(qs, 10)
    for seed in range(5):
        _, negatives = select_questions(qs, kept, 1.0, random.Random(seed))
        ids = [q.id for q in negatives]
        assert ids.count("qa-1") == 1 and sum(i.startswith("m-") for i in ids) == 3 and len(ids) == 4


def test_questioner_positive_beyond_n_is_neither_positive_nor_negative():
    qs = [question("a", rewards=[0, 1]), question("b", rewards=[1, 0]), question("c", status=Status.BAD_FORMAT),
          question("d", status=Status.BAD_FORMAT)]
    kept = kept_responder_groups(qs, 1)
    positives, negatives = select_questions(qs, kept, 5.0, random.Random(0))
    assert [q.id for q in positives] == ["a"] and {q.id for q in negatives} == {"c", "d"}


@pytest.mark.parametrize("verdicts, majority, rule, kept", [
    ([True, True, True, False], 1, 1.0, True),  # agreement 0.75
    ([True, True, True, True], 1, 1.0, False),  # 1.0 > 0.99
    ([True, True, True, False], 1, 0.0, False),  # majority disagrees with the rule reward
    ([False, False, None, False], 0, 0.0, False),  # agreement over parsable: 3/3 = 1.0 > 0.99
    ([False, False, None, True], 0, 0.0, True),  # 2/3 = 0.67 over parsable (was 2/4 = 0.5: dropped)
    ([True, True, False, False], None, 1.0, False),  # undecided
    ([True] * 51 + [False] * 49, 1, 1.0, True),  # 0.51: the lower bound is inclusive
    ([True] * 99 + [False], 1, 1.0, True),  # 0.99: the upper bound is inclusive
])
def test_verifier_candidates_agreement_window(verdicts, majority, rule, kept):
    group = verifier_group(verdicts, majority, rule)
    assert (verifier_candidates([group]) == [group]) is kept


def test_verifier_groups_subsampled_to_the_questioner_positives():
    groups = [verifier_group([True, True, True, False], 1, 1.0, qid=str(i)) for i in range(6)]
    assert select_verifier_groups(groups, 0, random.Random(0)) == []
    assert select_verifier_groups(groups, 1, random.Random(0)) == []  # floor(1 / 4) = 0 groups, as released
    assert len(select_verifier_groups(groups, 8, random.Random(0))) == 2  # 8 judgments = 2 groups of 4
    assert len(select_verifier_groups(groups, 10, random.Random(0))) == 2  # floor(2.5)
    assert len(select_verifier_groups(groups, 24, random.Random(0))) == 6  # exactly all
    chosen = select_verifier_groups(groups, 12, random.Random(3))
    assert [g.question_id for g in chosen] == sorted(g.question_id for g in chosen)  # original order kept
    picks = {tuple(g.question_id for g in select_verifier_groups(groups, 8, random.Random(s))) for s in range(20)}
    assert len(picks) > 1  # a random draw, not always the first groups


def test_verifier_batch_is_skipped_when_candidates_fall_short():
    """Released `_build_final_judge_batch`: 1024 responder trajectories x 0.125 / 8 = 16 groups;
    with 15 candidates the step trains no verifier (we used to take the 15)."""
    groups = [verifier_group([True] * 7 + [False], 1, 1.0, qid=str(i)) for i in range(16)]
    target = 0.125 * 1024  # verifier trajectories at SPEC scale
    assert len(select_verifier_groups(groups, target, random.Random(0))) == 16
    assert select_verifier_groups(groups[:15], target, random.Random(0)) == []
