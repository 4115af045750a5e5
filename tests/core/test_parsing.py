"""Parsing of the three roles' outputs against hand-written model outputs."""
import pytest

from spell_core.roles import (DOC_MATH, DOC_MC, DOC_QA, Status, Task, parse_number,
                              parse_questioner_output, parse_verdict, strip_thinking)


def words(text):  # a hand-checkable token counter: one token per whitespace-separated word
    return len(text.split())


def fenced(body, tag="json"):
    return f"```{tag}\n{body}\n```"


QA = '{"question": "Who killed the king?", "answer": "Macbeth"}'
MC = ('{"question": "Who killed the king?", "options": {"A": "Banquo", "B": "Macbeth", '
      '"C": "Malcolm", "D": "Macduff"}, "answer": "B"}')

# --- questioner: reasoning traces and JSON blocks -----------------------------------------


def test_valid_doc_qa():
    parsed = parse_questioner_output("Some planning.\n" + fenced(QA), DOC_QA, words)
    assert parsed.status == Status.OK
    assert parsed.task == Task(DOC_QA, "Who killed the king?", "Macbeth")


def test_everything_before_last_think_close_is_dropped():
    draft = fenced('{"question": "draft?", "answer": "draft"}')
    text = f"<think>{draft}</think> more thought </think>\n" + fenced(QA)
    assert parse_questioner_output(text, DOC_QA, words).task.question == "Who killed the king?"
    # a JSON block only inside the reasoning does not count
    only_inside = f"<think>{draft}</think>\nI am done."
    assert parse_questioner_output(only_inside, DOC_QA, words).status == Status.BAD_FORMAT


def test_unclosed_think_is_discarded_without_penalty():
    parsed = parse_questioner_output("<think>let me see " + fenced(QA), DOC_QA, words)
    assert parsed.status == Status.DISCARDED and parsed.task is None
    assert "think" in parsed.reason


def test_last_valid_json_block_wins():
    first = fenced('{"question": "first?", "answer": "one"}')
    second = fenced('{"question": "second?", "answer": "two"}')
    assert parse_questioner_output(f"{first}\n{second}", DOC_QA, words).task.answer == "two"


def test_invalid_json_after_valid_block_falls_back_to_the_valid_one():
    good = fenced('{"question": "first?", "answer": "one"}')
    broken = fenced('{"question": "second?", "answer": }')
    parsed = parse_questioner_output(f"{good}\n{broken}", DOC_QA, words)
    assert parsed.status == Status.OK and parsed.task.answer == "one"


def test_last_parsable_json_block_that_is_not_an_object_is_bad_format():
    """Released `get_record`: the last ```json block that parses is the record; a list there is {}."""
    good = fenced('{"question": "first?", "answer": "one"}')
    not_object = fenced('["a list", "not an object"]')
    assert parse_questioner_output(f"{good}\n{not_object}", DOC_QA, words).status == Status.BAD_FORMAT


@pytest.mark.parametrize("tag", ["", "JSON", "python"])
def test_only_json_fences_count(tag):
    """Released: only ```json fences are read (our earlier parser took any fence)."""
    assert parse_questioner_output(fenced(QA, tag=tag), DOC_QA, words).status == Status.BAD_FORMAT


def test_unfenced_output_that_is_one_json_object_is_read():
    """Released fallback: with no ```json block, the whole final text parsed as JSON."""
    parsed = parse_questioner_output("  " + QA + "\n", DOC_QA, words)
    assert parsed.status == Status.OK


@pytest.mark.parametrize("text", [
    "",  # empty output
    "no block at all",
    "Here it is: " + QA,  # JSON without a fence, with text around it
    fenced("{not json}"),
    fenced('"a string"'),
])
def test_no_fenced_json_object_is_bad_format(text):
    assert parse_questioner_output(text, DOC_QA, words).status == Status.BAD_FORMAT


@pytest.mark.parametrize("body", [
    '{"answer": "Macbeth"}',  # question missing
    '{"question": "", "answer": "Macbeth"}',  # empty question
    '{"question": 7, "answer": "Macbeth"}',  # wrongly typed question
    '{"question": "Who?"}',  # answer missing
    '{"question": "Who?", "answer": ""}',  # empty answer
    '{"question": "Who?", "answer": "   "}',  # blank answer
    '{"question": "Who?", "answer": null}',
    '{"question": "Who?", "answer": true}',
    '{"question": "Who?", "answer": ["Macbeth"]}',
])
def test_missing_or_mistyped_fields_are_bad_format(body):
    assert parse_questioner_output(fenced(body), DOC_QA, words).status == Status.BAD_FORMAT


def test_span_answer_over_40_tokens_is_discarded():
    forty = " ".join(["word"] * 40)
    ok = parse_questioner_output(fenced(f'{{"question": "q?", "answer": "{forty}"}}'), DOC_QA, words)
    assert ok.status == Status.OK
    too_long = parse_questioner_output(fenced(f'{{"question": "q?", "answer": "{forty} more"}}'), DOC_QA, words)
    assert too_long.status == Status.DISCARDED
    assert parse_questioner_output(fenced('{"question": "q?", "answer": "a b c"}'), DOC_QA, words,
                                   span_token_limit=2).status == Status.DISCARDED


def test_doc_qa_needs_a_token_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        parse_questioner_output(fenced(QA), DOC_QA)


def test_unknown_task_type_is_an_error():
    with pytest.raises(ValueError, match="doc_qa"):
        parse_questioner_output(fenced(QA), "doc_poetry", words)


# --- questioner: doc_math ----------------------------------------------------------------


@pytest.mark.parametrize("answer, status", [
    ("42", Status.OK), ("3.75", Status.OK), ('"1,250"', Status.OK), ('"12.5%"', Status.OK), ("-3", Status.OK),
    ("0", Status.DISCARDED), ("0.0", Status.DISCARDED), ('"0"', Status.DISCARDED),
    ('"about none"', Status.DISCARDED),  # unparsable number: no penalty
    ('""', Status.BAD_FORMAT), ("false", Status.BAD_FORMAT), ("null", Status.BAD_FORMAT),
])
def test_doc_math_answers(answer, status):
    parsed = parse_questioner_output(fenced(f'{{"question": "How many?", "answer": {answer}}}'), DOC_MATH)
    assert parsed.status == status


def test_doc_math_keeps_the_number_as_written():
    parsed = parse_questioner_output(fenced('{"question": "How many?", "answer": 3.75}'), DOC_MATH)
    assert parsed.task == Task(DOC_MATH, "How many?", "3.75")


# --- questioner: doc_mc ------------------------------------------------------------------


def test_valid_doc_mc():
    parsed = parse_questioner_output(fenced(MC), DOC_MC)
    assert parsed.status == Status.OK
    assert parsed.task.answer == "B"
    assert parsed.task.options == {"A": "Banquo", "B": "Macbeth", "C": "Malcolm", "D": "Macduff"}


@pytest.mark.parametrize("options, answer", [
    ('{"A": "x", "B": "y", "C": "z"}', '"A"'),  # three options
    ('{"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}', '"A"'),  # five options
    ('{"A": "x", "B": "y", "C": "z", "E": "w"}', '"A"'),  # E instead of D
    ('{"a": "x", "b": "y", "c": "z", "d": "w"}', '"A"'),  # lower-case keys
    ('["x", "y", "z", "w"]', '"A"'),  # a list, not an object
    ('{"A": "x", "B": "", "C": "z", "D": "w"}', '"A"'),  # empty option
    ('{"A": "x", "B": null, "C": "z", "D": "w"}', '"A"'),
    ('{"A": "x", "B": "y", "C": "z", "D": "w"}', '"E"'),  # answer not in A-D
    ('{"A": "x", "B": "y", "C": "z", "D": "w"}', '"y"'),  # option text instead of the letter
    ('{"A": "x", "B": "y", "C": "z", "D": "w"}', '2'),
])
def test_bad_options_or_answer_are_bad_format(options, answer):
    body = f'{{"question": "Which?", "options": {options}, "answer": {answer}}}'
    assert parse_questioner_output(fenced(body), DOC_MC).status == Status.BAD_FORMAT


def test_missing_options_is_bad_format():
    assert parse_questioner_output(fenced(QA), DOC_MC).status == Status.BAD_FORMAT


@pytest.mark.parametrize("answer", ['"(b)"', '"b"', '"B."', '"(B)"', '" B"', '2'])
def test_doc_mc_answer_must_be_exactly_a_letter(answer):
    """Released `_parse_doc_mc`: the answer must be a string exactly A, B, C or D."""
    body = MC.replace('"answer": "B"', f'"answer": {answer}')
    assert parse_questioner_output(fenced(body), DOC_MC).status == Status.BAD_FORMAT


@pytest.mark.parametrize("answer", ['1066', '3.5', 'true', '["Duncan"]'])
def test_doc_qa_answer_must_be_a_string(answer):
    """Released `_parse_doc_general_qa`: a number as the span answer is a format error."""
    body = f'{{"question": "When?", "answer": {answer}}}'
    assert parse_questioner_output(fenced(body), DOC_QA, words).status == Status.BAD_FORMAT


# --- responder: tests/core/test_answers.py ----------------------------------------------


# --- verifier -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Same person. [[YES]]", True),
    ("Different. [[NO]]", False),
    ("[[YES]]", True),
    ("[[ NO ]]", False),  # a bare NO
    ("YES", True),  # released: a bare YES without any NO counts
    ("[YES]", True),
    ("Decision: NO", False),
    ("[[YES]] (NOT a paraphrase issue)", True),  # [[YES]] without [[NO]], although NOT holds a NO
    ("<think>[[NO]]</think> They agree. [[YES]]", True),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) is expected


@pytest.mark.parametrize("text", [
    "Yes, they match.", "It matches.\n[[yes]]",  # case-sensitive, as released
    "At first [[NO]], but on reflection [[YES]]",  # both present: unparsable (was: the last wins)
    "Format: [[YES]] or [[NO]]. Verdict: [[NO]].",
    "[[MAYBE]]", "", "<think>[[YES]]", "<think>[[YES]]</think> I cannot decide.",
])
def test_unparsable_verdicts(text):
    assert parse_verdict(text) is None


# --- helpers ------------------------------------------------------------------------------


def test_strip_thinking():
    assert strip_thinking("plain") == "plain"
    assert strip_thinking("<think>a</think>b</think>c") == "c"
    assert strip_thinking("<think>never closed") is None


@pytest.mark.parametrize("text, expected", [
    ("42", 42.0), ("-7.5", -7.5), ("1,234,567.89", 1234567.89), ("$1,200", 1200.0), ("12.5%", 12.5),
    ("\\boxed{17}", 17.0), ("\\dfrac{1}{8}", 0.125), ("3 / 4", 0.75), ("1.5e3", 1500.0), (".5", 0.5),
    ("about 3 apples and 4 pears", 3.0), ("\\text{12} km", 12.0), ("1{,}000", 1000.0), ("−2", -2.0),
    ("none", None), ("", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected
