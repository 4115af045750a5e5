"""Task types tied to corpora (SPEC.md, "Questioner"): `--tasks` rules, the jsonl field `tasks`,
clusters that never mix task types, and the questioner drawing only a cluster's types."""
import json

import pytest

from spell_core.data.documents import CorpusError, Document, build_clusters, load_documents
from spell_core.data.task_types import DEFAULT_RULES, TaskRules, parse_types

ALL = ("doc_qa", "doc_math", "doc_mc")


def test_parse_types_orders_and_deduplicates():
    assert parse_types("doc_mc, doc_qa,doc_mc") == ("doc_qa", "doc_mc")
    assert parse_types(["doc_math"]) == ("doc_math",)


@pytest.mark.parametrize("value, message", [
    ("doc_qa,doc_essay", "unknown task type 'doc_essay'; choose from doc_qa, doc_math, doc_mc"),
    ("", "no task type given"),
    (3, "must be a list of names or a comma-separated string"),
])
def test_parse_types_errors_name_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        parse_types(value)


def test_default_mapping_docmath_and_ultrafineweb_else_all_three():
    rules = TaskRules.parse(None)
    assert DEFAULT_RULES == {"docmath": ("doc_math",), "ultrafineweb": ("doc_qa", "doc_mc")}
    assert rules.types_for("docmath_finance_0042") == ("doc_math",)
    assert rules.types_for("ultrafineweb_en_7") == ("doc_qa", "doc_mc")
    assert rules.types_for("hamlet") == ALL
    assert rules.types_for("my_docmath") == ALL  # a prefix, not a substring


def test_precedence_document_field_then_user_prefix_then_whole_corpus_then_defaults():
    rules = TaskRules.parse(["doc_qa", "docmath_fin=doc_mc", "docmath=doc_qa,doc_math"])
    assert rules.corpus == ("doc_qa",)
    assert rules.types_for("docmath_fin_1") == ("doc_mc",)  # the longest matching prefix
    assert rules.types_for("docmath_tat_1") == ("doc_qa", "doc_math")  # the user's rule beats the built-in
    assert rules.types_for("ultrafineweb_1") == ("doc_qa",)  # the whole-corpus form beats the built-in
    assert rules.types_for("hamlet") == ("doc_qa",)
    assert rules.types_for("docmath_fin_1", own=("doc_math",)) == ("doc_math",)  # the document's own field wins
    only_prefix = TaskRules.parse(["hamlet=doc_mc"])
    assert only_prefix.types_for("ultrafineweb_1") == ("doc_qa", "doc_mc")  # built-ins still apply


@pytest.mark.parametrize("options, message", [
    (["doc_qa", "doc_mc"], "whole-corpus form is given twice"),
    (["=doc_qa"], "the prefix before '=' is empty"),
    (["a=doc_qa", "a=doc_mc"], "prefix 'a' is given twice"),
    (["a=doc_quiz"], "--tasks a=doc_quiz: unknown task type 'doc_quiz'"),
])
def test_bad_tasks_options(options, message):
    with pytest.raises(ValueError, match=message):
        TaskRules.parse(options)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_tasks_and_data_source_fields(tmp_path):
    _write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": 1, "text": "Revenue rose 12% to $3.2 million.", "data_source": "docmath_fin", "cluster": "a"},
        {"id": 2, "text": "A web page about owls.", "data_source": "ultrafineweb_en", "cluster": "a"},
        {"id": 3, "text": "Another page.", "tasks": ["doc_mc"], "cluster": "a"},
        {"id": 4, "text": "A plain note.", "tasks": "doc_qa, doc_math", "cluster": "a"},
        {"id": 5, "text": "No fields at all.", "cluster": "a"},
    ])
    (tmp_path / "play.txt").write_text("A short text.")
    docs = {d.id: d for d in TaskRules.parse(None).apply(load_documents(tmp_path))}
    assert docs["1"].data_source == "docmath_fin" and docs["1"].tasks == ("doc_math",)
    assert docs["2"].tasks == ("doc_qa", "doc_mc")
    assert docs["3"].data_source == "mixed" and docs["3"].tasks == ("doc_mc",)  # data_source defaults to the file
    assert docs["4"].tasks == ("doc_qa", "doc_math")
    assert docs["5"].tasks == ALL
    assert docs["play/000"].data_source == "play" and docs["play/000"].tasks == ALL


@pytest.mark.parametrize("tasks, message", [(["doc_poem"], "unknown task type 'doc_poem'"), (7, "comma-separated")])
def test_bad_jsonl_tasks_field_names_the_line(tmp_path, tasks, message):
    _write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "x", "tasks": tasks}])
    with pytest.raises(CorpusError, match=rf"c\.jsonl:1: 'tasks': .*{message}"):
        load_documents(tmp_path)


class _WordTokenizer:  # one token per whitespace-separated word: cluster sizes worked by hand
    def __call__(self, texts, **kwargs):
        return {"input_ids": [t.split() for t in texts]}


def test_clusters_never_mix_task_types(tmp_path):
    docs = [Document("m1", "one two", "s", group="g", tasks=("doc_math",)),
            Document("w1", "three four", "s", group="g", tasks=("doc_qa", "doc_mc")),
            Document("m2", "five six", "s", group="g", tasks=("doc_math",)),
            Document("h1", "seven", "s", group="h", tasks=None)]
    clusters = build_clusters(docs, _WordTokenizer(), 100)
    got = {c.id: ([d.id for d in c.documents], c.tasks) for c in clusters}
    assert got == {"g[doc_math]#c0": (["m1", "m2"], ("doc_math",)),
                   "g[doc_qa+doc_mc]#c0": (["w1"], ("doc_qa", "doc_mc")),
                   "h#c0": (["h1"], ALL)}
