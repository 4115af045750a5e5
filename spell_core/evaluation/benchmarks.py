"""Evaluation files as the benchmarks release them, read into `EvalItem`s.

Formats (detected from the fields of the first record, or named with `--format`):

    longbench-v2  LongBench-v2: _id, domain, sub_domain, difficulty, length, question,
                  choice_A, choice_B, choice_C, choice_D, answer (a letter), context -> doc_mc
    longbench     LongBench (v1) QA subsets (2wikimqa, hotpotqa, musique): input, context,
                  answers (a list: any of them counts), length, dataset, all_classes, _id -> doc_qa
    docmath       DocMath-Eval: question_id, question, paragraphs (list of str), tables (list of
                  markdown tables), ground_truth (a number) -> doc_math; the context is the
                  paragraphs joined by newlines, tables left out (as the released evaluation)
    frames        Frames as the method's evaluation prepares it: Prompt (the question), Answer,
                  wiki_items (list of {title, text}: the linked Wikipedia articles) -> doc_qa
    spell         ours: context (str or list), question, answer, type, options (doc_mc, optional)

Containers: a JSON array, JSON Lines, or Apache Parquet (`.parquet`, read with pyarrow), for
every format. Each item keeps a stable `id` (the benchmark's own where it has one) so that two
result files can be compared question by question.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from spell_core.roles import DOC_MATH, DOC_MC, DOC_QA, TASK_TYPES, Task
from spell_core.roles.text import CHOICE_LETTERS, parse_number
from spell_core.common.textfiles import jsonl_objects, read_utf8


class EvalDataError(ValueError):
    """A data file or record that cannot be evaluated; the message names the file (and line)."""


@dataclass(frozen=True)
class EvalItem:
    task: Task
    documents: tuple[str, ...]
    where: str  # file:line (JSON Lines) or file[index] (JSON array, Parquet)
    id: str = ""  # the question's id: the benchmark's own, else its place in the file (#0, #1, ...)
    source: str = "spell"  # the format, or the LongBench subset (hotpotqa, ...)
    references: tuple[str, ...] = field(default=())  # every accepted answer (LongBench v1); () = task.answer


# format name -> (fields a record must have, what it becomes)
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "longbench-v2": (("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B",
                      "choice_C", "choice_D", "answer", "context"), DOC_MC),
    "longbench": (("input", "context", "answers", "length", "dataset", "all_classes", "_id"), DOC_QA),
    "docmath": (("question_id", "question", "paragraphs", "tables", "ground_truth"), DOC_MATH),
    "frames": (("Prompt", "Answer", "wiki_items"), DOC_QA),
    "spell": (("context", "question", "answer", "type"), "doc_qa / doc_math / doc_mc (field type)"),
}


def formats_help() -> str:
    return "; ".join(f"{name} ({', '.join(fields)} -> {kind})" for name, (fields, kind) in FORMATS.items())


def load_eval_data(path, fmt: str | None = None) -> list[EvalItem]:
    """The questions of `path` (JSON array, JSON Lines or Parquet) in format `fmt` (None: detected)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file; the eval data is a .json, .jsonl or .parquet file of questions "
                            f"in one of the formats: {formats_help()}")
    if fmt is not None and fmt not in FORMATS:
        raise EvalDataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    records = list(_records(path))
    if not records:
        raise EvalDataError(f"{path}: no questions (the file is empty)")
    if fmt is None:
        fmt = detect_format(records[0][1], path)
    parse = _PARSERS[fmt]
    items = []
    for index, (where, record) in enumerate(records):
        missing = [f for f in FORMATS[fmt][0] if f not in record]
        if fmt == "spell" and missing:
            raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)} (a line needs context, question, "
                                "answer and type)")
        if missing:
            raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)} of the {fmt} format "
                                f"({', '.join(FORMATS[fmt][0])})")
        items.append(parse(record, where, index))
    return items


def detect_format(record: dict, path="the file") -> str:
    """The first format whose fields the record has; an error listing every format otherwise."""
    for name, (fields, _) in FORMATS.items():
        if all(f in record for f in fields):
            return name
    found = ", ".join(sorted(record)) or "none"
    raise EvalDataError(f"{path}: the first question's fields ({found}) match no known format; the formats and "
                        f"the fields each needs: {formats_help()}; or name one with --format")


# --- containers ----------------------------------------------------------------------------------

def _records(path: Path):
    if path.suffix.lower() == ".parquet":
        yield from _parquet_records(path)
        return
    text = read_utf8(path, EvalDataError)
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{path}: not a valid JSON array ({err.msg} at line {err.lineno}, column "
                                f"{err.colno})") from None
        for i, record in enumerate(array):
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}[{i}]: expected a JSON object, got {type(record).__name__}")
            yield f"{path}[{i}]", record
        return
    yield from jsonl_objects(path, EvalDataError)


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise EvalDataError(f"{path}: not a readable Parquet file ({err})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}[{i}]", record


# --- record parsers ------------------------------------------------------------------------------

def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise EvalDataError(f"{where}: {key!r} must be a non-empty string")
    return str(value).strip()


def _text_list(record: dict, key: str, where: str, *, allow_empty: bool = False) -> list[str]:
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not allow_empty):
        raise EvalDataError(f"{where}: {key!r} must be a {'' if allow_empty else 'non-empty '}list of strings")
    return value


def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _math_answer(record: dict, key: str, where: str) -> str:
    """A doc_math reference: a number, or a text the rule reward reads one from ("$1,234.5", "12%");
    anything else could never be scored right, not even by the reference itself."""
    value = record[key]
    text = _number_text(value).strip() if isinstance(value, (int, float, str)) and not isinstance(value, bool) else ""
    if not text or parse_number(text) is None:
        raise EvalDataError(f"{where}: {key!r} of a doc_math question must be a number (e.g. 42 or \"3.75\"), got "
                            f"{value!r}: no answer could ever be scored right; correct the item or remove it")
    return text


def _parse_longbench_v2(record: dict, where: str, index: int) -> EvalItem:
    options = {letter: _text(record, f"choice_{letter}", where) for letter in CHOICE_LETTERS}
    answer = _text(record, "answer", where).strip("()[]. ").upper()
    if answer not in CHOICE_LETTERS:
        raise EvalDataError(f"{where}: 'answer' must be a letter A-D, got {record['answer']!r}")
    task = Task(DOC_MC, _text(record, "question", where), answer, options)
    return EvalItem(task, (_text(record, "context", where),), where, str(record["_id"]), "longbench-v2")


def _parse_longbench(record: dict, where: str, index: int) -> EvalItem:
    answers = [a.strip() for a in _text_list(record, "answers", where) if a.strip()]
    if not answers:
        raise EvalDataError(f"{where}: 'answers' has no non-empty answer")
    task = Task(DOC_QA, _text(record, "input", where), answers[0])
    return EvalItem(task, (_text(record, "context", where),), where, str(record["_id"]),
                    str(record["dataset"] or "longbench"), tuple(answers))


def _parse_docmath(record: dict, where: str, index: int) -> EvalItem:
    paragraphs = _text_list(record, "paragraphs", where, allow_empty=True)
    _text_list(record, "tables", where, allow_empty=True)  # checked, not shown: the released eval leaves tables out
    context = "\n".join(paragraphs).strip()
    if not context:
        raise EvalDataError(f"{where}: 'paragraphs' is empty: no document to read (tables are not shown, as in "
                            "the method's evaluation)")
    task = Task(DOC_MATH, _text(record, "question", where), _math_answer(record, "ground_truth", where))
    return EvalItem(task, (context,), where, str(record["question_id"]), "docmath")


def _parse_frames(record: dict, where: str, index: int) -> EvalItem:
    articles = record["wiki_items"]
    if isinstance(articles, str):  # some exports keep the list as a JSON string
        try:
            articles = json.loads(articles)
        except json.JSONDecodeError:
            raise EvalDataError(f"{where}: 'wiki_items' is a string that is not JSON") from None
    if not isinstance(articles, list) or not articles or not all(
            isinstance(a, dict) and isinstance(a.get("text"), str) for a in articles):
        raise EvalDataError(f"{where}: 'wiki_items' must be a non-empty list of objects with 'title' and 'text'")
    documents = tuple(f"{a.get('title') or ''}\n{a['text']}".strip() for a in articles)
    task = Task(DOC_QA, _text(record, "Prompt", where), _text(record, "Answer", where))
    qid = record.get("id", record.get("Unnamed: 0", f"frames-{index}"))
    return EvalItem(task, documents, where, str(qid), "frames")


def _parse_spell(record: dict, where: str, index: int) -> EvalItem:
    task_type, question, answer, context = record["type"], record["question"], record["answer"], record["context"]
    if task_type not in TASK_TYPES:
        raise EvalDataError(f"{where}: type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise EvalDataError(f"{where}: 'answer' must be a non-empty string or a number")
    documents = [context] if isinstance(context, str) else context
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) and d.strip()
                                                                   for d in documents):
        raise EvalDataError(f"{where}: 'context' must be a non-empty string or a list of non-empty strings")
    answer = _math_answer(record, "answer", where) if task_type == DOC_MATH else str(answer).strip()
    options = record.get("options")
    if task_type == DOC_MC:
        letter = answer.strip("()[]. ").upper()
        if letter not in CHOICE_LETTERS:
            raise EvalDataError(f"{where}: a doc_mc answer must be a letter A-D, got {answer!r}")
        answer = letter
        if isinstance(options, list) and len(options) == 4:
            options = dict(zip(CHOICE_LETTERS, options))
        if options is not None and (not isinstance(options, dict) or sorted(options) != list(CHOICE_LETTERS)
                                    or not all(isinstance(v, str) and v.strip() for v in options.values())):
            raise EvalDataError(f"{where}: 'options' must map exactly A, B, C, D to non-empty texts (or be a "
                                "list of 4 texts)")
    elif options is not None:
        raise EvalDataError(f"{where}: 'options' is only allowed for doc_mc questions, this one is {task_type}")
    qid = str(record.get("id", f"#{index}"))  # the place in the file: the same across copies of it
    return EvalItem(Task(task_type, question.strip(), answer, options), tuple(documents), where, qid, "spell")


_PARSERS = {"longbench-v2": _parse_longbench_v2, "longbench": _parse_longbench, "docmath": _parse_docmath,
            "frames": _parse_frames, "spell": _parse_spell}
