"""Table corpora: SPELL's released parquet layout (one row = one cluster, data_source carried by
the cluster), parquet / JSON Lines with named columns, folders saved by datasets' save_to_disk,
texts kept on disk (and split there), bad tables, and `--corpus` on the command line."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spell_core.models.assets import resolve_model
from spell_core.data.corpus_tables import StoredText, load_corpus
from spell_core.data.documents import CorpusError, Document, build_clusters
from spell_core.data.task_types import TaskRules

DOCMATH = {"question_id": "dm-17", "data_source": "docmath_compshort",
           "paragraphs": ["Revenue in 2021 was 4.2 million dollars.", "Costs in 2021 were 3.1 million dollars."]}
WEB = {"question_id": "uf-3", "data_source": "ultrafineweb_en",
       "paragraphs": ["The lighthouse was built in 1871.", "", "Its lamp was electrified in 1932.",
                      "It was automated in 1980."]}
RELEASE_SCHEMA = pa.schema([("question_id", pa.string()), ("paragraphs", pa.list_(pa.string())),
                            ("data_source", pa.string())])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def write_release(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=RELEASE_SCHEMA), path)
    return path


def test_release_layout_rows_are_clusters_that_carry_their_data_source(tmp_path, tokenizer):
    first = write_release(tmp_path / "train-0.parquet", [DOCMATH])
    second = write_release(tmp_path / "train-1.parquet", [WEB])
    documents = load_corpus([str(first), str(second)])
    assert [d.text for d in documents] == DOCMATH["paragraphs"] + [p for p in WEB["paragraphs"] if p]
    assert [d.data_source for d in documents] == ["docmath_compshort"] * 2 + ["ultrafineweb_en"] * 3
    TaskRules.parse([]).apply(documents)  # the default mapping: docmath -> math, ultrafineweb -> QA + MC
    clusters = build_clusters(documents, tokenizer, 10_000)
    assert [(c.source, c.tasks, len(c.documents)) for c in clusters] == [
        ("docmath_compshort", ("doc_math",), 2), ("ultrafineweb_en", ("doc_qa", "doc_mc"), 3)]
    assert clusters[0].id == "docmath_compshort/dm-17#c0"
    tags = len(tokenizer.encode("\n</document>\n\n<document>\n", add_special_tokens=False))  # between two documents
    assert clusters[1].n_tokens == sum(len(tokenizer.encode(p, add_special_tokens=False)) + tags
                                       for p in WEB["paragraphs"] if p)
    documents = TaskRules.parse(["docmath=doc_qa"]).apply(load_corpus([str(first)]))  # overrides the default
    assert build_clusters(documents, tokenizer, 10_000)[0].tasks == ("doc_qa",)


def test_named_columns_in_parquet_jsonl_and_a_saved_dataset_give_the_same_documents(tmp_path):
    rows = [{"body": f"Document number {i} says {i * i}.", "topic": f"t{i % 3}", "data_source": "mine"}
            for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=3)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    kinds = [load_corpus(str(tmp_path / name), text_field="body", cluster_field="topic", batch_rows=2)
             for name in ("c.parquet", "c.jsonl", "saved")]
    for documents in kinds:
        assert [d.text for d in documents] == [r["body"] for r in rows]
        assert [d.group for d in documents] == [r["topic"] for r in rows]
        assert {d.data_source for d in documents} == {"mine"}
        assert all(isinstance(d.__dict__["_text"], StoredText) for d in documents)  # kept on disk
    assert [d.id for d in kinds[0]] == [f"c/{i}" for i in range(7)]  # rows of c.parquet
    assert [d.id for d in kinds[1]] == [f"c/{i}" for i in range(1, 8)]  # lines of c.jsonl


def test_stored_documents_split_like_in_memory_ones(tmp_path, tokenizer):
    text = "\n\n".join(f"Paragraph {i}: " + "the river runs past the mill and the bridge. " * 6 for i in range(12))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "é" + text}) + "\n")
    stored = build_clusters(load_corpus(str(tmp_path / "long.jsonl")), tokenizer, 200)
    plain = build_clusters([Document("long/1", "é" + text, "s", group="long")], tokenizer, 200)
    assert len(stored) > 1
    assert [[(d.id, d.text, d.n_tokens) for d in c.documents] for c in stored] == \
           [[(d.id, d.text, d.n_tokens) for d in c.documents] for c in plain]
    assert isinstance(stored[0].documents[0].__dict__["_text"], StoredText)


def test_bad_tables_are_clear_errors(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"content": "x"}]), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: content\); name the text column with --text-field"):
        load_corpus(str(tmp_path / "a.parquet"))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(CorpusError, match=re.escape(f"{tmp_path / 'b.jsonl'}:2: 'text' must be a non-empty string")):
        load_corpus(str(tmp_path / "b.jsonl"))
    bad = dict(WEB, paragraphs=None)
    write_release(tmp_path / "r.parquet", [bad])
    with pytest.raises(CorpusError, match="'paragraphs' must be a list of strings"):
        load_corpus(str(tmp_path / "r.parquet"))
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=re.escape(f"--corpus {tmp_path / 'dd' / 'train'}")):
        load_corpus(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match="is not a table"):
        load_corpus([str(tmp_path / "a.parquet"), str(tmp_path)])
    with pytest.raises(CorpusError, match=re.escape(f"corpus file {tmp_path / 'nope.parquet'} does not exist")):
        load_corpus(str(tmp_path / "nope.parquet"))


def test_cli_clusters_the_release_parquet_files(tmp_path, capsys):
    from spell_core.run import main
    from tests.core.scripted import make_tiny_model

    model = make_tiny_model(tmp_path / "model", resolve_model("smollm2-135m-instruct"))
    files = [str(write_release(tmp_path / "d.parquet", [DOCMATH])), str(write_release(tmp_path / "w.parquet", [WEB]))]
    assert main(["--model", str(model), "--corpus", *files, "--out", str(tmp_path / "run"), "--ctx", "6k",
                 "--device", "cpu", "--steps", "0"]) == 0
    output = capsys.readouterr().out
    assert re.search(r"^documents\s+5 from 2 works", output, re.M)
    assert re.search(r"^clusters\s+2,", output, re.M)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["corpus"] == files
