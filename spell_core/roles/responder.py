"""Responder: the prompt (all documents of the cluster, then the question), the grounding
prompt (the question alone), and the extraction of the final answer."""
from __future__ import annotations

import re
from collections.abc import Sequence

from .chat import Prompt, render_documents, render_prompt
from .rewards import rule_reward
from .tasks import DOC_MATH, DOC_MC, Task
from .text import clean_answer, strip_thinking

_INTRO = "Below are documents, followed by a question about them. Read them closely.\n\n"

_ANSWER_FORMATS = {
    "doc_qa": "Give the answer as a short phrase.",
    DOC_MATH: "Give the answer as a single number.",
    DOC_MC: "Give the answer as the letter of the correct option.",
}


def render_question(task: Task) -> str:
    """The question as every role sees it; multiple choice with its options A-D."""
    if task.task_type != DOC_MC or not task.options:
        return task.question
    options = "\n".join(f"{letter}. {text}" for letter, text in task.options.items())
    return f"{task.question}\n{options}"


def _question_block(task: Task) -> str:
    return (
        f"Question: {render_question(task)}\n\n"
        f"Think step by step, then finish with a line of the form \"The answer is ...\". "
        f"{_ANSWER_FORMATS[task.task_type]}"
    )


def build_responder_prompt(tokenizer, documents: Sequence, task: Task, *,
                           template_kwargs: dict | None = None) -> Prompt:
    """The responder's prompt: fixed instructions and ALL documents of the cluster first
    (the part every question over this cluster shares: `Prompt.prefix_len` tokens), then
    the question."""
    if not documents:
        raise ValueError("the responder needs at least one document; use build_grounding_prompt "
                         "for the question alone")
    shared = _INTRO + render_documents(documents)
    return render_prompt(tokenizer, shared, "\n\n" + _question_block(task), template_kwargs=template_kwargs)


def build_grounding_prompt(tokenizer, task: Task, *, template_kwargs: dict | None = None) -> Prompt:
    """The grounding check's prompt: the same question and answer format, no documents."""
    return render_prompt(tokenizer, "", _question_block(task), template_kwargs=template_kwargs)


_ANSWER_IS = re.compile(r"the\s+answer\s+is", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The responder's final answer: the cleaned text after the last "the answer is"
    (any case) in the part after the reasoning trace. None (unparsable) when the phrase
    is missing, the answer is empty, or the output ends inside an unclosed `<think>`."""
    final = strip_thinking(text)
    if final is None:
        return None
    matches = list(_ANSWER_IS.finditer(final))
    if not matches:
        return None
    answer = clean_answer(final[matches[-1].end():])
    return answer or None


def answered_without_documents(task: Task, grounding_output: str) -> bool:
    """The grounding filter: True (the question is `bad_ground`) when the answer the model
    gave with no documents earns rule reward 1."""
    return rule_reward(task, extract_answer(grounding_output)) == 1.0
