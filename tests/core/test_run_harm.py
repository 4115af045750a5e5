"""The five cases of issue 15 that did harm, each reproduced as reported, on a tiny random Llama
with scripted outputs (tests/core/test_run.py's setup): a new run in an old run folder, two runs
in one folder at once, an update that makes the weights non-finite, a model folder with NaN
weights. (The fifth, a NaN query on the CPU attention path: tests/kernels/test_attn_cpu_nan.py.)"""
import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from spell_core.training import train_state
from spell_core.models.checkpoint import CheckpointError
from spell_core.run import main
from tests.core.test_run import _spawn, _wait_for, argv, assets, metrics_lines, scripted, weights  # noqa: F401

EVERY_STEP_TRAINS = ("--kept-groups", "1", "--max-rounds", "4")


def test_a_new_run_in_an_old_run_folder_is_refused_and_overwrite_moves_the_old_run_aside(assets, scripted, tmp_path,
                                                                                          capsys):
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "3", "--save-every", "1")) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    # the reported sequence: a second run without --resume in the same folder
    assert main(argv(assets, out, "--steps", "1", "--seed", "7")) == 1
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert [m["step"] for m in metrics_lines(out)] == [1, 2, 3]  # nothing of the old run touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # --overwrite: the old run moves aside whole; the new one starts from nothing
    assert main(argv(assets, out, "--steps", "1", "--seed", "7", "--overwrite")) == 0
    moved = capsys.readouterr().out.split("the old run was moved to ")[1].split(" (delete")[0]
    archived = tmp_path / moved.rsplit("/", 1)[-1]
    assert archived.is_dir() and [m["step"] for m in metrics_lines(archived)] == [1, 2, 3]
    assert [step for step, _ in train_state.list_checkpoints(archived)] == [2, 3]
    assert [step for step, _ in train_state.list_checkpoints(out)] == [1]
    assert [m["step"] for m in metrics_lines(out)] == [1]
    # and --resume continues the new run, not the old one
    assert main(argv(assets, out, "--steps", "2", "--seed", "7", "--resume")) == 0
    assert f"resumed     from {out / 'checkpoints' / 'step-000001'} at step 1" in capsys.readouterr().out
    assert [m["step"] for m in metrics_lines(out)] == [1, 2]


def test_resume_refuses_another_model_or_corpus_and_lists_other_changes(assets, scripted, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "1")) == 0
    stored = (out / "config.json").read_text()
    other_model = tmp_path / "other-model"
    shutil.copytree(assets[0], other_model)
    model, corpus = assets
    capsys.readouterr()
    assert main(argv((other_model, corpus), out, "--steps", "2", "--resume")) == 1
    err = capsys.readouterr().err
    assert f"was trained on model '{model}', not '{other_model}'" in err and f"--model {model}" in err
    other_corpus = shutil.copytree(corpus, tmp_path / "other-corpus")
    assert main(argv((model, other_corpus), out, "--steps", "2", "--resume")) == 1
    assert f"was trained on corpus '{corpus}'" in capsys.readouterr().err
    assert main(argv(assets, out, "--steps", "2", "--resume", "--ctx", "3k")) == 1
    err = capsys.readouterr().err
    assert "data.ctx: 2048 -> 3072" in err and "--allow-config-change" in err
    assert (out / "config.json").read_text() == stored  # the stored config is not overwritten by a refused run
    assert main(argv(assets, out, "--steps", "2", "--resume", "--ctx", "3k", "--allow-config-change")) == 0
    # --ctx is the document budget; the context needed adds the prompt room (1024) and the response (64)
    assert "resuming with changed options (--allow-config-change): cluster_budget: 2048 -> 3072; context_needed: " \
           "3136 -> 4160; data.ctx: 2048 -> 3072" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["data"]["ctx"] == 3072


def test_two_runs_in_one_folder_at_once_the_second_is_refused_naming_the_first(assets, tmp_path, capsys):
    out = tmp_path / "run"
    first = _spawn(assets, out, {"SPELL_TEST_SLEEP": "0.3"}, "--steps", "50", "--save-every", "100")
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists(), first)
        assert main(argv(assets, out, "--steps", "1", "--resume")) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {first.pid})" in err
        assert main(argv(assets, out, "--steps", "1", "--overwrite")) == 1  # not even --overwrite
        assert f"(pid {first.pid})" in capsys.readouterr().err
        assert (out / "metrics.jsonl").exists()
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGINT
    steps = [m["step"] for m in metrics_lines(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines only


def test_an_update_to_non_finite_weights_is_rolled_back_and_nothing_non_finite_is_saved(assets, scripted, tmp_path,
                                                                                        capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:  # --lr inf itself is refused
        main(argv(assets, tmp_path / "inf", "--lr", "inf"))
    assert info.value.code == 2 and "argument --lr: must be a positive finite number, got 'inf'" in capsys.readouterr().err
    # what --lr inf did: every optimizer step leaves weights at NaN (here: one element of each update)
    real_step = torch.optim.AdamW.step

    def diverging_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].view(-1)[0] = float("nan")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    out = tmp_path / "run"
    code = main(argv(assets, out, "--steps", "5", "--save-every", "1", "--rollback-snapshot", *EVERY_STEP_TRAINS))
    captured = capsys.readouterr()
    assert code == 1
    assert "spell: error: 3 optimizer steps in a row gave NaN/Inf weights; each was rolled back" in captured.err
    assert "rolled back to the weights and optimizer state before it" in captured.err
    lines = metrics_lines(out)
    assert [m["step"] for m in lines] == [1, 2] and all(m["train_rolled_back"] for m in lines)
    initial = load_file(assets[0] / "model.safetensors")
    kept = train_state.list_checkpoints(out)
    assert [step for step, _ in kept] == [1, 2]
    for _, folder in kept:
        saved = weights(folder)
        assert all(bool(torch.isfinite(t).all()) for t in saved.values())
        assert all(torch.equal(saved[k], initial[k]) for k in saved)  # the weights from before the bad updates
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        assert optimizer["state"] == {}  # no step ever happened


def test_without_a_rollback_snapshot_a_non_finite_update_stops_the_run_and_keeps_the_last_checkpoint(
        assets, scripted, tmp_path, capsys, monkeypatch):
    """The CPU default: no copy of the weights, so the first NaN update ends the run, unsaved."""
    real_step = torch.optim.AdamW.step
    calls = []

    def second_step_diverges(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("nan")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", second_step_diverges)
    out = tmp_path / "run"
    code = main(argv(assets, out, "--steps", "5", "--save-every", "1", *EVERY_STEP_TRAINS))
    captured = capsys.readouterr()
    assert code == 1 and len(calls) == 2
    assert "spell: error: the optimizer step gave NaN/Inf weights, and no copy" in captured.err
    assert "the last checkpoint holds the weights before it" in captured.err
    assert [m["step"] for m in metrics_lines(out)] == [1]
    kept = train_state.list_checkpoints(out)
    assert [step for step, _ in kept] == [1]
    assert all(bool(torch.isfinite(t).all()) for t in weights(kept[0][1]).values())


def test_a_checkpoint_is_never_written_from_non_finite_weights(assets, tmp_path):
    from spell_core.models.model import load_pretrained

    model, tokenizer = load_pretrained(assets[0])
    train_state.save(tmp_path, 1, model, tokenizer, None)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 not written: tensor\(s\) "
                                              r"model\.layers\.1\.mlp\.up_proj\.weight hold NaN/Inf"):
        train_state.save(tmp_path, 2, model, tokenizer, None)
    assert [step for step, _ in train_state.list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_model_folder_with_nan_weights_is_refused_naming_the_tensor(assets, tmp_path, capsys):
    from spell_core.models.model import load_pretrained

    folder = shutil.copytree(assets[0], tmp_path / "nan-model")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"][3, 1] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \(in "
                                              r"model\.safetensors\) hold NaN/Inf"):
        load_pretrained(folder)
    assert main(argv((folder, assets[1]), tmp_path / "run", "--steps", "1")) == 1
    assert "model.layers.0.self_attn.k_proj.weight (in model.safetensors) hold NaN/Inf" in capsys.readouterr().err


def test_config_differences_ignore_free_keys_and_options_of_other_versions():
    from spell_core.cli.run_folder import config_differences

    stored = {"model": {"name": "m"}, "steps": 3, "save_every": 1, "out": "a", "data": {"ctx": 2048},
              "trainer": {"betas": [0.9, 0.999], "old_knob": 1, "offload_while_sampling": "off"}}
    given = {"model": {"name": "m"}, "steps": 9, "save_every": 5, "out": "b", "data": {"ctx": 4096},
             "trainer": {"betas": (0.9, 0.999), "max_rollbacks": 3, "offload_while_sampling": "all"}}
    assert config_differences(stored, given) == {"data.ctx": (2048, 4096)}
