"""Issue 26, the second round of bad inputs: each case as reported ends before any model loads
(a stand-in `load_pretrained` fails the test if one does), with a message naming the file, field
or option and what to do; no output replaces an input or, without --overwrite, an earlier result.
The same checks for every `--out` and late-validated option of run, eval, eval --compare, plan."""
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spell_core.sampling import sampler
from spell_core.evaluation.benchmarks import load_eval_data
from spell_core.evaluation.harness import item_rule_reward
from spell_core.eval import main as eval_main
from spell_core.plan import main as plan_main
from spell_core.run import main as run_main
from tests.core.scripted import scripted_generate
from tests.core.test_eval_compare import A, B, results
from tests.core.test_eval_failures import LINE, model  # noqa: F401
from tests.core.test_eval_failures import run as eval_run
from tests.core.test_run import argv, assets  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def never_loads(monkeypatch):
    def load_pretrained(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr("spell_core.models.model.load_pretrained", load_pretrained)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(LINE) + "\n")
    return path


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


# --- eval: the results never replace the questions, nor an earlier result --------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_eval_out_equal_to_the_data_file_is_refused_even_with_overwrite(data, tmp_path, capsys, never_loads,
                                                                        spelling):
    before = data.read_bytes()
    out = {"same": data, "dotted": tmp_path / "." / "q.jsonl", "symlink": tmp_path / "link.jsonl"}[spelling]
    if spelling == "symlink":
        out.symlink_to(data)
    for extra in ((), ("--overwrite",)):
        assert eval_run(data, "unused", out, *extra) == 1
        assert (f"spell.eval: error: --out {out} is the --data file: writing the results there would destroy it; "
                "pass another --out") in capsys.readouterr().err
    assert data.read_bytes() == before


def test_an_earlier_result_is_kept_unless_overwrite(data, model, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    earlier = write_json(tmp_path / "q.eval.json", {"before": "training"})  # the default name for q.jsonl
    argv_ = ["--data", str(data), "--model", str(model), "--n", "2", "--k", "1", "--device", "cpu", "--no-progress",
             "--max-new-tokens", "8"]
    assert eval_main(argv_) == 1
    assert ("spell.eval: error: --out q.eval.json already exists (an earlier result?): pass --overwrite to replace "
            "it, or another --out") in capsys.readouterr().err
    assert json.loads(earlier.read_text()) == {"before": "training"}
    monkeypatch.setattr(sampler, "generate", scripted_generate(lambda *a: "The answer is lantern"))
    assert eval_main([*argv_, "--overwrite"]) == 0
    assert json.loads(earlier.read_text())["summary"]["all"]["pass@1"] == 1


# --- eval --compare ---------------------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    return write_json(tmp_path / "a.json", A), write_json(tmp_path / "b.json", B)


def test_compare_out_equal_to_an_input_is_refused(pair, capsys):
    a, b = pair
    before = a.read_bytes()
    assert eval_main(["--compare", str(a), str(b), "--out", str(a), "--overwrite"]) == 1
    captured = capsys.readouterr()
    assert (f"spell.eval: error: --out {a} is the --compare A.json file: writing the plot there would destroy it; "
            "pass another --out") in captured.err
    assert a.read_bytes() == before and "pass@1" not in captured.out


def test_compare_keeps_an_earlier_plot_unless_overwrite(pair, tmp_path, capsys):
    a, b = pair
    png = tmp_path / "compare.png"
    png.write_bytes(b"an earlier plot")
    assert eval_main(["--compare", str(a), str(b), "--out", str(png)]) == 1
    assert (f"--out {png} already exists (an earlier result?): pass --overwrite to replace it"
            in capsys.readouterr().err)
    assert png.read_bytes() == b"an earlier plot"
    assert eval_main(["--compare", str(a), str(b), "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_compare_names_the_file_and_question_whose_correct_exceeds_n(pair, tmp_path, capsys):
    a, _ = pair
    b = write_json(tmp_path / "edited.json", results([("q1", "doc_qa", 3), ("q2", "doc_qa", 5),
                                                       ("q3", "doc_mc", 2)]))
    assert eval_main(["--compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert (f"spell.eval: error: {b}: question q2 has n=4 samples and correct=5; it needs whole numbers with "
            "0 <= correct <= n >= 1") in err and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_compare_out_in_a_missing_folder_is_made_and_an_unusable_one_refused_before_the_table(pair, tmp_path,
                                                                                              capsys):
    a, b = pair
    out = tmp_path / "missing-dir" / "cmp.png"  # made, as eval's --out makes its folder
    assert eval_main(["--compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "cmp.png"
    assert eval_main(["--compare", str(a), str(b), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"--out {out}: {tmp_path / 'a-file'} is a file, so no folder can be made under it" in captured.err
    assert "pass@1" not in captured.out  # refused before the table is printed


# --- eval data: a doc_math reference that no answer could match -------------------------------------

DOCMATH = {"question_id": "dm-1", "question": "What is the total?", "paragraphs": ["Revenue was 40, costs 2."],
           "tables": [], "ground_truth": "about forty-two"}


@pytest.mark.parametrize("fmt", ["docmath", "spell"])
def test_a_doc_math_reference_that_is_not_a_number_is_refused(tmp_path, capsys, never_loads, fmt):
    record = DOCMATH if fmt == "docmath" else {**LINE, "type": "doc_math", "answer": "about forty-two"}
    field = "ground_truth" if fmt == "docmath" else "answer"
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert eval_run(path, "unused", tmp_path / "r.json") == 1
    assert (f"spell.eval: error: {path}:1: '{field}' of a doc_math question must be a number (e.g. 42 or \"3.75\"), "
            "got 'about forty-two': no answer could ever be scored right") in capsys.readouterr().err


def test_a_doc_math_reference_written_with_units_is_still_accepted_and_scorable(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({**DOCMATH, "ground_truth": "$1,234.5"}) + "\n")
    (item,) = load_eval_data(path)
    assert item_rule_reward(item, "1234.5") == 1.0 and item_rule_reward(item, "1250") == 0.0  # 1.3 % off: beyond 0.15 %


# --- run: corpus, fields and --tasks before the model loads -------------------------------------------

def parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("case", ["no text column", "--text-field missing", "empty paragraphs", "bad jsonl line"])
def test_corpus_and_field_errors_come_before_the_model_loads(assets, tmp_path, capsys, never_loads, case):  # noqa: F811
    extra = ()
    if case == "no text column":
        corpus = parquet(tmp_path / "t.parquet", {"body": ["A lantern hangs by the door."]})
        expected = f"{corpus}: no column 'text' (columns: body); name the text column with --text-field"
    elif case == "--text-field missing":
        corpus = tmp_path / "t.jsonl"
        corpus.write_text(json.dumps({"text": "A lantern hangs by the door."}) + "\n")
        extra = ("--text-field", "content")
        expected = f"{corpus}: no column 'content' (columns: text); name the text column with --text-field"
    elif case == "empty paragraphs":
        corpus = parquet(tmp_path / "t.parquet", {"question_id": ["q1"], "paragraphs": [[]],
                                                   "data_source": ["docmath"]})
        expected = f"{corpus}:0: 'paragraphs' holds no non-empty document"
    else:
        corpus = tmp_path / "t.jsonl"
        corpus.write_text(json.dumps({"text": "A lantern."}) + "\n{oops\n")
        expected = f"{corpus}:2: not valid JSON"
    out = tmp_path / "run"
    assert run_main(argv((assets[0], corpus), out, "--steps", "1", *extra)) == 1
    assert f"spell: error: {expected}" in capsys.readouterr().err
    assert not out.exists()  # nothing written, no folder made


def test_resume_with_nothing_to_resume_stops_before_the_model_and_writes_nothing(assets, tmp_path, capsys,  # noqa: F811
                                                                                 never_loads):
    out = tmp_path / "run"
    out.mkdir()
    assert run_main(argv(assets, out, "--resume")) == 1
    assert (f"spell: error: --resume: no complete checkpoint in {out}; start it again (without --resume), or pass "
            "a checkpoint folder: --resume PATH") in capsys.readouterr().err
    assert list(out.iterdir()) == []  # no config.json, no lock file
    missing = tmp_path / "nowhere"
    assert run_main(argv(assets, out, "--resume", str(missing))) == 1
    assert (f"spell: error: --resume {missing}: {missing} does not exist; pass a run's --out folder or one of its "
            "checkpoints/step-NNNNNN folders") in capsys.readouterr().err
    assert list(out.iterdir()) == [] and not missing.exists()


def test_a_tasks_prefix_of_a_table_file_path_applies_to_its_rows(assets, tmp_path, capsys):  # noqa: F811
    corpus = parquet(tmp_path / "fin.parquet", {"text": ["Revenue was 40 dollars and costs were 2 dollars."] * 3,
                                                 "cluster": ["a", "a", "b"]})
    prefix = str(tmp_path / "fin")  # the rows carry no data_source: their source name is the file's path
    assert run_main(argv((assets[0], corpus), tmp_path / "run", "--steps", "0", "--tasks",
                         f"{prefix}=doc_math")) == 0
    assert "task types  doc_math: 2 clusters\n" in capsys.readouterr().out


def test_a_tasks_prefix_that_matches_no_document_is_an_error(assets, tmp_path, capsys, never_loads):  # noqa: F811
    out = tmp_path / "run"
    assert run_main(argv(assets, out, "--steps", "1", "--tasks", "nowhere=doc_math")) == 1
    assert ("spell: error: --tasks nowhere=doc_math: no document's source name starts with 'nowhere'; the corpus's "
            "source names are 'notes', 'play' (the field data_source, else the file path without its suffix)"
            in capsys.readouterr().err)
    assert not out.exists()


# --- run, eval, plan: options the parser refuses ------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--clip-low", "-1", "argument --clip-low: must be in [0, 1), got -1: the ratio is clipped to "
                         "[1 - clip-low, 1 + clip-high]"),
    ("--clip-low", "1", "argument --clip-low: must be in [0, 1), got 1"),
    ("--clip-high", "-0.1", "argument --clip-high: must be in [0, inf), got -0.1"),
    ("--dual-clip", "nan", "argument --dual-clip: must be a finite number, got 'nan'"),
    ("--dual-clip", "0.5", "argument --dual-clip: must be > 1, or 0 for off, got 0.5"),
    ("--dist-timeout", "0", "argument --dist-timeout: must be in (0, inf), got 0"),
])
def test_run_options_refused_by_the_parser(assets, tmp_path, capsys, never_loads, option, value, message):  # noqa: F811
    with pytest.raises(SystemExit) as info:
        run_main(argv(assets, tmp_path / "run", option, value))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "argument --temperature: must be in [0, inf), got -1: 0 samples greedily"),
    ("--top-p", "0", "argument --top-p: must be in (0, 1], got 0: 1 keeps every token"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be at least 1, got 0"),
    ("--verifier-samples", "0", "argument --verifier-samples: must be at least 1, got 0"),
    ("--device", "gpu", "argument --device: device 'gpu' is not understood: use auto, cpu, cuda or cuda:N"),
])
def test_eval_options_refused_by_the_parser(data, tmp_path, capsys, never_loads, option, value, message):
    with pytest.raises(SystemExit) as info:
        eval_run(data, "unused", tmp_path / "r.json", option, value)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_eval_names_a_missing_judge_model_before_loading_the_model(data, tmp_path, capsys, never_loads):
    from spell_core.models.assets import resolve_model

    resolve_model("smollm2-135m-instruct")  # the cached alias: resolving it loads nothing
    judge = tmp_path / "no-judge"
    assert eval_run(data, "smollm2-135m-instruct", tmp_path / "r.json", "--judge-model", str(judge)) == 1
    assert f"spell.eval: error: --judge-model: model '{judge}' is neither a known alias" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--gpu-memory", "80XB", "argument --gpu-memory: memory size '80XB': use a number with a unit, e.g. 80GB or "
                             "141GiB"),
    ("--gpu-memory", "0GB", "argument --gpu-memory: memory size '0GB' must be more than zero"),
    ("--ctx", "-5", "argument --ctx: context length '-5' is not understood: write a whole number of tokens"),
    ("--gpus", "0", "argument --gpus: must be at least 1, got 0"),
    ("--group-size", "-2", "argument --group-size: must be at least 1, got -2"),
])
def test_plan_options_refused_with_their_message(capsys, option, value, message):
    args = {"--model": "smollm2-135m-instruct", "--ctx": "16k", option: value}
    with pytest.raises(SystemExit) as info:
        plan_main([text for pair in args.items() for text in pair])
    assert info.value.code == 2 and message in capsys.readouterr().err


# --- run: --out apart from the inputs -----------------------------------------------------------------

@pytest.mark.parametrize("case", ["the corpus", "inside the corpus", "holding the model"])
def test_a_run_folder_that_overlaps_an_input_is_refused(assets, tmp_path, capsys, never_loads, case):  # noqa: F811
    model = shutil.copytree(assets[0], tmp_path / "models" / "m")  # copies: today's code would write in them
    corpus = shutil.copytree(assets[1], tmp_path / "corpus")
    out = {"the corpus": corpus, "inside the corpus": corpus / "run", "holding the model": model.parent}[case]
    before = sorted(p.name for p in corpus.iterdir())
    for extra in ((), ("--overwrite",)):
        assert run_main(argv((model, corpus), out, "--steps", "1", *extra)) == 1
        relation = {"the corpus": f"is the --corpus {corpus}",
                    "inside the corpus": f"lies inside the --corpus {corpus} (the run's .jsonl logs would be read as "
                                         "documents by the next run)",
                    "holding the model": f"holds the --model {model} (--overwrite would move it aside with the old "
                                         "run)"}[case]
        assert (f"spell: error: --out {out} {relation}: a run folder must be apart from its inputs; pick an --out "
                "outside them") in capsys.readouterr().err
    assert sorted(p.name for p in corpus.iterdir()) == before and model.is_dir()
