"""Responder: the prompt (all documents of the cluster, then the question), the grounding
prompt (the same template with the documents replaced by "Empty", as released); the answer
extraction lives in answers.py."""
from __future__ import annotations

from collections.abc import Sequence

from .answers import extract_answer
from .chat import Prompt, render_documents, render_prompt
from .rewards import rule_reward
from .tasks import DOC_MATH, DOC_MC, Task

_INTRO = "Below are documents, followed by a question about them. Read them closely.\n\n"

# the closing sentence each task type asks for (SPEC.md, "Responder"); extraction looks for it
_ANSWER_SENTENCES = {
    "doc_qa": ('Think step by step, then end your response with the sentence "The correct answer is '
               '<answer>", where <answer> is a short phrase (a name, a date, a number or a few words).'),
    DOC_MATH: ('Think step by step, then end your response with the sentence "Therefore, the answer is '
               '<number>", where <number> is a single number without units.'),
    DOC_MC: ('Think step by step, then end your response with the sentence "The correct answer is (X)", '
             'where X is the letter of the correct choice.'),
}


def render_question(task: Task) -> str:
    """The question as every role sees it; multiple choice LongBench-v2 style: the question,
    then "Choices:" and one "(A) ..." line per option."""
    if task.task_type != DOC_MC or not task.options:
        return task.question
    choices = "\n".join(f"({letter}) {text}" for letter, text in task.options.items())
    return f"{task.question}\n\nChoices:\n{choices}"


def _question_block(task: Task) -> str:
    return f"Question: {render_question(task)}\n\n{_ANSWER_SENTENCES[task.task_type]}"


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


NO_DOCUMENTS = "Empty"  # what the released grounding check puts where the documents go


def build_grounding_prompt(tokenizer, task: Task, *, template_kwargs: dict | None = None) -> Prompt:
    """The grounding check's prompt: the responder's prompt with the documents replaced by
    the one word "Empty" (the released trainer's pre-filter)."""
    return build_responder_prompt(tokenizer, [NO_DOCUMENTS], task, template_kwargs=template_kwargs)


def answered_without_documents(task: Task, grounding_output: str) -> bool:
    """The grounding filter: True (the question is `bad_ground`) when the answer the model
    gave with no documents earns rule reward 1."""
    return rule_reward(task, extract_answer(grounding_output, task.task_type)) == 1.0
