"""Questioner: the prompt that asks for one task over the selected documents (with the
history memory as examples), and the parser that turns its output into a `Task`."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .chat import Prompt, render_documents, render_prompt
from .tasks import DOC_MATH, DOC_MC, DOC_QA, ParsedQuestion, Status, Task, check_task_type
from .text import CHOICE_LETTERS, last_json_object, parse_number, strip_thinking

SPAN_TOKEN_LIMIT = 40  # doc_qa answers longer than this are discarded (the prompt asks for < 20 words)

_INTRO = "Below are documents. Read them closely: you will write an exam question about them.\n\n"

_TASK_INSTRUCTIONS = {
    DOC_QA: (
        "Write one question whose answer can only be found by combining facts stated in at "
        "least two different places in the documents (a multi-hop question). The question "
        "must make sense on its own to a reader who has the documents: never refer to "
        "\"the document\", \"the passage\", \"document 2\" or \"the text above\". The answer must "
        "be a short exact span: a name, a date, a number or a phrase of fewer than 20 words."
    ),
    DOC_MATH: (
        "Write one question that needs several steps of arithmetic on quantities stated in "
        "the documents (counting, sums, differences, ratios, percentages, dates). The question "
        "must make sense on its own: never refer to \"the document\" or \"document 2\". The "
        "answer must be one number, not zero, with no units in the answer field."
    ),
    DOC_MC: (
        "Write one multiple-choice question about the documents with four options labelled "
        "A, B, C and D, exactly one of them correct. Each of the three wrong options must be "
        "the result of a different plausible mistake (a different wrong line of reasoning), "
        "so that none can be ruled out without reading the documents. The question must make "
        "sense on its own: never refer to \"the document\" or \"document 2\"."
    ),
}

_OUTPUT_FORMATS = {
    DOC_QA: '```json\n{"question": "<the question>", "answer": "<the short answer>"}\n```',
    DOC_MATH: '```json\n{"question": "<the question>", "answer": <the number, e.g. 42 or 3.75>}\n```',
    DOC_MC: (
        '```json\n{"question": "<the question>", "options": {"A": "<text>", "B": "<text>", '
        '"C": "<text>", "D": "<text>"}, "answer": "<the correct letter: A, B, C or D>"}\n```'
    ),
}


def _history_block(history: Sequence) -> str:
    if not history:
        return ""
    lines = ["\n\nThese questions have already been asked about these documents:"]
    for i, entry in enumerate(history, 1):
        lines.append(f"\nExample {i}:\nQuestion: {entry.question}")
        for letter, text in (getattr(entry, "options", None) or {}).items():
            lines.append(f"({letter}) {text}")
        lines.append(f"Answer: {entry.answer}")
    lines.append(
        "\nYour question must be harder than every example above and must ask about "
        "something different: new facts, a new combination of facts, or more reasoning steps."
    )
    return "\n".join(lines)


def build_questioner_prompt(tokenizer, documents: Sequence, task_type: str, history: Sequence = (),
                            *, template_kwargs: dict | None = None) -> Prompt:
    """The questioner's prompt: the documents first, then the task, the past questions of
    this (cluster, task) as examples (`history`: objects with `.question`, `.answer` and
    optionally `.options`, e.g. memory entries), and the exact output format."""
    check_task_type(task_type)
    if not documents:
        raise ValueError("the questioner needs at least one document")
    shared = _INTRO + render_documents(documents)
    specific = (
        "\n\n" + _TASK_INSTRUCTIONS[task_type] + _history_block(history)
        + "\n\nFirst work out the question and check its answer against the documents. "
        "Then end your reply with exactly one fenced JSON block in this format, and nothing after it "
        "(plain text in the strings, no LaTeX; escape double quotes as \\\"):\n"
        + _OUTPUT_FORMATS[task_type]
    )
    return render_prompt(tokenizer, shared, specific, template_kwargs=template_kwargs)


# --- parsing ------------------------------------------------------------------------------


def _bad(reason: str) -> ParsedQuestion:
    return ParsedQuestion(Status.BAD_FORMAT, None, reason)


def _discard(reason: str) -> ParsedQuestion:
    return ParsedQuestion(Status.DISCARDED, None, reason)


def _text_field(value) -> str | None:
    """A JSON string or number as text; None for any other type (bool, null, list, dict)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        return str(value)
    return None


def parse_questioner_output(text: str, task_type: str, count_tokens: Callable[[str], int] | None = None,
                            *, span_token_limit: int = SPAN_TOKEN_LIMIT) -> ParsedQuestion:
    """Turn a questioner output into a task, or say why not.

    - Reasoning: everything up to the last `</think>` is dropped; an output with an unclosed
      `<think>` has no final part and is DISCARDED (no task, no penalty, no training signal).
    - The last ```json fenced block that parses as JSON is the task (or, without one, the
      whole final text as JSON; `last_json_object`, as released); no JSON object → BAD_FORMAT.
    - BAD_FORMAT (as the released parsers): `question` missing, not a string or empty;
      `answer` missing or empty; a doc_qa or doc_mc `answer` that is not a string (a doc_math
      answer may be a number); for doc_mc `options` not an object with keys exactly A, B, C, D
      and non-empty text values, or `answer` not exactly one of "A", "B", "C", "D".
    - DISCARDED: a doc_math answer that is 0 or has no number in it; a doc_qa answer longer
      than `span_token_limit` tokens (`count_tokens` is required for doc_qa).
    """
    check_task_type(task_type)
    final = strip_thinking(text)
    if final is None:
        return _discard("unclosed <think>")
    data = last_json_object(final)
    if data is None:
        return _bad("no fenced JSON object")
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        return _bad("question missing, not a string or empty")
    raw_answer = data.get("answer")
    if task_type != DOC_MATH and not isinstance(raw_answer, str):
        return _bad(f"{task_type} answer must be a JSON string")
    answer = _text_field(raw_answer)
    if not answer:
        return _bad("answer missing, mistyped or empty")

    if task_type == DOC_MC:
        options = data.get("options")
        if not isinstance(options, dict) or sorted(options) != list(CHOICE_LETTERS):
            return _bad("options must be an object with keys exactly A, B, C, D")
        option_texts = {k: _text_field(options[k]) for k in CHOICE_LETTERS}
        if not all(option_texts.values()):
            return _bad("every option needs a non-empty text")
        letter = raw_answer
        if letter not in CHOICE_LETTERS:
            return _bad("answer must be exactly one of A, B, C, D")
        return ParsedQuestion(Status.OK, Task(DOC_MC, question.strip(), letter, option_texts))

    if task_type == DOC_MATH:
        value = parse_number(answer)
        if value is None or not math.isfinite(value):
            return _discard("numeric answer has no number")
        if value == 0:
            return _discard("numeric answer is zero")
        return ParsedQuestion(Status.OK, Task(DOC_MATH, question.strip(), answer))

    if count_tokens is None:
        raise ValueError("parse_questioner_output needs count_tokens for doc_qa (the span-length "
                         "rule); pass spell_core.roles.token_counter(tokenizer)")
    if count_tokens(answer) > span_token_limit:
        return _discard(f"span answer longer than {span_token_limit} tokens")
    return ParsedQuestion(Status.OK, Task(DOC_QA, question.strip(), answer))
