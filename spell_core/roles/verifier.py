"""Verifier: the prompt (question with options, the responder's answer, the reference; no
documents) and the parser of its `[[YES]]` / `[[NO]]` decision."""
from __future__ import annotations

from .chat import Prompt, render_prompt
from .responder import render_question
from .rewards import REL_TOL
from .tasks import DOC_MATH, DOC_MC, Task
from .text import strip_thinking

_INTRO = ("You are grading an answer to a question by comparing it with the reference answer. "
          "You do not need the source documents: the reference answer is correct by definition.\n\n")

_EQUIVALENCE_RULES = {
    "doc_qa": ("The answer is correct if it states the same thing as the reference answer; "
               "wording, capitalisation and extra detail that does not contradict it do not matter."),
    DOC_MATH: ("The answer is correct if its number equals the reference number within "
               f"{REL_TOL:.2%} relative error (the same quantity written in another scale or with "
               "units, such as 12% for 0.12, also counts as equal)."),
    DOC_MC: "The answer is correct if it picks the same option as the reference answer.",
}


def build_verifier_prompt(tokenizer, task: Task, answer: str, *, template_kwargs: dict | None = None) -> Prompt:
    """The verifier's prompt for one extracted responder `answer` to `task`."""
    reference = task.answer
    if task.task_type == DOC_MC and task.options and reference in task.options:
        reference = f"({reference}) {task.options[reference]}"
    specific = (
        f"Question: {render_question(task)}\n\n"
        f"Reference answer: {reference}\n\n"
        f"Answer to grade: {answer}\n\n"
        f"{_EQUIVALENCE_RULES[task.task_type]} Explain your judgement briefly, then end with "
        "[[YES]] if the answer is correct or [[NO]] if it is not."
    )
    return render_prompt(tokenizer, _INTRO.rstrip("\n"), "\n\n" + specific, template_kwargs=template_kwargs)


def parse_verdict(text: str) -> bool | None:
    """True for YES, False for NO, None when unparsable, as the method's released trainer
    reads a verdict (case-sensitive, on the part after the reasoning trace):

    - YES when `[[YES]]` is there without `[[NO]]`, or a bare YES without any NO;
    - NO when `[[NO]]` is there without `[[YES]]`, or a bare NO without any YES;
    - otherwise (both present, neither, or an unclosed `<think>`) unparsable.

    Substrings count ("NOT" holds a NO), as released.
    """
    final = strip_thinking(text)
    if final is None:
        return None
    if ("[[YES]]" in final and "[[NO]]" not in final) or ("YES" in final and "NO" not in final):
        return True
    if ("[[NO]]" in final and "[[YES]]" not in final) or ("NO" in final and "YES" not in final):
        return False
    return None
