"""bench/learning_report.py on a fabricated experiment folder: the before/after table and the
format-health table against numbers worked by hand, and the curves drawn."""
import json

import pytest

from bench import learning_report


def _results(correct: dict[str, tuple[str, int]]) -> dict:
    return {"scoring": "rule reward",
            "questions": [{"id": qid, "type": t, "n": 1, "correct": c} for qid, (t, c) in correct.items()]}


@pytest.fixture
def experiment(tmp_path):
    """4 questions, n = 1: both doc_qa questions wrong before and right after, both doc_math right
    before and after. Two steps: step 1 has 4 questions (1 bad_format), 4 responder answers of
    which 1 unparsed, verifier majorities YES / - / unparsable / NO."""
    out = tmp_path / "exp"
    pair = out / "eval" / "heldout-greedy"
    pair.mkdir(parents=True)
    (pair / "before.json").write_text(json.dumps(_results(
        {"q1": ("doc_qa", 0), "q2": ("doc_qa", 0), "q3": ("doc_math", 1), "q4": ("doc_math", 1)})))
    (pair / "after.json").write_text(json.dumps(_results(
        {"q1": ("doc_qa", 1), "q2": ("doc_qa", 1), "q3": ("doc_math", 1), "q4": ("doc_math", 1)})))
    run = out / "run"
    run.mkdir()
    steps = [{"step": 0, "eval_all_pass@1": 0.25},
             {"step": 1, "questions": 4, "questions_bad_format": 1, "reward_questioner": 0.5,
              "reward_responder": -0.25, "reward_verifier": 1.0, "pass_rate_histogram": [1, 2, 1],
              "trajectories_questioner": 3, "trajectories_responder": 2, "trajectories_verifier": 1,
              "tokens_generated": 4700, "step_time_s": 593.5, "eval_all_pass@1": 0.5},
             {"step": 2, "questions": 8, "questions_bad_format": 0, "reward_questioner": None,
              "reward_responder": 0.0, "reward_verifier": None, "pass_rate_histogram": [0, 0, 2],
              "trajectories_questioner": 0, "trajectories_responder": 0, "trajectories_verifier": 0,
              "tokens_generated": 650}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    questions = [{"step": 1, "responder_answers": ["a", None], "verifier_majorities": [1, None]},
                 {"step": 1, "responder_answers": ["b", "c"], "verifier_majorities": [None, 0]},
                 {"step": 1, "status": "bad_format"},
                 {"step": 2, "responder_answers": ["x", "y"], "verifier_majorities": [1, 1]}]
    (run / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (run / "config.json").write_text(json.dumps({"trainer": {"lr": 5e-06}}))
    commands = [{"command": ["py", "-m", "spell_core.eval", "--data", "d", "--out", str(pair / "before.json")],
                 "seconds": 90.0, "cpu_seconds": 170.5, "peak_rss_gb": 3.1},
                {"command": ["py", "-m", "spell_core.run", "--out", str(run), "--steps", "2"],
                 "seconds": 1230.0, "cpu_seconds": 2400.0, "peak_rss_gb": 11.52}]
    (out / "learning.json").write_text(json.dumps({"settings": {"steps": 2}, "commands": commands}))
    return out


def test_before_after_table_holds_the_hand_worked_changes_and_intervals(experiment):
    text = learning_report.report(experiment)
    # doc_qa: 0 -> 1 on both questions, every bootstrap draw +1
    assert "| heldout | greedy | doc_qa | 2 | pass@1 | 0.000 | 1.000 | +1.000 | [+1.000, +1.000] |" in text
    assert "| heldout | greedy | doc_math | 2 | pass@1 | 1.000 | 1.000 | +0.000 | [+0.000, +0.000] |" in text
    # all: differences 1, 1, 0, 0: mean 0.5; a draw of four is all 0 or all 1 with chance 1/16 > 2.5 %
    assert "| heldout | greedy | all | 4 | pass@1 | 0.500 | 1.000 | +0.500 | [+0.000, +1.000] |" in text
    assert "Conclusion:" in text
    assert "| spell_core.eval heldout-greedy before | 1.5 | 170.5 | 3.1 |" in text
    assert "| spell_core.run run | 20.5 | 2400.0 | 11.52 |" in text
    png = experiment / "learning.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_health_per_step_by_hand(experiment):
    table = learning_report.health_table([("exp", experiment / "run")])
    rows = [line for line in table.splitlines() if line.startswith("| exp ")]
    assert len(rows) == 2  # the step-0 validation line is not a training step
    # step 1: bad_format 1/4; 3 of 4 answers parsed; judged a, b, c: majorities YES, unparsable, NO -> 2/3
    assert rows[0] == ("| exp | 5e-06 | 1 | 0.25 | 0.75 | 0.67 | 4,700 | +0.50 | -0.25 | +1.00 | 3/2/1 | 594 | 0.50 |")
    assert rows[1] == ("| exp | 5e-06 | 2 | 0.00 | 1.00 | 1.00 | 650 | - | +0.00 | - | 0/0/0 | - | - |")


def test_sweep_command_tabulates_every_run_and_a_bad_folder_is_named(experiment, tmp_path, capsys):
    assert learning_report.main(["--sweep", str(experiment), str(experiment / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("| 5e-06 | 1 |") == 2
    assert learning_report.main([str(tmp_path / "nothing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
