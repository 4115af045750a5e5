r"""Extraction of the responder's final answer, per task type (SPEC.md, "Responder").

Tolerant the way the method's released code is: a strict parser turns right answers into
reward 0. Everything before the last `</think>` is dropped first; an output that ends inside
an unclosed `<think>` has no answer. Phrases are matched case-insensitively; the MC letter
must be upper-case A-D.

- doc_qa: the text after the last "the correct answer is"; if there is none, after the last
  "the answer is"; if none, after the last "answer is"; up to the end of that line, tidied
  (markdown bold, math delimiters, `\boxed{}`, a trailing period removed). When the phrase
  ends its line ("The correct answer is:" then the answer below), the next non-empty line.
- doc_math (as the released `docmath.parse_model_answer`): `*` removed; the content of the
  last `\boxed{...}` anywhere; otherwise the number written directly after "answer is ",
  bare or in brackets, optionally after symbols = ≈ ` % $ ° £ € ¥: the last such
  "the answer is (X)", else the last "the answer is X", else "answer is (X)", else "answer
  is X". "The answer is approximately 5" has no answer.
- doc_mc: the letter of, in this order, the last `\boxed{X}`, the last "correct answer is
  (X)", the last "answer is X" (brackets and `**` allowed around X), or "(X)" ending the
  response.
"""
from __future__ import annotations

import re

from .tasks import DOC_MATH, DOC_MC, check_task_type
from .text import boxed_contents, clean_answer, parse_number, strip_thinking

# doc_qa phrases, most preferred first
_QA_PHRASES = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"the\s+correct\s+answer\s+is", r"the\s+answer\s+is", r"answer\s+is"))
_NUMBER_AFTER = r"([=≈`%$°£€¥]*-?[0-9.,]+)"
_MATH_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    rf"the answer is \({_NUMBER_AFTER}\)", rf"the answer is {_NUMBER_AFTER}",
    rf"answer is \({_NUMBER_AFTER}\)", rf"answer is {_NUMBER_AFTER}"))

_LETTER = r"[(\[]?\s*([A-D])\s*[)\]]?"
_MC_BOXED_CONTENT = re.compile(rf"^\s*{_LETTER}(?:[.:\s]|$)")
_MC_CORRECT_IS = re.compile(r"(?i:correct\s+answer\s+is)\s*:?[\s*]*\(([A-D])\)")
_MC_ANSWER_IS = re.compile(rf"(?i:answer\s+is)\s*:?[\s*]*{_LETTER}(?![A-Za-z0-9])")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_MC_TRAILING = re.compile(r"\(([A-D])\)[\s.*]*$")


def _after_last(pattern: re.Pattern, text: str) -> str | None:
    matches = list(pattern.finditer(text))
    return text[matches[-1].end():] if matches else None


def _qa_answer(text: str) -> str | None:
    for phrase in _QA_PHRASES:
        rest = _after_last(phrase, text)
        if rest is not None:
            return clean_answer(rest) or None
    return None


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _math_answer(text: str) -> str | None:
    text = text.replace("*", "")
    boxes = [b.strip() for b in boxed_contents(text)]
    if boxes:
        return boxes[-1] or None
    for pattern in _MATH_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            value = parse_number(matches[-1].replace(",", "").rstrip("."))
            return None if value is None else _number_text(value)
    return None


def _mc_answer(text: str) -> str | None:
    boxes = boxed_contents(text)
    if boxes:
        match = _MC_BOXED_CONTENT.match(_LATEX_TEXT.sub(r"\1", boxes[-1]))  # \boxed{\text{C}} too
        if match:
            return match.group(1)
    for pattern in (_MC_CORRECT_IS, _MC_ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].group(1)
    match = _MC_TRAILING.search(text)
    return match.group(1) if match else None


def extract_answer(text: str, task_type: str) -> str | None:
    """The responder's final answer for a task of `task_type` (see the module docstring):
    text for doc_qa, the number (or boxed expression) for doc_math, a letter A-D for doc_mc;
    None when nothing is found (unparsable: rule reward 0, not judged by the verifier)."""
    check_task_type(task_type)
    final = strip_thinking(text)
    if final is None:
        return None
    if task_type == DOC_MATH:
        return _math_answer(final)
    if task_type == DOC_MC:
        return _mc_answer(final)
    return _qa_answer(final)
