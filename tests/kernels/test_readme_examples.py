"""The examples in kernels/README.md run as written: plain PyTorch, MoE and verl always (they need only
spell_kernels and torch), transformers and TRL where installed (the TRL example on a tiny local model
with SmolLM2's tokenizer instead of the hub model it names)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "kernels" / "README.md"
KERNELS = README.parent


def _examples():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    named = {}
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# example: "):
            named[first.removeprefix("# example: ").strip()] = block
    return named


def _run(code, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(KERNELS), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_readme_names_its_examples():
    assert set(_examples()) == {"plain-pytorch", "transformers", "trl", "verl", "moe"}


def test_plain_pytorch_example():
    out = _run(_examples()["plain-pytorch"])
    assert out.startswith("loss ") and " kl " in out


def test_moe_example():
    assert "torch.Size([5, 32]) torch.Size([5, 32])" in _run(_examples()["moe"])


def test_verl_example():
    _run(_examples()["verl"])


def test_transformers_example():
    pytest.importorskip("transformers", reason="the example needs the extra spell-kernels[transformers]")
    out = _run(_examples()["transformers"])
    assert "torch.Size([2, 11]) torch.Size([2, 11])" in out


def test_trl_example(tmp_path):
    pytest.importorskip("trl", reason="the example needs the extra spell-kernels[trl]")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spell_core.models.assets import resolve_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = "import torch; torch.manual_seed(0)\n" + _examples()["trl"]
    _run(code, {"SPELL_EXAMPLE_MODEL": str(tmp_path / "model"), "SPELL_EXAMPLE_OUT": str(tmp_path / "out"),
                "HF_HUB_OFFLINE": "1"})
