"""`--report-to`: the metrics and questions of each step read back from TensorBoard's event
files and from an offline W&B run (its .wandb file, as wandb's protobuf records), a resumed run continuing the
same run without duplicates, and the errors for an unknown reporter or a missing package."""
import json
import types

import pytest

from spell_core.cli.monitor import Monitor
from spell_core.cli.reporters import ReporterError, parse_report_to, scalars
from tests.core.test_run import argv, assets, scripted  # noqa: F401 (the tiny model, corpus and scripted outputs)
from tests.core.wandb_records import wandb_records


def metrics(step, loss):
    return {"step": step, "rounds": 1, "questions": 2, "reward_questioner": 0.25 * step, "reward_responder": 0.5,
            "reward_verifier": None, "pass_rate_histogram": [1, 0, 1], "kept_groups": 1, "responder_groups": 2,
            "tokens_generated": 100 * step, "time_questioner_s": 1.5, "step_time_s": 9.0, "train_loss": loss,
            "train_skipped": False, "train_skip_reason": None, "nothing_trainable": False}


def question(step, i):
    return types.SimpleNamespace(id=f"s{step}q{i}", task_type="doc_qa", cluster_id="c#0", status="ok", reason=None,
                                 reward=0.5, sample=types.SimpleNamespace(text=f"question text {step}.{i}"),
                                 task=types.SimpleNamespace(question=f"What is {step}.{i}?", answer="42", options=None),
                                 responder=None, verifiers=[])


def run_steps(monitor, steps, loss):
    for step in steps:
        monitor.log_questions(step, [question(step, 0), question(step, 1)])
        monitor.log_step(metrics(step, loss(step)))
    monitor.close()


def test_tags_are_the_metric_names_in_sections():
    tags = scalars(metrics(3, 0.5) | {"gpu_power_w": 300.0, "eval_accuracy": 0.75, "train_step_time_s": 2.0,
                                      "train_tokens_trained": 64})
    assert tags == {
        "selfplay/rounds": 1.0, "selfplay/questions": 2.0, "reward/reward_questioner": 0.75,
        "reward/reward_responder": 0.5, "reward/pass_rate_histogram/0": 1.0, "reward/pass_rate_histogram/1": 0.0,
        "reward/pass_rate_histogram/2": 1.0, "selfplay/kept_groups": 1.0, "selfplay/responder_groups": 2.0,
        "tokens/tokens_generated": 300.0, "time/time_questioner_s": 1.5, "time/step_time_s": 9.0,
        "train/train_loss": 0.5, "train/train_skipped": 0.0, "selfplay/nothing_trainable": 0.0,
        "gpu/gpu_power_w": 300.0, "eval/eval_accuracy": 0.75, "time/train_step_time_s": 2.0,
        "tokens/train_tokens_trained": 64.0}


def test_report_to_names_and_errors(monkeypatch):
    assert parse_report_to("none") == ()
    assert parse_report_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    with pytest.raises(ReporterError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")
    with pytest.raises(ReporterError, match="unknown reporter 'mlflow'"):
        parse_report_to("tensorboard,mlflow")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ReporterError, match=r"pip install 'spell\[wandb\]'"):
        parse_report_to("tensorboard,wandb")


def test_tensorboard_events_hold_every_number_and_resume_replaces_redone_steps(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_steps(Monitor(tmp_path, 4, bars=False, plot=False, report_to=("tensorboard",)), (1, 2, 3), lambda s: 1.0 * s)
    # resumed from the checkpoint of step 2: step 3 is redone (other loss), then step 4
    run_steps(Monitor(tmp_path, 4, bars=False, plot=False, resume_step=2, report_to=("tensorboard",)), (3, 4),
              lambda s: 10.0 * s)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in logged] == [1.0, 2.0, 30.0, 40.0]
    for tag in ("train/train_loss", "reward/reward_questioner", "tokens/tokens_generated",
                "reward/pass_rate_histogram/2", "time/step_time_s"):
        key = tag.split("/")[1]
        points = events.Scalars(tag)
        assert [e.step for e in points] == [m["step"] for m in logged], tag
        expected = [float(m[key][2] if isinstance(m[key], list) else m[key]) for m in logged]
        assert [e.value for e in points] == pytest.approx(expected), tag
    assert "reward/reward_verifier" not in events.Tags()["scalars"]  # None: nothing to plot
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("questions/text_summary")}
    assert sorted(texts) == [1, 2, 3, 4]
    assert "What is 4.1?" in texts[4] and texts[4].count("doc_qa") == 2


def read_wandb_history(folder):
    """{step: [{key: value}]} and the run ids of every .wandb file under `folder`."""
    history, run_ids = {}, set()
    for path in sorted(folder.rglob("*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                run_ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(items["_step"], []).append(items)
    return history, run_ids


def test_wandb_offline_resume_keeps_the_first_values_of_a_redone_step_and_tells_the_user(tmp_path, monkeypatch,
                                                                                          capsys):
    """No API key: an offline run. Steps 1, 2 logged with loss = step; resumed from the checkpoint
    of step 1, steps 2, 3 logged with loss = 10 x step. One W&B run, each step once: step 2 keeps
    2.0 (W&B cannot rewind an offline run), unlike metrics.jsonl's redone 20.0, and the resumed
    run says so, naming step 2."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored key: offline, no prompt
    out = tmp_path / "run"
    run_steps(Monitor(out, 3, bars=False, plot=False, report_to=("wandb",)), (1, 2), lambda s: 1.0 * s)
    state = json.loads((out / "wandb_run.json").read_text())
    assert state["mode"] == "offline" and state["last_step"] == 2
    assert "spell: note" not in capsys.readouterr().err
    run_steps(Monitor(out, 3, bars=False, plot=False, resume_step=1, report_to=("wandb",)), (2, 3),
              lambda s: 10.0 * s)
    assert (f"spell: note: W&B run {state['id']} already holds step 2 from before the checkpoint of step 1; W&B "
            "takes a step once, so it keeps those first values while metrics.jsonl and TensorBoard get the redone "
            "step 2; W&B's new values start at step 3") in capsys.readouterr().err
    history, run_ids = read_wandb_history(out / "wandb")
    assert run_ids == {state["id"]}  # one W&B run across both sessions
    assert sorted(history) == [1, 2, 3] and all(len(v) == 1 for v in history.values())  # no step twice
    for step, loss in ((1, 1.0), (2, 2.0), (3, 30.0)):  # step 2: the value first sent, as the note says
        items = history[step][0]
        expected = scalars(metrics(step, loss))
        assert {k: items[k] for k in expected} == pytest.approx(expected)
        assert items["questions/_type"] == "table-file" and items["questions/nrows"] == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train_loss"]) for m in logged] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_run_reports_each_step_to_tensorboard_and_wandb(assets, scripted, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spell_core.run import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "2", "--report-to", "tensorboard,wandb")) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    history, _ = read_wandb_history(out / "wandb")
    tensorboard = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for m in logged:
        expected = scalars(m)
        assert {tag: tensorboard[tag][m["step"]] for tag in expected} == pytest.approx(expected)
        assert {tag: history[m["step"]][0][tag] for tag in expected} == pytest.approx(expected)
    assert {"train/train_loss", "reward/reward_responder", "tokens/tokens_generated"} <= set(tensorboard)
    assert sum(len(points) for points in tensorboard.values()) == sum(len(scalars(m)) for m in logged)


def test_a_missing_reporter_package_stops_the_run_before_it_starts(monkeypatch, capsys):
    import importlib.util

    from spell_core.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["--report-to", "tensorboard", "--device", "cpu"])
    assert info.value.code == 2
    assert "pip install 'spell[tensorboard]'" in capsys.readouterr().err
