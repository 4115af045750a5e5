"""The prompts of the evaluation: the training responder's prompts, word for word (as the
method's released evaluation uses its training responder templates).

`build_eval_prompt` is `spell_core.roles.build_responder_prompt`: the documents first, each in
<document> tags (the part the model reads once), then the question (multiple choice with
"Choices:" and "(A) ..." lines) and the sentence the answer must end with ("The correct answer
is ..." for QA and multiple choice, "Therefore, the answer is ..." for math), which the
responder's answer extraction reads.
"""
from __future__ import annotations

from spell_core.roles import Prompt, Task, build_responder_prompt


def build_eval_prompt(tokenizer, documents, task: Task, *, template_kwargs: dict | None = None) -> Prompt:
    """The chat prompt of one evaluation question over its documents."""
    if not documents:
        raise ValueError("an evaluation question needs at least one document")
    return build_responder_prompt(tokenizer, list(documents), task, template_kwargs=template_kwargs)
