"""Task types, the parsed form of a question, and the outcome of parsing one."""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from enum import Enum

DOC_QA = "doc_qa"  # multi-hop question, short span answer
DOC_MATH = "doc_math"  # multi-step numeric reasoning, one non-zero number
DOC_MC = "doc_mc"  # four options A-D, one correct
TASK_TYPES = (DOC_QA, DOC_MATH, DOC_MC)


def check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    return task_type


class Status(str, Enum):
    """What became of a questioner output (a str, so it compares and serialises as text)."""

    OK = "ok"
    BAD_FORMAT = "bad_format"  # penalised: no parsable JSON, missing/mistyped fields, bad options
    BAD_GROUND = "bad_ground"  # penalised: answered correctly without the documents
    DISCARDED = "discarded"  # dropped without penalty and without training signal

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Task:
    """One question with its reference answer.

    `answer` is text for every type: a span for doc_qa, the number as written for doc_math,
    the letter A-D for doc_mc. `options` (doc_mc only) maps each letter A-D to its text;
    None for a doc_mc task whose question text already lists the options (evaluation data).
    """

    task_type: str
    question: str
    answer: str
    options: dict[str, str] | None = None

    def __post_init__(self):
        check_task_type(self.task_type)
        if self.options is not None and self.task_type != DOC_MC:
            raise ValueError(f"options are only allowed for doc_mc, not for {self.task_type}")

    def to_dict(self) -> dict:
        return {"task_type": self.task_type, "question": self.question,
                "answer": self.answer, "options": dict(self.options) if self.options else None}

    @classmethod
    def from_dict(cls, data: dict) -> "Task":
        return cls(data["task_type"], data["question"], data["answer"], data.get("options"))


def shuffle_options(task: Task, rng: random.Random) -> Task:
    """The doc_mc task with its four option texts in a random order and `answer` the letter the
    right text now has; any other task unchanged. A questioner's letters lean (one run's 17
    multiple-choice answers: A 9, B 7, C 1, D 0), and responders rewarded on them learn the lean."""
    if task.task_type != DOC_MC or not task.options:
        return task
    letters = sorted(task.options)
    texts = [task.options[letter] for letter in letters]
    order = list(range(len(texts)))
    rng.shuffle(order)
    options = {letter: texts[k] for letter, k in zip(letters, order)}
    answer = letters[order.index(letters.index(task.answer))]
    return replace(task, options=options, answer=answer)


@dataclass(frozen=True)
class ParsedQuestion:
    """The outcome of parsing one questioner output: a task when `status` is OK, else the
    status and a short reason (for logs)."""

    status: Status
    task: Task | None = None
    reason: str = field(default="")
