"""The cases of issue 15 that failed unclearly (a raw traceback, or a message that does not say what
to do), each reproduced and answered by a clear message, a repair or a fallback; and the
leftovers of killed saves tidied at the next start. Tiny random Llama, scripted outputs."""
import json
import shutil

import pytest
from safetensors import SafetensorError

from spell_core.models import checkpoint

from spell_core.training import train_state
from spell_core.run import main
from tests.core.test_run import argv, assets, metrics_lines, scripted  # noqa: F401


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each (step-000001, step-000002)."""
    from spell_core.sampling import sampler
    from tests.core.scripted import random_play, scripted_generate

    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "generate", scripted_generate(random_play, real_logprobs=True))
        assert main(argv(assets, out, "--steps", "2", "--save-every", "1")) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run", symlinks=True)


def loaded_model(out):
    return "model       " in out


# --- --out, before the model loads ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_an_unusable_out_is_a_clear_error_before_the_model_loads(assets, tmp_path, capsys, case):
    (tmp_path / "a-file").write_text("not a folder")
    out = {"file": tmp_path / "a-file", "under a file": tmp_path / "a-file" / "run",
           "unwritable": "/sys/spell-issue-15-run"}[case]
    assert main(argv(assets, out, "--steps", "1")) == 1
    captured = capsys.readouterr()
    expected = {"file": f"--out {out} is a file, not a folder",
                "under a file": f"--out {out}: {tmp_path / 'a-file'} is a file, so no folder can be made under it",
                "unwritable": f"--out {out} is not writable"}[case]
    assert f"spell: error: {expected}" in captured.err
    assert not loaded_model(captured.out) and "Traceback" not in captured.err


def test_too_little_free_space_for_a_checkpoint_is_refused_before_the_model_loads(assets, tmp_path, capsys,
                                                                                  monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr("spell_core.cli.run_folder.shutil.disk_usage", lambda path: real(path)._replace(free=5 * 2**20))
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "1")) == 1
    captured = capsys.readouterr()
    # weights + AdamW's two moments in fp32 (1,591,456 parameters) + 64 MiB margin
    needed = (3 * 1_591_456 * 4 + 64 * 2**20) / 2**30
    assert (f"--out {out}: a checkpoint (weights and optimizer state) needs about {needed:.2f} GiB, only 0.00 GiB "
            "are free on its disk") in captured.err
    assert not loaded_model(captured.out)


def test_a_full_disk_during_a_save_removes_the_partial_save_and_keeps_the_previous_checkpoint(
        assets, scripted, tmp_path, capsys, monkeypatch):
    real_save = checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if "step-000002" in str(path):
            path.write_bytes(b"\0" * 1000)  # part of the file made it to the disk
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    assert main(argv(assets, out, "--steps", "3", "--save-every", "1")) == 1
    err = capsys.readouterr().err
    assert f"spell: error: the disk of {out} is full: checkpoint step 2 needs about 0.02 GiB" in err
    assert "The partial save was removed and the previous checkpoint (step-000001) is intact" in err
    assert "--resume" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert [m["step"] for m in metrics_lines(out)] == [1, 2]  # the run stopped at the failed save
    from spell_core.models.model import load_pretrained
    assert train_state.load(out / "checkpoints" / "step-000001", load_pretrained(assets[0])[0])[0] == 1


# --- corrupt checkpoints and logs, on --resume ------------------------------------------------------

@pytest.mark.parametrize("file, damage, reason", [
    ("optimizer.pt", "truncate", "optimizer.pt is truncated or corrupt"),
    ("state.json", "garble", "state.json is truncated or corrupt (JSONDecodeError"),
    ("model.safetensors", "truncate", "model.safetensors is not a readable safetensors file (truncated or corrupt?)"),
    ("rng.pt", "truncate", "rng.pt is truncated or corrupt"),
])
def test_resume_names_a_corrupt_checkpoint_file_and_falls_back_to_the_older_checkpoint(
        assets, scripted, run_copy, capsys, file, damage, reason):
    out = run_copy
    path = out / "checkpoints" / "step-000002" / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b'{"step": 2, "ext')
    assert main(argv(assets, out, "--steps", "3", "--resume")) == 0
    captured = capsys.readouterr()
    assert f"spell: checkpoint step-000002 is unusable: {path.parent}" in captured.out and reason in captured.out
    assert f"spell: falling back to the older complete checkpoint {out / 'checkpoints' / 'step-000001'}" in captured.out
    assert "at step 1" in captured.out
    assert [m["step"] for m in metrics_lines(out)] == [1, 2, 3]
    assert [step for step, _ in train_state.list_checkpoints(out)] == [2, 3]  # step 2 written anew


def test_a_truncated_last_line_of_the_logs_is_dropped_and_said_on_resume(assets, scripted, run_copy, capsys):
    out = run_copy
    for name in ("metrics.jsonl", "questions.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 3, "reward_quest')  # a kill in the middle of a line of step 3
    assert main(argv(assets, out, "--steps", "3", "--resume")) == 0
    captured = capsys.readouterr()
    for name in ("metrics.jsonl", "questions.jsonl"):
        assert f"spell: {out / name}: dropped its last line, cut short by an interrupted write" in captured.err
    assert [m["step"] for m in metrics_lines(out)] == [1, 2, 3]
    steps = {json.loads(line)["step"] for line in (out / "questions.jsonl").read_text().splitlines()}
    assert steps == {1, 2, 3}


def test_a_bad_line_inside_the_logs_is_named(assets, scripted, run_copy, capsys):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    (run_copy / "metrics.jsonl").write_text("\n".join(["{oops", *lines[1:]]) + "\n")
    assert main(argv(assets, run_copy, "--steps", "3", "--resume")) == 1
    assert f"spell: error: {run_copy / 'metrics.jsonl'}:1: not a JSON line" in capsys.readouterr().err


# --- leftovers of killed saves ------------------------------------------------------------------------

def test_leftovers_of_killed_saves_are_removed_and_pruning_finished_at_the_next_start(assets, run_copy, capsys):
    out = run_copy
    root = out / "checkpoints"
    leftover = root / ".step-000003.tmp-0123abcd"  # a save killed while writing
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    # a kill between the rename of a new checkpoint and the pruning of the oldest: three complete ones
    shutil.copytree(root / "step-000001", root / "step-000000")
    assert main(argv(assets, out, "--steps", "2", "--resume")) == 0  # nothing left to train: no save
    captured = capsys.readouterr().out
    assert "checkpoints removed .step-000003.tmp-0123abcd (left by an interrupted save)" in captured
    assert "checkpoints pruned step-000000 (only the newest 2 are kept)" in captured
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


# --- arguments and model folders ----------------------------------------------------------------------

def test_group_size_one_is_refused(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv(assets, tmp_path / "run", "--group-size", "1"))
    assert info.value.code == 2
    assert "argument --group-size: must be at least 2, got 1: with one sample per question rewards cannot vary" \
           in capsys.readouterr().err


def test_a_context_far_beyond_the_model_warns_with_the_expected_time(assets, tmp_path, capsys):
    assert main(argv(assets, tmp_path / "run", "--ctx", "64k", "--steps", "0")) == 0
    err = capsys.readouterr().err
    assert ("spell: warning: --ctx 65,536 is 16x the model's native context of 4,096 (RoPE scaling is reliable up "
            "to about 4x). Expected time on this machine: about") in err
    assert "for the 6 prompts of a step" in err  # --questions 3: questioner and responder prompts


def test_a_model_folder_without_tokenizer_files_names_them(assets, tmp_path, capsys):
    folder = shutil.copytree(assets[0], tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    assert main(argv((folder, assets[1]), tmp_path / "run", "--steps", "0")) == 1
    err = capsys.readouterr().err
    assert (f"spell: error: {folder} has no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json + "
            "merges.txt, vocab.txt is there") in err and "sentencepiece" not in err


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_that_looks_complete(assets, tmp_path,
                                                                                         monkeypatch):
    from spell_core.models.model import load_pretrained

    model, tokenizer = load_pretrained(assets[0])
    for step in (1, 2):
        train_state.save(tmp_path, step, model, tokenizer, None)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # the process dies after the first file is gone
        (sorted(p for p in path.iterdir() if p.name != train_state.COMPLETE)[0]).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(train_state.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train_state.save(tmp_path, 3, model, tokenizer, None)  # written, then step 1 pruned: killed there
    monkeypatch.setattr(train_state.shutil, "rmtree", real_rmtree)
    kept = train_state.list_checkpoints(tmp_path)
    assert [step for step, _ in kept] == [2, 3]
    for _, folder in kept:
        assert train_state.load(folder, load_pretrained(assets[0])[0])[0] in (2, 3)
    assert train_state.tidy(tmp_path)[0].startswith("removed .step-000001.old-")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]
