"""The prompts of the evaluation, after the method's released evaluation (our wording).

The documents come first inside <text> tags (the part the model reads once), then the
question and the sentence the answer must end with: "The correct answer is ..." for QA and
multiple choice, "Therefore, the answer is ..." for math; the responder's answer extraction
(`spell_core.roles.extract_answer`) reads both. Multiple choice is shown LongBench-v2 style:
"Choices:" then "(A) ..." to "(D) ...". Several documents (Frames' articles) are separated by
a blank line.
"""
from __future__ import annotations

from spell_core.roles import DOC_MATH, DOC_MC, Prompt, Task, render_prompt
from spell_core.roles.chat import document_text

_READ = "Read the text below, then answer the question that follows it.\n\n"
_MATH = ("You are given a document and a question that needs numeric reasoning over it. Work through the problem "
         "step by step, writing down each calculation, and end your reply with the sentence "
         "\"Therefore, the answer is (the answer).\" The answer is a single number.\n\n")

_ENDINGS = {
    "doc_qa": "End your reply with the sentence \"The correct answer is (the answer).\"",
    DOC_MATH: "Reason step by step, then end your reply with \"Therefore, the answer is (the answer).\"",
    DOC_MC: "End your reply with the sentence \"The correct answer is (the letter of your choice).\"",
}


def render_eval_question(task: Task) -> str:
    if task.task_type == DOC_MC and task.options:
        choices = "\n".join(f"({letter}) {text}" for letter, text in task.options.items())
        return f"Question: {task.question}\nChoices:\n{choices}"
    return f"Question: {task.question}"


def build_eval_prompt(tokenizer, documents, task: Task, *, template_kwargs: dict | None = None) -> Prompt:
    """The chat prompt of one evaluation question over its documents."""
    if not documents:
        raise ValueError("an evaluation question needs at least one document")
    text = "\n\n".join(document_text(d).strip() for d in documents)
    intro = _MATH if task.task_type == DOC_MATH else _READ
    shared = f"{intro}<text>\n{text}\n</text>"
    specific = f"\n\n{render_eval_question(task)}\n\n{_ENDINGS[task.task_type]}"
    return render_prompt(tokenizer, shared, specific, template_kwargs=template_kwargs)
