"""`python -m spell_core.run --model` takes a Qwen3-MoE checkpoint folder: it loads and passes the input
checks (the loop itself: the replay tests); a Hub id resolves to one from the offline cache and loads."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spell_core.models.assets import resolve_model
from spell_core.run import main
from tests.core.scripted import make_tiny_corpus
from tests.core.tiny_models import make_tiny_moe_model

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
LOAD = """
import sys
from spell_core.models.assets import resolve_model
from spell_core.models.model import load_pretrained
folder = resolve_model(sys.argv[1])  # what --model does with a Hub id
model, _ = load_pretrained(folder)
print(model.config.model_type, folder)
"""


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A tiny Qwen3-MoE saved by transformers, with its parameter count as transformers reads it."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_moe_model(tmp_path_factory.mktemp("moe") / "model", resolve_model("smollm2-135m-instruct"))
    return folder, sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def run_args(model, tmp_path):
    corpus = make_tiny_corpus(tmp_path / "corpus")
    return ["--model", str(model), "--corpus", str(corpus), "--ctx", "2k", "--out", str(tmp_path / "run"),
            "--device", "cpu", "--max-new-tokens", "512", "--steps", "0"]


def test_run_takes_a_moe_folder(moe_folder, tmp_path, capsys):
    folder, n_params = moe_folder
    assert main(run_args(folder, tmp_path)) == 0
    output = capsys.readouterr().out
    assert re.search(rf"^model\s+{re.escape(str(folder))} \(qwen3_moe, 3 layers,", output, re.M)
    assert re.search(rf"^parameters\s+{n_params:,} ", output, re.M)
    assert "--steps 0: nothing to train" in output


def test_a_moe_hub_id_resolves_from_the_offline_cache_and_loads(moe_folder, tmp_path):
    folder, _ = moe_folder
    repo = tmp_path / "hf" / "hub" / "models--Org--Tiny-Moe"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    result = subprocess.run([sys.executable, "-c", LOAD, "Org/Tiny-Moe"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["qwen3_moe", str(snapshot)]
