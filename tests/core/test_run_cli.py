"""`python -m spell_core.run` configuration, statistics and argument errors on a tiny model and corpus
(the self-play loop itself: test_run.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spell_core.models.assets import resolve_model
from spell_core.run import main
from tests.core.scripted import NOTES, make_tiny_corpus, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with the default model's tokenizer, saved by transformers; its
    parameter count and tokenizer as transformers reads them back."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-model"), resolve_model("smollm2-135m-instruct"))
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder).parameters())
    return folder, n_params, AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tiny_corpus(tmp_path):
    return make_tiny_corpus(tmp_path / "corpus")


def field(output, name):
    match = re.search(rf"^{name}\s+(.*)$", output, re.M)
    assert match, f"no '{name}' line in:\n{output}"
    return match.group(1)


def test_cli_prints_configuration_and_statistics_then_stops(tiny_model, tiny_corpus, tmp_path, capsys):
    folder, n_params, tokenizer = tiny_model
    out = tmp_path / "run"
    argv = ["--model", str(folder), "--corpus", str(tiny_corpus), "--ctx", "6k", "--out", str(out),
            "--seed", "3", "--device", "cpu", "--max-new-tokens", "4096", "--steps", "0"]
    assert main(argv) == 0
    output = capsys.readouterr().out

    assert re.search(r"^\s+data\.ctx\s+6144$", output, re.M)
    assert re.search(r"^\s+seed\s+3$", output, re.M)
    assert re.search(r"^\s+cluster_budget\s+6144$", output, re.M)  # --ctx is the document budget
    assert re.search(r"^\s+context_needed\s+11264$", output, re.M)  # 6144 + prompt 1024 + response 4096
    assert field(output, "parameters").startswith(f"{n_params:,} ")
    assert field(output, "vocabulary").startswith(f"{len(tokenizer):,} ")
    assert field(output, "native ctx").startswith("4,096 tokens; --ctx 6,144 + prompt + response need 11,264: "
                                                  "RoPE scaling applied, yarn factor 2.75")  # 11264 / 4096
    # the play: front matter + ACT I (scene I) + scene II + ACT II (scene I); the notes: one per line
    assert field(output, "documents").startswith(f"{4 + len(NOTES)} from 2 works")
    play_tokens = [len(tokenizer.encode(t, add_special_tokens=False)) for t in (
        "THE TINY PLAY\n\nPERSONS. Ann, Bob.",
        "ACT I.\n\nSCENE I. A room.\n\nANN. The key is under the third stone by the well.",
        "SCENE II. A garden.\n\nBOB. Then the well it is, and quickly.",
        "ACT II.\n\nSCENE I. The well.\n\nANN. Here lies the stone, and under it the key.")]
    note_tokens = [len(tokenizer.encode(t, add_special_tokens=False)) for t in NOTES]
    assert field(output, "documents").startswith(f"{4 + len(NOTES)} from 2 works, "
                                                 f"{sum(play_tokens) + sum(note_tokens):,} tokens")
    assert field(output, "clusters").startswith("2,")  # everything fits: one cluster per work
    tags = len(tokenizer.encode("\n</document>\n\n<document>\n", add_special_tokens=False))  # around each document
    sizes = sorted([sum(play_tokens) + 4 * tags, sum(note_tokens) + len(NOTES) * tags])  # as the prompts show them
    assert field(output, "tokens per cluster") == f"min {sizes[0]:,}  median {sum(sizes) / 2:,.0f}  max {sizes[1]:,}"
    assert "--steps 0: nothing to train" in output
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["ctx"] == 6144 and saved["model"]["name"] == str(folder) and saved["seed"] == 3


def test_python_dash_m_entry_points():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for module in ("spell_core.run", "spell_core"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert all(option in result.stdout for option in ("--ctx", "--model", "--corpus", "--out", "--seed", "--device"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ctx", "12q"], "argument --ctx: context length '12q' is not understood"),
        (["--tasks", "doc_qa,doc_essay"], "unknown task type 'doc_essay'; choose from doc_qa, doc_math, doc_mc"),
        (["--tasks", "=doc_qa"], "the prefix before '=' is empty"),
        (["--dual-clip", "0.5"], "argument --dual-clip: must be > 1, or 0 for off, got 0.5"),
        (["--memory-admission", "strict"], "argument --memory-admission: invalid choice: 'strict'"),
        (["--device", "tpu"], "argument --device: device 'tpu'"),
        (["--seed", "x"], "argument --seed: invalid int value"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--corpus", str(tmp_path), "--device", "cpu"]) == 1
    assert f"spell: error: model '{tmp_path / 'nope'}' is neither a known alias" in capsys.readouterr().err


def test_empty_corpus_is_a_clear_error(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["--model", str(tiny_model[0]), "--corpus", str(empty), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 1
    assert "spell: error: corpus folder" in capsys.readouterr().err


def test_no_rope_scaling_when_the_native_context_holds_documents_prompt_and_response(tiny_model, tiny_corpus,
                                                                                     tmp_path, capsys):
    argv = ["--model", str(tiny_model[0]), "--corpus", str(tiny_corpus), "--ctx", "1k", "--max-new-tokens", "2048",
            "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "0"]
    assert main(argv) == 0
    output = capsys.readouterr().out
    # 1024 documents + 1024 prompt room + 2048 response = 4096 = the tiny model's native context
    assert field(output, "native ctx") == "4,096 tokens (holds --ctx 1,024 + prompt + response = 4,096)"
    assert field(output, "task types") == "doc_qa,doc_math,doc_mc: 2 clusters"


def test_method_flags_reach_the_config_and_the_trainer(monkeypatch):
    from spell_core.run import THINKING_MAX_NEW_TOKENS, config_from_args, trainer_options

    config, args = config_from_args(["--device", "cpu", "--tasks", "doc_qa", "--tasks", "docmath=doc_math",
                                     "--memory-admission", "paper", "--clip-low", "0.1", "--clip-high", "0.3",
                                     "--dual-clip", "0", "--enable-thinking"])
    options = trainer_options(config, args)
    assert (options.clip_low, options.clip_high, options.dual_clip) == (0.1, 0.3, None)  # 0: dual clip off
    assert config.data.tasks == ["doc_qa", "docmath=doc_math"]
    assert config.loop.memory_admission == "paper" and config.loop.enable_thinking is True
    assert config.sampling.max_response_tokens == 160  # thinking keeps the CPU default on a CPU
    defaults = trainer_options(*config_from_args(["--device", "cpu"]))
    assert (defaults.clip_low, defaults.clip_high, defaults.dual_clip) == (0.2, 0.2, 3.0)

    monkeypatch.setattr("spell_core.cli.run_options._resolve_device", lambda device: "cuda")
    gpu, _ = config_from_args(["--enable-thinking"])
    assert gpu.sampling.max_response_tokens == THINKING_MAX_NEW_TOKENS == 20480
    assert (gpu.loop.questions, gpu.loop.max_rounds, gpu.loop.kept_groups) == (480, 10, 128)
    assert config_from_args([])[0].sampling.max_response_tokens == 4096
    assert config_from_args(["--enable-thinking", "--max-new-tokens", "8000"])[0].sampling.max_response_tokens == 8000


def test_cpu_runs_pack_2048_tokens_overlap_grounding_and_keep_no_rollback_snapshot(monkeypatch):
    """CPU defaults chosen by measurement (bench/results/loop.md): stored activations of 2048-token
    micro-batches (8192 tokens stored 18.2 GB), no 3x-the-weights snapshot, one decode loop for
    grounding and responders."""
    from spell_core.run import config_from_args, trainer_options

    config, args = config_from_args(["--device", "cpu"])
    cpu = trainer_options(config, args)
    assert (cpu.gradient_checkpointing, cpu.micro_batch_tokens, cpu.rollback_snapshot) == (False, 2048, None)
    assert config.loop.overlap_grounding is True
    # the longest trajectory at the CPU defaults fits one micro-batch: 512 documents + 1024 prompt room + 160
    assert (config.data.ctx, config.sampling.max_response_tokens) == (512, 160)
    assert 512 + 1024 + 160 <= cpu.micro_batch_tokens
    on = trainer_options(*config_from_args(["--device", "cpu", "--gradient-checkpointing", "--rollback-snapshot"]))
    assert (on.gradient_checkpointing, on.rollback_snapshot) == (True, True)
    off = trainer_options(*config_from_args(["--device", "cpu", "--no-gradient-checkpointing"]))
    assert off.gradient_checkpointing is False
    monkeypatch.setattr("spell_core.cli.run_options._resolve_device", lambda device: "cuda")
    gpu_config, gpu_args = config_from_args([])
    gpu = trainer_options(gpu_config, gpu_args)
    assert (gpu.gradient_checkpointing, gpu.micro_batch_tokens) == (False, 32768)
    assert gpu_config.loop.overlap_grounding is False
    assert trainer_options(*config_from_args(["--gradient-checkpointing"])).gradient_checkpointing is True
