"""`python -m spell_core.eval`: the pass@k estimator against hand-worked values and a brute
force count over all k-subsets, malformed data lines, and a whole evaluation on a tiny
random model whose answers are scripted (tests/core/scripted.py)."""
import itertools
import json
import re
from fractions import Fraction

import pytest

from spell_core.sampling import sampler
from spell_core.eval import EvalDataError, load_eval_data, main, pass_at_k
from tests.core.scripted import make_tiny_model, scripted_generate


@pytest.mark.parametrize("n, c, k, expected", [
    (8, 2, 4, Fraction(11, 14)),  # 1 - C(6,4)/C(8,4) = 1 - 15/70
    (8, 1, 1, Fraction(1, 8)),
    (5, 2, 2, Fraction(7, 10)),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (8, 0, 8, 0),
    (8, 8, 1, 1),
    (8, 7, 2, 1),  # n - c < k: every pair holds a correct sample
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-15)


def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="pass@9 needs 1 <= k <= n = 8"):
        pass_at_k(8, 1, 9)


GOOD = {"context": "The lantern hangs by the door.", "question": "What hangs by the door?", "answer": "lantern",
        "type": "doc_qa"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"context": "c", "question": "q", "type": "doc_qa"}), "missing field(s) answer"),
    (json.dumps({**GOOD, "type": "doc_xx"}), "type 'doc_xx' is not one of doc_qa, doc_math, doc_mc"),
    (json.dumps({**GOOD, "question": " "}), "'question' must be a non-empty string"),
    (json.dumps({**GOOD, "answer": None}), "'answer' must be a non-empty string or a number"),
    (json.dumps({**GOOD, "context": []}), "'context' must be a non-empty string or a list"),
    (json.dumps({**GOOD, "type": "doc_mc", "answer": "E"}), "a doc_mc answer must be a letter A-D, got 'E'"),
    (json.dumps({**GOOD, "type": "doc_mc", "answer": "A", "options": {"A": "x", "B": "y"}}),
     "'options' must map exactly A, B, C, D"),
    (json.dumps({**GOOD, "options": {"A": "x"}}), "'options' is only allowed for doc_mc"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(EvalDataError) as info:
        load_eval_data(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_bom_crlf_and_bad_bytes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    assert [item.where for item in load_eval_data(path)] == [f"{path}:1", f"{path}:3"]
    path.write_bytes(json.dumps({**GOOD, "answer": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    offset = json.dumps({**GOOD, "answer": "caf"}).index('caf"') + 3  # where the latin-1 e-acute byte sits
    with pytest.raises(EvalDataError, match=rf"data.jsonl: byte offset {offset} \(0xe9\) is not valid UTF-8"):
        load_eval_data(path)


def test_missing_and_empty_files(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "none.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalDataError, match="no questions"):
        load_eval_data(tmp_path / "empty.jsonl")


def test_options_as_list_and_inside_the_question(tmp_path):
    path = tmp_path / "mc.jsonl"
    lines = [{**GOOD, "type": "doc_mc", "answer": "(b)", "options": ["w", "x", "y", "z"]},
             {**GOOD, "type": "doc_mc", "answer": "C", "question": "Which? A. w B. x C. y D. z"}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    first, second = load_eval_data(path)
    assert first.task.options == {"A": "w", "B": "x", "C": "y", "D": "z"} and first.task.answer == "B"
    assert second.task.options is None and second.task.answer == "C"


# question -> how many of the 4 samples answer correctly (sample j is right when j < count)
RIGHT = {"What hangs by the door?": 2, "How many doors are there?": 0, "Which is the lantern?": 4}


def answers(role, text, i, j, rng):
    if role == "verifier":  # says YES to everything: lifts every parsable answer to correct
        return "Fine. [[YES]]"
    question = re.search(r"Question: (.*)", text).group(1).strip()
    right = j < RIGHT[question]
    if question.startswith("What"):
        return f"The answer is {'the lantern' if right else 'a candle'}."
    if question.startswith("How"):
        return "The answer is 3" if j else "No idea."  # 3 is wrong; sample 0 is unparsable
    return f"The answer is {'B' if right else 'A'}"


def test_evaluation_table_and_json(tmp_path, monkeypatch, capsys):
    from spell_core.models.assets import resolve_model

    model = make_tiny_model(tmp_path / "model", resolve_model("smollm2-135m-instruct"))
    data = tmp_path / "questions.jsonl"
    lines = [GOOD, {"context": ["Door one.", "Door two."], "question": "How many doors are there?", "answer": 2,
                    "type": "doc_math"},
             {**GOOD, "type": "doc_mc", "question": "Which is the lantern?", "answer": "B",
              "options": {"A": "candle", "B": "lantern", "C": "torch", "D": "lamp"}}]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    monkeypatch.setattr(sampler, "generate", scripted_generate(answers))
    out = tmp_path / "result.json"
    assert main(["--data", str(data), "--model", str(model), "--n", "4", "--k", "1,2", "--device", "cpu",
                 "--out", str(out), "--no-progress", "--max-new-tokens", "16"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["doc_qa"]["pass@1"] == pytest.approx(2 / 4)
    assert summary["doc_qa"]["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert summary["doc_math"]["pass@2"] == 0 and summary["doc_mc"]["pass@1"] == 1
    assert summary["all"]["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    # columns: mean@4, best@1, best@2 (bootstrap), pass@1, pass@2
    assert re.search(r"^doc_qa\s+1\s+0\.500\s+\S+\s+\S+\s+0\.500\s+0\.833$", table, re.M)
    assert [q["where"] for q in result["questions"]] == [f"{data}:1", f"{data}:2", f"{data}:3"]

    # the verifier's YES majority counts an answer correct (max(rule, majority)); unparsable stays wrong
    assert main(["--data", str(data), "--model", str(model), "--n", "4", "--k", "1", "--device", "cpu",
                 "--out", str(out), "--no-progress", "--max-new-tokens", "16", "--verifier",
                 "--verifier-samples", "3", "--overwrite"]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["doc_qa"]["pass@1"] == 1 and summary["doc_math"]["pass@1"] == pytest.approx(3 / 4)


def test_k_above_n_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data", str(tmp_path / "x.jsonl"), "--n", "4", "--k", "1,8"])
    assert info.value.code == 2 and "every k must be between 1 and n" in capsys.readouterr().err
