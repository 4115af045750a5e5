"""`--compare A.json B.json` against hand-worked changes and bootstrap intervals; validation during
training (`run --eval-data`): metrics.jsonl lines at step 0 and every N steps, the printed lines
and the plot panel."""
import json
import re

import pytest

from spell_core.sampling import sampler
from spell_core.evaluation.compare import CompareError, compare, paired_bootstrap
from spell_core.eval import main as eval_main


def results(counts, n=4):
    """A result file's content: counts = [(id, type, correct), ...]."""
    return {"scoring": "rule reward",
            "questions": [{"id": qid, "type": t, "n": n, "correct": c} for qid, t, c in counts]}


A = results([("q1", "doc_qa", 1), ("q2", "doc_qa", 3), ("q3", "doc_mc", 0)])
B = results([("q1", "doc_qa", 3), ("q2", "doc_qa", 3), ("q3", "doc_mc", 2)])


def test_changes_and_intervals_worked_by_hand():
    out = compare(A, B)
    assert out["ks"] == [1, 2, 4]
    qa, mc, every = out["groups"]["doc_qa"], out["groups"]["doc_mc"], out["groups"]["all"]
    # pass@1 = c/4: doc_qa A (0.25 + 0.75)/2, B (0.75 + 0.75)/2; per-question changes 0.5 and 0
    assert (qa["pass@1"]["a"], qa["pass@1"]["b"], qa["pass@1"]["delta"]) == pytest.approx((0.5, 0.75, 0.25))
    # resampling two questions with changes {0.5, 0}: means 0, 0.25, 0.5 with chances 1/4, 1/2, 1/4,
    # so the 2.5th percentile is 0 and the 97.5th is 0.5
    assert (qa["pass@1"]["low"], qa["pass@1"]["high"]) == pytest.approx((0.0, 0.5))
    # one question: no spread at all
    assert (mc["pass@1"]["delta"], mc["pass@1"]["low"], mc["pass@1"]["high"]) == pytest.approx((0.5, 0.5, 0.5))
    # pass@4 with n = 4: 1 if any sample is correct
    assert mc["pass@4"]["delta"] == 1 and qa["pass@4"]["delta"] == 0
    # pass@2 of q1 in A: 1 - C(3,2)/C(4,2) = 1/2, in B: 1 - C(1,2)/C(4,2) = 1
    assert qa["pass@2"]["delta"] == pytest.approx((0.5 + 0.0) / 2)
    assert every["questions"] == 3 and every["pass@1"]["delta"] == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_a_with_n_4_against_b_with_n_8_worked_by_hand():
    """pass@k of each question from its own (n, correct): A samples 4 per question, B 8; the ks
    are those both files can report (1, 2, 4)."""
    a = results([("q1", "doc_qa", 1), ("q2", "doc_qa", 3), ("q3", "doc_mc", 0)], n=4)
    b = results([("q1", "doc_qa", 6), ("q2", "doc_qa", 2), ("q3", "doc_mc", 8)], n=8)
    out = compare(a, b)
    assert out["ks"] == [1, 2, 4]
    qa, mc, every = out["groups"]["doc_qa"], out["groups"]["doc_mc"], out["groups"]["all"]
    # pass@1 = c/n: A 1/4 and 3/4, B 6/8 and 2/8: both means 1/2, per-question changes +1/2 and -1/2;
    # resampling two changes gives means -1/2, 0, +1/2 with chances 1/4, 1/2, 1/4
    assert (qa["pass@1"]["a"], qa["pass@1"]["b"], qa["pass@1"]["delta"]) == pytest.approx((0.5, 0.5, 0.0))
    assert (qa["pass@1"]["low"], qa["pass@1"]["high"]) == pytest.approx((-0.5, 0.5))
    # pass@2 = 1 - C(n-c, 2)/C(n, 2): A 1 - 3/6 = 1/2 and 1 - 0/6 = 1; B 1 - 1/28 = 27/28 and 1 - 15/28 = 13/28
    assert qa["pass@2"]["a"] == pytest.approx(3 / 4) and qa["pass@2"]["b"] == pytest.approx(20 / 28)
    assert qa["pass@2"]["delta"] == pytest.approx(20 / 28 - 3 / 4)  # -1/28
    # pass@4 = 1 - C(n-c, 4)/C(n, 4): A 1 and 1; B 1 - 0/70 = 1 and 1 - 15/70 = 11/14
    assert (qa["pass@4"]["a"], qa["pass@4"]["b"]) == pytest.approx((1.0, (1 + 11 / 14) / 2))
    # q3: none of 4 right, then all 8: every pass@k from 0 to 1
    assert [mc[f"pass@{k}"]["delta"] for k in (1, 2, 4)] == pytest.approx([1.0, 1.0, 1.0])
    assert every["pass@1"]["delta"] == pytest.approx((0.5 - 0.5 + 1.0) / 3)
    assert every["pass@4"]["delta"] == pytest.approx((0 + (11 / 14 - 1) + 1) / 3)


def test_a_question_id_twice_in_one_file_is_named():
    twice = results([("q1", "doc_qa", 1), ("q2", "doc_qa", 3), ("q1", "doc_qa", 2)])
    with pytest.raises(CompareError, match="question id q1 appears more than once in A"):
        compare(twice, results([("q1", "doc_qa", 1), ("q2", "doc_qa", 3)]))
    with pytest.raises(CompareError, match="question id q1 appears more than once in after"):
        compare(A, results([("q1", "doc_qa", 1), ("q2", "doc_qa", 3), ("q3", "doc_mc", 0), ("q1", "doc_qa", 2)]),
                names=("before", "after"))


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_questions():
    rng = __import__("numpy").random.default_rng(1)
    a = rng.random(400)
    b = a + 0.1 + 0.05 * rng.standard_normal(400)
    delta, low, high = paired_bootstrap(a, b)
    assert low < delta < high and low > 0.09 and high < 0.11  # paired: the spread of a cancels
    _, low4, high4 = paired_bootstrap(a[:4], b[:4])
    assert high4 - low4 > high - low


def test_different_questions_are_a_clear_error():
    with pytest.raises(CompareError, match=r"1 only in A \(e.g. q3\)"):
        compare(A, results([("q1", "doc_qa", 3), ("q2", "doc_qa", 3)]))
    with pytest.raises(CompareError, match="q3 is doc_mc in A but doc_qa in B"):
        compare(A, results([("q1", "doc_qa", 3), ("q2", "doc_qa", 3), ("q3", "doc_qa", 2)]))


def test_compare_command_prints_the_table_and_draws(tmp_path, capsys):
    (tmp_path / "before.json").write_text(json.dumps(A))
    (tmp_path / "after.json").write_text(json.dumps(B))
    png = tmp_path / "cmp.png"
    assert eval_main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json"), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^doc_qa\s+2\s+pass@1\s+0\.500\s+0\.750\s+\+0\.250\s+\[\+0\.000, \+0\.500\]$", out, re.M)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eval_main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "none.json")]) == 1
    assert "none.json: no such file" in capsys.readouterr().err


# --- validation during training ------------------------------------------------------------------

def test_run_evaluates_at_step_zero_and_every_n_steps(tmp_path, monkeypatch, capsys):
    from spell_core.models.assets import resolve_model
    from spell_core.run import main as run_main
    from tests.core.scripted import make_tiny_corpus, make_tiny_model, random_play, scripted_generate

    model = make_tiny_model(tmp_path / "model", resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path / "corpus")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"context": "The lantern hangs by the door.", "question": "What hangs there?",
                                "answer": "lantern", "type": "doc_qa"}) + "\n"
                    + json.dumps({"context": "Two doors.", "question": "How many doors?", "answer": 2,
                                  "type": "doc_math"}) + "\n")

    def script(role, text, i, j, rng):
        # an evaluation prompt (the responder's template, so told apart by its question): QA always
        # right, math right for the first sample only
        if "Question: What hangs there?" in text or "Question: How many doors?" in text:
            return "The answer is lantern" if "What hangs" in text else f"Therefore, the answer is {2 + j}"
        return random_play(role, text, i, j, rng)

    monkeypatch.setattr(sampler, "generate", scripted_generate(script))
    out = tmp_path / "run"
    assert run_main(["--model", str(model), "--corpus", str(corpus), "--out", str(out), "--ctx", "2k",
                     "--device", "cpu", "--questions", "2", "--group-size", "2", "--max-new-tokens", "32",
                     "--no-progress", "--steps", "2", "--eval-data", str(data), "--eval-every", "2",
                     "--eval-n", "2"]) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert "eval_doc_qa_pass@1" not in lines[1]
    for m in (lines[0], lines[2]):
        # QA 2 of 2 right; math 1 of 2: pass@1 1/2, pass@2 1
        assert (m["eval_doc_qa_pass@1"], m["eval_doc_math_pass@1"], m["eval_doc_math_pass@2"]) == (1.0, 0.5, 1.0)
        assert m["eval_all_pass@1"] == 0.75
    assert re.search(r"^eval step 0 \| doc_qa pass@1 1\.000 pass@2 1\.000 \| doc_math pass@1 0\.500", printed, re.M)
    assert re.search(r"^eval step 2 \|", printed, re.M) and not re.search(r"^eval step 1 ", printed, re.M)
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_run_with_unreadable_eval_data_stops_before_loading_anything(tmp_path, capsys):
    from spell_core.run import main as run_main

    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"prompt": "q"}) + "\n")
    assert run_main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--steps", "1", "--no-progress", "--eval-data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spell: error:" in err and "match no known format" in err and "longbench-v2" in err
