r"""Responder answer extraction (SPEC.md, "Responder"), against hand-worked model outputs.

The issue's outputs, decided per SPEC:
- "The correct answer is Paris" (doc_qa) -> "Paris";
- a bare `\boxed{12.5}`: doc_math -> "12.5" (the last box anywhere wins); doc_qa -> None
  (QA reads only the text after an "answer is" phrase); doc_mc -> None (not a letter);
- "C. She neither does nor shall": as the whole response, None for doc_mc (none of the four
  MC forms: no box, no "answer is", no "(C)" at the end); after "The answer is" -> "C".
"""
import pytest

from spell_core.roles import DOC_MATH, DOC_MC, DOC_QA, Task, extract_answer, rule_reward


@pytest.mark.parametrize("text, expected", [
    ("The correct answer is Paris", "Paris"),
    ("The correct answer is Paris.", "Paris"),
    ("The correct answer is **Paris**.", "Paris"),
    ("the CORRECT answer IS paris", "paris"),
    # "the correct answer is" is preferred to a later "the answer is"; the text runs to the end of the line
    ("The correct answer is Paris. Some say the answer is Lyon.\nThat is all.", "Paris. Some say the answer is Lyon"),
    # without "the correct answer is", the last "the answer is" wins over a later bare "answer is"
    ("The answer is Lyon. My answer is Paris", "Lyon. My answer is Paris"),
    ("First the answer is Lyon.\nNo: the answer is Paris", "Paris"),
    ("My answer is Paris", "Paris"),  # third preference
    ("<think>the correct answer is Lyon</think>The correct answer is Paris", "Paris"),
    ("The correct answer is:\n\nParis\n\nBecause it is the capital.", "Paris"),  # phrase ends its line
])
def test_doc_qa_extraction(text, expected):
    assert extract_answer(text, DOC_QA) == expected


@pytest.mark.parametrize("text", [
    "\\boxed{12.5}",  # QA reads only after an "answer is" phrase
    "Paris.",
    "The correct answer is",
    "<think>The correct answer is Paris",  # unclosed reasoning: no final part
    "<think>the correct answer is Paris</think> I am not sure.",
    "",
])
def test_doc_qa_unparsable(text):
    assert extract_answer(text, DOC_QA) is None


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{12.5}", "12.5"),
    ("Therefore, the answer is 12.5.", "12.5"),
    ("The answer is \\boxed{7}. Wait, no: \\boxed{8}", "8"),  # the last box
    ("So \\boxed{3}.\nTherefore, the answer is 4", "3"),  # a box anywhere beats the sentence
    ("Therefore, the answer is $1,234.5 million, up 3%", "1234.5"),  # the first number after the phrase
    # released patterns need "answer is" + one space + the number: the newline case has none, so "2"
    ("The answer is 2? No. Therefore, the answer is\n-7.25 dollars", "2"),
    ("The answer is 2? No. Therefore, the answer is -7.25 dollars", "-7.25"),  # the last match
    ("The answer is approximately 5", None),  # not directly after "answer is" (was 5)
    ("The answer is (12.5). Earlier I said the answer is 3", "12.5"),  # "(X)" patterns first (was 3)
    ("Therefore, the answer is **42**", "42"),  # `*` removed first
    ("Therefore, the answer is 42", "42"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("<think>\\boxed{1}</think>Therefore, the answer is 2", "2"),  # reasoning dropped first
])
def test_doc_math_extraction(text, expected):
    assert extract_answer(text, DOC_MATH) == expected


@pytest.mark.parametrize("text", ["Therefore, the answer is twelve", "I computed 12.5", "\\boxed{}", ""])
def test_doc_math_unparsable(text):
    assert extract_answer(text, DOC_MATH) is None


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{C}", "C"),
    ("So \\boxed{(B)}.", "B"),
    ("\\boxed{\\text{D}}", "D"),
    ("The correct answer is (B).", "B"),
    ("The correct answer is (B). Though the answer is C", "B"),  # "correct answer is (X)" before "answer is X"
    ("\\boxed{A}. The correct answer is (B)", "A"),  # the box first
    ("The answer is C. She neither does nor shall", "C"),
    ("The answer is **A**", "A"),
    ("The answer is: (D)", "D"),
    ("Choices (A) and (B) are wrong; the correct answer is (C)", "C"),
    ("Having weighed them all, I pick (D).", "D"),  # "(X)" at the end
])
def test_doc_mc_extraction(text, expected):
    assert extract_answer(text, DOC_MC) == expected


@pytest.mark.parametrize("text", [
    "C. She neither does nor shall",  # none of the four forms
    "The answer is c",  # the letter must be upper-case
    "The answer is Antony",  # a word, not a letter
    "(A) is tempting, but I cannot decide.",  # "(X)" not at the end
    "\\boxed{12.5}",
])
def test_doc_mc_unparsable(text):
    assert extract_answer(text, DOC_MC) is None


def test_unknown_task_type_is_an_error():
    with pytest.raises(ValueError, match="unknown task type"):
        extract_answer("The answer is 3", "doc_xyz")


@pytest.mark.parametrize("task, text, reward", [
    (Task(DOC_QA, "Capital of France?", "Paris"), "The correct answer is Paris", 1.0),
    (Task(DOC_QA, "Capital of France?", "Paris"), "\\boxed{Paris}", 0.0),  # unparsable for QA
    (Task(DOC_MATH, "How much?", "12.5"), "\\boxed{12.5}", 1.0),
    (Task(DOC_MATH, "How much?", "0.125"), "Therefore, the answer is 12.5%", 1.0),  # a factor of 100
    (Task(DOC_MC, "Who?", "C", {"A": "a", "B": "b", "C": "She neither does nor shall", "D": "d"}),
     "The answer is C. She neither does nor shall", 1.0),
    (Task(DOC_MC, "Who?", "C", {"A": "a", "B": "b", "C": "She neither does nor shall", "D": "d"}),
     "C. She neither does nor shall", 0.0),
])
def test_rule_reward_of_extracted_answers(task, text, reward):
    assert rule_reward(task, extract_answer(text, task.task_type)) == reward
