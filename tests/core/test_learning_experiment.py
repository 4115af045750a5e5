"""bench/learning.py: the plan and its budget by hand, the folder rule, and one experiment end to end
on a tiny random model (evaluate, 1 self-play step with validation, evaluate the checkpoint,
--compare, the report)."""
import json
from pathlib import Path

import pytest

from bench import learning, learning_report
from tests.core.scripted import make_tiny_corpus, make_tiny_model


def _args(**kw):
    args = learning.build_parser().parse_args(["--out", "x"])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_estimate_by_hand_and_the_budget_refuses_naming_the_steps_that_fit(tmp_path, capsys):
    args = _args(steps=10, eval_n=4, val_every=2, val_n=1, questions=None, step_minutes=8.3)
    # 10 questions x 2 modes (greedy, sampled: its 4 samples share a prefill), before and after,
    # 15 s each: 10 min; 6 validations (steps 0, 2, .., 10) x 10 questions x 15 s: 15 min;
    # 10 steps x 8.3 min: 83 min
    plan = learning.estimate_minutes(args, 10, 10, 10, 15.0)
    assert plan == pytest.approx({"evaluations": 10.0, "validations": 15.0, "steps": 83.0, "total": 108.0})
    # 60 min: 10 + 8.3 k + 2.5 (k // 2 + 1) <= 60: k = 4 gives 50.7, k = 5 gives 59.0, k = 6 gives 69.8
    assert learning.steps_that_fit(args, 10, 10, 15.0, 60.0) == 5
    heldout = tmp_path / "h.jsonl"
    heldout.write_text("".join(json.dumps({"id": f"q{i}", "type": "doc_qa", "context": "c", "question": "q",
                                           "answer": "a"}) + "\n" for i in range(10)))
    code = learning.main(["--out", str(tmp_path / "exp"), "--heldout", str(heldout), "--budget-minutes", "60",
                          "--eval-seconds-per-question", "15", "--step-minutes", "8.3", "--dry-run"])
    assert code == 1 and "--steps 5 fits" in capsys.readouterr().err
    # a subset is planned at its size: 4 questions x 2 modes x 2 x 15 s = 4 min; 2 validation questions
    # x 6 validations x 15 s = 3 min; 10 x 8.3 = 83 min
    code = learning.main(["--out", str(tmp_path / "exp"), "--heldout", str(heldout), "--eval-items", "4",
                          "--val-items", "2", "--eval-seconds-per-question", "15", "--step-minutes", "8.3", "--dry-run"])
    assert code == 0 and "estimated 90 min (4 evaluation, 3 validation, 83 steps)" in capsys.readouterr().out


def test_balanced_subset_takes_the_types_in_turn_spread_over_each_type():
    lines = [json.dumps({"id": i, "type": t}) for i, t in enumerate("qqqmmc")]
    chosen = [json.loads(line)["id"] for line in learning.balanced_subset(lines, 4)]
    # quotas q 2, m 1, c 1; q's two picks at 1/4 and 3/4 of its three items (0, 2), m's one at the
    # middle of two (4); then in turn: q, m, c, q
    assert chosen == [0, 4, 5, 2]
    # two rules of one type are two kinds
    lines = [json.dumps({"id": i, "type": t, "rule": r}) for i, (t, r) in enumerate(
        [("qa", "copy"), ("qa", "copy"), ("qa", "speaker"), ("math", "count"), ("qa", "speaker")])]
    chosen = [json.loads(line)["id"] for line in learning.balanced_subset(lines, 4)]
    assert chosen == [0, 4, 3, 1]
    assert learning.balanced_subset(lines, 9) == [lines[i] for i in (0, 2, 3, 1, 4)]


def test_the_held_out_subset_spans_the_book_and_its_speakers():
    lines = (Path(__file__).resolve().parents[2] / "bench/heldout/wonderland.jsonl").read_text().splitlines()
    chosen = [json.loads(line) for line in learning.balanced_subset(lines, 16)]
    speakers = [item["answer"] for item in chosen if item.get("rule", "").startswith("speaker")]
    chapters = {item["id"].split("-")[1][:4] for item in chosen}
    assert len(speakers) == 4 and len(set(speakers)) >= 3, speakers
    assert len(chapters) >= 6 and max(chapters) >= "ch10", sorted(chapters)  # the first 16 span ch01-ch04


def test_an_earlier_experiment_is_moved_aside_only_with_overwrite(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "learning.json").write_text("{}")
    with pytest.raises(learning.LearningError, match="--overwrite"):
        learning.claim_folder(out, overwrite=False)
    learning.claim_folder(out, overwrite=True)
    assert not any(out.iterdir())
    moved = [p for p in tmp_path.iterdir() if p != out]
    assert len(moved) == 1 and moved[0].name.startswith("exp.replaced-")
    assert json.loads((moved[0] / "learning.json").read_text()) == {}


@pytest.mark.slow
def test_one_tiny_experiment_end_to_end(tmp_path, capsys):
    from spell_core.models.assets import resolve_model

    model = make_tiny_model(tmp_path / "model", resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "exp"
    code = learning.main(["--out", str(out), "--model", str(model), "--eval-items", "3", "--no-sampled",
                          "--eval-max-new-tokens", "8", "--steps", "1", "--val-every", "1", "--val-items", "2",
                          "--max-new-tokens", "16", "--questions", "2", "--group-size", "2",
                          f"--run-arg=--corpus={corpus}", "--run-arg=--device=cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    record = json.loads((out / "learning.json").read_text())
    final = out / "run" / "checkpoints" / "step-000001"
    assert record["final_checkpoint"] == str(final) and (final / "config.json").is_file()
    assert f"final checkpoint: {final}" in printed
    # the subset: one question of each task type, the same ids before and after
    subset = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert sorted(q["type"] for q in subset) == ["doc_math", "doc_mc", "doc_qa"]
    for side in ("before", "after"):
        result = json.loads((out / "eval" / "heldout-greedy" / f"{side}.json").read_text())
        assert sorted(q["id"] for q in result["questions"]) == sorted(q["id"] for q in subset)
    assert "95% interval" in (out / "eval" / "heldout-greedy" / "compare.txt").read_text()
    assert record["comparisons"]["heldout-greedy"]["groups"]["all"]["questions"] == 3
    # validation at step 0 and after step 1, on the 2-question validation subset
    history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history if "eval_all_pass@1" in m] == [0, 1]
    text = learning_report.report(out)
    assert "| heldout | greedy | all | 3 | pass@1 |" in text and (out / "learning.png").is_file()


def test_each_command_records_its_own_peak_resident_set_and_exit(tmp_path):
    """A child that touches 300 MiB reports at least that as its peak, the next small child its own
    (not the largest so far); a failing child stops the experiment naming its log. Run from a small
    parent: a forked child's peak starts at its parent's resident set."""
    import subprocess
    import sys
    from pathlib import Path

    touch = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    script = f"""
import json, sys
from bench import learning
record = []
learning.run_logged([sys.executable, "-c", {touch!r}], {str(tmp_path / "a.log")!r}, record)
learning.run_logged([sys.executable, "-c", "print('hi')"], {str(tmp_path / "b.log")!r}, record)
try:
    learning.run_logged([sys.executable, "-c", "raise SystemExit(3)"], {str(tmp_path / "c.log")!r}, record)
except learning.LearningError as err:
    record.append(str(err))
print(json.dumps(record))
"""
    root = Path(learning.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    big, small, failed, message = json.loads(done.stdout.splitlines()[-1])
    assert big["exit"] == 0 and big["peak_rss_gb"] >= 300 / 1024
    assert small["exit"] == 0 and small["peak_rss_gb"] < 150 / 1024
    assert (tmp_path / "b.log").read_text() == "hi\n"
    assert failed["exit"] == 3 and "exit 3" in message and "c.log" in message
