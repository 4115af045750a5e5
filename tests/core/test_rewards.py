"""Every reward rule of SPEC.md ("Rewards") against hand-worked cases."""
import math

import pytest

from spell_core.roles import (DOC_MATH, DOC_MC, DOC_QA, Status, Task, answered_without_documents, choice_match,
                              cover_exact_match, numeric_match, questioner_reward, responder_reward,
                              rule_reward, verifier_majority, verifier_rewards)

# --- doc_qa: cover exact match --------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris", "Paris", 1.0),
    ("paris", "PARIS", 1.0),  # case
    ("The Eiffel Tower", "Eiffel Tower", 1.0),  # article in the prediction
    ("Eiffel Tower", "the Eiffel Tower", 1.0),  # article in the reference
    ("an apple a day", "apple day", 1.0),  # a / an removed: "apple day" in "apple day"
    ("Sir John Falstaff, the knight.", "John Falstaff", 1.0),  # reference is a substring
    ("O'Neill", "ONeill", 1.0),  # punctuation removed
    ("U.S.A.", "USA", 1.0),
    ("“Hamlet”", "Hamlet", 1.0),  # Unicode quotes are punctuation too
    ("Hamlet,   Prince  of\nDenmark", "hamlet prince of denmark", 1.0),  # whitespace collapsed
    ("Falstaff", "John Falstaff", 0.0),  # prediction shorter than the reference
    ("Johnny Falstaff", "John Falstaff", 0.0),
    ("Ophelia", "The.", 0.0),  # reference normalises to nothing: matches nothing
    (None, "Paris", 0.0),  # unparsable
])
def test_cover_exact_match(prediction, reference, expected):
    assert cover_exact_match(prediction, reference) == expected


def test_cover_exact_match_substring_is_on_normalised_text():
    # "the atre royal" normalises to "atre royal", which is inside "theatre royal"
    assert cover_exact_match("Theatre Royal", "the atre Royal") == 1.0
    # a word boundary does not matter for the substring test (SQuAD-style cover EM)
    assert cover_exact_match("Kingship", "king") == 1.0


# --- doc_math: numeric with tolerance, rounding, scale factors -------------------------------


@pytest.mark.parametrize("prediction, reference, expected", [
    ("42", "42", 1.0),
    ("1001.5", "1000", 1.0),  # |p - r| = 1.5 = 0.15 % of 1000: boundary is inclusive
    ("998.5", "1000", 1.0),  # same from below
    ("1001.6", "1000", 0.0),  # 0.16 %
    ("998.4", "1000", 0.0),
    ("-1001.5", "-1000", 1.0),  # relative to |r|
    ("200.3", "200", 1.0),  # exactly 0.15 %, although 200.3 - 200 > 0.3 in floating point
    ("20.03", "20", 1.0),
    ("200.31", "200", 0.0),
    ("0.1234", "0.12345", 1.0),  # within 0.15 % (0.04 %)
    ("12.5", "0.125", 1.0),  # factor 100 (percent)
    ("0.125", "12.5", 1.0),  # factor 100, other direction
    ("7", "0.07", 1.0),  # 0.07 * 100 is 7.000000000000001 in floats
    ("3.2", "3200", 1.0),  # factor 1e3
    ("3.2", "3200000", 1.0),  # factor 1e6
    ("3.2", "3200000000", 1.0),  # factor 1e9
    ("3200000000", "3.2", 1.0),  # factor 1e9, other direction
    ("3.2", "32", 0.0),  # factor 10 is not one of them
    ("3.2", "320000", 0.0),  # nor 1e5
    ("\\boxed{42}", "42", 1.0),
    ("$1,234.50", "1234.5", 1.0),  # currency and thousands separator
    ("12.5%", "12.5", 1.0),  # percent sign ignored
    ("12.5%", "0.125", 1.0),  # ... and factor 100
    ("3.2 million dollars", "3200000", 1.0),  # unit word ignored, factor 1e6
    ("about 17 km", "17", 1.0),
    ("\\frac{3}{4}", "0.75", 1.0),
    ("3/4", "0.75", 1.0),
    ("−5", "-5", 1.0),  # Unicode minus
    ("5", "-5", 1.0),  # as released: the 3-decimal rounding compares absolute values (docs/fidelity.md)
    ("5", "-6", 0.0),
    ("no idea", "42", 0.0),  # no number: 0
    (None, "42", 0.0),
])
def test_numeric_match(prediction, reference, expected):
    assert numeric_match(prediction, reference) == expected


def test_numeric_rounding_is_the_released_ceiling_of_absolute_values():
    """Released `round_up_to_decimal(|x|, 3)` = ceil(|x| * 1000) / 1000, worked by hand; all pairs
    are far outside the 0.15 % tolerance and the scale factors."""
    # 0.0111 and 0.0119 (7 % apart): both ceil to 0.012 -> equal (round-half gave 0.011 vs 0.012)
    assert numeric_match("0.0111", "0.0119") == 1.0
    # 0.0126 vs 0.0134: ceil 0.013 vs 0.014 -> not equal (round-half gave 0.013 both)
    assert numeric_match("0.0126", "0.0134") == 0.0
    # 0.0004 vs 0.0001: both ceil to 0.001
    assert numeric_match("0.0004", "0.0001") == 1.0
    # the sign is dropped, as released: -0.0111 vs 0.0119 both |.| ceil to 0.012
    assert numeric_match("-0.0111", "0.0119") == 1.0


def test_numeric_reference_may_be_a_number():
    assert numeric_match("1,000", 1000) == 1.0
    assert numeric_match("1001.6", 1000.0) == 0.0


# --- doc_mc: letter match ----------------------------------------------------------------

OPTIONS = {"A": "Hamlet", "B": "Macbeth", "C": "King Lear", "D": "Othello"}


@pytest.mark.parametrize("prediction, expected", [
    ("B", 1.0), ("(B)", 1.0), ("B) Macbeth", 1.0), ("B. Macbeth", 1.0), ("Option B", 1.0),
    ("option (b)", 1.0), ("[B]", 1.0), ("Macbeth", 1.0),  # the exact text of option B
    ("C", 0.0), ("(A)", 0.0), ("Option D", 0.0), ("King Lear", 0.0),
    ("b", 1.0), ("b) Macbeth", 1.0),  # lower case when nothing but a delimiter follows
    ("Both", 0.0),  # starts with B but is a word
    ("", 0.0), (None, 0.0),
])
def test_choice_match(prediction, expected):
    assert choice_match(prediction, "B", OPTIONS) == expected


def test_choice_match_article_a_is_not_option_a():
    assert choice_match("a Scottish king", "A", OPTIONS) == 0.0
    assert choice_match("A", "A", OPTIONS) == 1.0


def test_rule_reward_dispatches_on_task_type():
    assert rule_reward(Task(DOC_QA, "q", "Eiffel Tower"), "the eiffel tower.") == 1.0
    assert rule_reward(Task(DOC_MATH, "q", "12.5"), "0.125") == 1.0
    assert rule_reward(Task(DOC_MC, "q", "B", OPTIONS), "(B)") == 1.0
    assert rule_reward(Task(DOC_MC, "q", "B", OPTIONS), "Hamlet") == 0.0
    for task in (Task(DOC_QA, "q", "x"), Task(DOC_MATH, "q", "1"), Task(DOC_MC, "q", "A", OPTIONS)):
        assert rule_reward(task, None) == 0.0


# --- grounding filter ---------------------------------------------------------------------


def test_grounding_filter_flags_questions_answered_without_documents():
    task = Task(DOC_QA, "Who wrote Hamlet?", "Shakespeare")
    assert answered_without_documents(task, "Everybody knows. The answer is William Shakespeare.")
    assert not answered_without_documents(task, "I cannot tell without the text. The answer is Marlowe.")
    assert not answered_without_documents(task, "Shakespeare")  # no "the answer is": unparsable → 0


# --- verifier majority and rewards --------------------------------------------------------

Y, N, U = True, False, None


@pytest.mark.parametrize("verdicts, expected", [
    ([Y] * 5 + [N] * 3, 1),  # 5 > 4
    ([N] * 5 + [Y] * 3, 0),
    ([Y] * 4 + [N] * 4, 1),  # released plurality: a tie goes to the first seen (YES here)
    ([N] + [Y] * 4 + [N] * 3, 0),  # 4-4 again, NO seen first
    ([Y] * 4 + [N] * 3 + [U], 1),  # 4/3/1: plurality YES (was undecided: 4 is not > 8/2)
    ([Y] * 5 + [U] * 3, 1),
    ([N] * 4 + [U] * 4, 0),  # 4-4 tie NO vs unparsable, NO first
    ([U] * 4 + [N] * 4, None),  # unparsable first and tied: unparsable wins -> rule reward
    ([U] * 3 + [Y] * 2 + [N] * 3, None),  # U 3, N 3, Y 2: U seen first
    ([U] * 8, None),
    ([Y, Y, N], 1),  # odd G: 2 > 1.5
    ([Y], 1),
    ([], None),
])
def test_verifier_majority(verdicts, expected):
    assert verifier_majority(verdicts) == expected


def test_verifier_rewards_agree_disagree_unparsable():
    verdicts = [Y, Y, Y, Y, Y, N, N, U]
    assert verifier_majority(verdicts) == 1
    assert verifier_rewards(verdicts, 1) == [1, 1, 1, 1, 1, 0, 0, -1]
    assert verifier_rewards([N, Y, U], 0) == [1, 0, -1]


def test_verifier_rewards_with_undecided_majority():
    assert verifier_rewards([Y, Y, N, N, U], None) == [0, 0, 0, 0, -1]


# --- responder ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule, majority, parsable, expected", [
    (0.0, 1, True, 1.0),  # the verifier rescues a correct paraphrase
    (1.0, 0, True, 1.0),  # max: the verifier cannot take a rule success away
    (0.0, 0, True, 0.0),
    (1.0, 1, True, 1.0),
    (0.0, None, True, 0.0),  # undecided → rule alone
    (1.0, None, True, 1.0),
    (0.0, 1, False, 0.0),  # unparsable → rule alone
])
def test_responder_reward(rule, majority, parsable, expected):
    assert responder_reward(rule, majority, parsable=parsable) == expected


# --- questioner ---------------------------------------------------------------------------


def test_questioner_gaussian_by_hand_for_group_of_8():
    # exp(-(k/8 - 1/2)^2 / (2 (1/6)^2)) = exp(-18 (k/8 - 1/2)^2)
    by_hand = {1: math.exp(-18 * 0.140625), 2: math.exp(-18 * 0.0625), 3: math.exp(-18 * 0.015625), 4: 1.0}
    assert by_hand[1] == pytest.approx(0.0796, abs=1e-4)
    assert by_hand[2] == pytest.approx(0.3247, abs=1e-4)
    assert by_hand[3] == pytest.approx(0.7548, abs=1e-4)
    for k in range(1, 8):
        assert questioner_reward(k / 8) == pytest.approx(by_hand[min(k, 8 - k)], rel=1e-12)
    # SPEC's rounded row (0.08 0.33 0.76 1 0.76 0.33 0.08) to within 0.01
    spec_row = [0.08, 0.33, 0.76, 1.0, 0.76, 0.33, 0.08]
    assert [questioner_reward(k / 8) for k in range(1, 8)] == pytest.approx(spec_row, abs=0.01)


def test_questioner_extremes_and_penalties():
    assert questioner_reward(0.0) == 0.0
    assert questioner_reward(1.0) == 0.0
    assert questioner_reward(None, Status.BAD_FORMAT) == -1.0
    assert questioner_reward(None, "bad_ground") == -0.5
    assert questioner_reward(0.5, Status.BAD_GROUND) == -0.5  # the penalty wins over r̄
    assert questioner_reward(None, Status.DISCARDED) is None


def test_questioner_ablation_schemes():
    assert questioner_reward(0.25, scheme="linear") == 0.75
    assert questioner_reward(0.75, scheme="linear") == 0.25
    assert questioner_reward(0.25, scheme="triangle") == 0.5
    assert questioner_reward(0.5, scheme="triangle") == 1.0
    assert questioner_reward(0.875, scheme="triangle") == 0.25
    for scheme in ("linear", "triangle"):
        assert questioner_reward(0.0, scheme=scheme) == 0.0
        assert questioner_reward(1.0, scheme=scheme) == 0.0
        assert questioner_reward(None, Status.BAD_FORMAT, scheme=scheme) == -1.0


def test_questioner_reward_rejects_bad_input():
    with pytest.raises(ValueError, match="scheme"):
        questioner_reward(0.5, scheme="cosine")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        questioner_reward(1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        questioner_reward(None)


def test_one_group_end_to_end_by_hand():
    """Eight responder answers to one doc_qa question, with verdicts, worked by hand."""
    task = Task(DOC_QA, "Which king did Macbeth kill?", "Duncan")
    answers = ["King Duncan", "Duncan", "Banquo", "the old king of Scotland", None, "Malcolm", "duncan.", "Macduff"]
    verdicts = [
        [Y] * 8,            # rule 1 anyway
        [Y] * 7 + [N],      # rule 1
        [N] * 8,            # rule 0, majority 0
        [Y] * 6 + [N, U],   # rule 0, majority 1 → 1 (the paraphrase)
        None,               # unparsable answer: no verification, rule 0
        [N] * 4 + [Y] * 4,  # 4-4 tie, NO seen first → 0
        [Y] * 8,            # rule 1
        [N] * 5 + [Y] * 3,  # rule 0
    ]
    rewards = []
    for answer, votes in zip(answers, verdicts):
        rule = rule_reward(task, answer)
        majority = verifier_majority(votes) if votes else None
        rewards.append(responder_reward(rule, majority, parsable=answer is not None))
    assert rewards == [1, 1, 0, 1, 0, 0, 1, 0]
    mean = sum(rewards) / 8  # 4/8
    assert questioner_reward(mean) == 1.0
    assert verifier_rewards(verdicts[3], verifier_majority(verdicts[3])) == [1] * 6 + [0, -1]
