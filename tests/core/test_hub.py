"""`--model Org/Name[@revision]` through huggingface_hub's cache, offline: the cache is laid
out on disk by the test (refs/main -> snapshots/<commit>/ with a tiny random model's files),
as `hf download` leaves it. Each case runs in a child process, because huggingface_hub reads
HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported."""
import json
import os
import subprocess
import sys

import pytest
import torch

from spell_core.models.hub import is_hub_id, split_hub_id
from tests.core.scripted import make_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"

RESOLVE = """
import json, sys
from spell_core.models.assets import AssetError, resolve_model
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = str(resolve_model(name))
    except AssetError as err:
        out[name] = "error: " + str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    from spell_core.models.assets import resolve_model

    root = tmp_path_factory.mktemp("hf")
    repo = root / "hub" / "models--Org--Tiny-Model"
    snapshot = repo / "snapshots" / COMMIT
    make_tiny_model(snapshot, resolve_model("smollm2-135m-instruct"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def resolve_offline(hub_cache, *names):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_cache), "HF_HUB_CACHE": str(hub_cache / "hub")}
    result = subprocess.run([sys.executable, "-c", RESOLVE, *names], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("Org/Name@v1.0") and is_hub_id("org/name@main")
    for not_an_id in ("./Org/Name", "/abs/path", "~/models/x", "name", "a/b/c", "Org/Name@"):
        assert not is_hub_id(not_an_id), not_an_id
    assert split_hub_id("Org/Name") == ("Org/Name", None)
    assert split_hub_id(f"Org/Name@{COMMIT}") == ("Org/Name", COMMIT)


def test_hub_id_and_revision_resolve_from_the_offline_cache(hub_cache):
    snapshot = hub_cache / "hub" / "models--Org--Tiny-Model" / "snapshots" / COMMIT
    found = resolve_offline(hub_cache, "Org/Tiny-Model", f"Org/Tiny-Model@{COMMIT}", "Org/Tiny-Model@main")
    assert found == {"Org/Tiny-Model": str(snapshot), f"Org/Tiny-Model@{COMMIT}": str(snapshot),
                     "Org/Tiny-Model@main": str(snapshot)}

    from safetensors.torch import load_file

    from spell_core.models.model import load_pretrained

    model, _ = load_pretrained(found["Org/Tiny-Model"])
    saved = load_file(snapshot / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_uncached_hub_id_offline_says_so_and_how_to_pass_a_folder(hub_cache):
    found = resolve_offline(hub_cache, "Org/Absent", "Org/Tiny-Model@v9")
    for name in ("Org/Absent", "Org/Tiny-Model@v9"):
        message = found[name]
        assert message.startswith(f"error: model '{name}': HF_HUB_OFFLINE is set and the Hugging Face cache "
                                  f"({hub_cache / 'hub'}) holds no copy"), message
        assert "pass the path of a local checkpoint folder" in message and "--model" in message
    assert "hf download Org/Tiny-Model --revision v9" in found["Org/Tiny-Model@v9"]
