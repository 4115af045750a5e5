"""`python -m spell_core.eval` never loses a finished evaluation (issue 15): --out is checked before
the model loads, the results are written atomically (and rescued to a temporary file should the
write fail anyway), and a missing model is a clean error as in `run`."""
import json
import os

import pytest

from spell_core import eval as spell_eval
from spell_core.sampling import sampler
from tests.core.scripted import scripted_generate

LINE = {"context": "The lantern hangs by the door.", "question": "What hangs by the door?", "answer": "lantern",
        "type": "doc_qa"}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(LINE) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from spell_core.models.assets import resolve_model
    from tests.core.scripted import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model"), resolve_model("smollm2-135m-instruct"))


def run(data, model, out, *extra):
    return spell_eval.main(["--data", str(data), "--model", str(model), "--n", "2", "--k", "1", "--device", "cpu",
                            "--no-progress", "--max-new-tokens", "8", "--out", str(out), *extra])


@pytest.fixture
def never_loads(monkeypatch):
    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr("spell_core.models.model.load_pretrained", load_pretrained)


@pytest.mark.parametrize("case", ["a folder", "under a file", "unwritable"])
def test_an_unusable_out_is_refused_before_the_model_loads(data, tmp_path, capsys, never_loads, case):
    (tmp_path / "a-file").write_text("x")
    out = {"a folder": tmp_path, "under a file": tmp_path / "a-file" / "r.json",
           "unwritable": "/sys/spell-issue-15/r.json"}[case]
    assert run(data, "unused", out) == 1
    err = capsys.readouterr().err
    expected = {"a folder": f"--out {out} is a folder: pass a file name for the results",
                "under a file": f"{tmp_path / 'a-file'} is a file, so no folder can be made under it",
                "unwritable": "/sys/spell-issue-15 is not writable"}[case]
    assert "spell.eval: error: " in err and expected in err


def test_a_missing_model_is_a_clean_error(data, tmp_path, capsys):
    assert run(data, tmp_path / "nope", tmp_path / "r.json") == 1
    err = capsys.readouterr().err
    assert f"spell.eval: error: model '{tmp_path / 'nope'}' is neither a known alias" in err and "Traceback" not in err


def test_results_are_written_atomically_and_rescued_when_the_write_fails(data, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sampler, "generate", scripted_generate(lambda *a: "The answer is lantern"))
    out = tmp_path / "r.json"
    assert run(data, model, out) == 0
    assert json.loads(out.read_text())["summary"]["all"]["pass@1"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # the disk fills up after the evaluation: the results go to a temporary file, said so
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert run(data, model, out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert f"spell.eval: error: cannot write {out} (No space left on device); the results were saved to" in err
    (rescued,) = (tmp_path / "rescue").iterdir()
    assert json.loads(rescued.read_text())["summary"]["all"]["pass@1"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
