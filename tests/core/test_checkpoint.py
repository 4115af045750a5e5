"""HF checkpoint folders: save -> transformers loads the same model, sharding, atomic writes,
and every bad-checkpoint case raises an error naming the file or tensor at fault."""
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from spell_core.models import checkpoint as ckpt
from spell_core.models.assets import AssetError
from spell_core.models.model import CausalLM, ModelConfig, load_pretrained, save_pretrained

WORDS = ["<unk>", "to", "be", "or", "not", "that", "is", "the", "question"]


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_model(model_type="llama", tied=True, seed=0) -> CausalLM:
    raw = {
        "model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "tie_word_embeddings": tied,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf(raw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


IDS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])


def assert_transformers_matches(model: CausalLM, folder: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(IDS) - hf(IDS[None]).logits[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_save_then_transformers_and_we_load_the_same_model(tmp_path, model_type, tied):
    model, tokenizer = tiny_model(model_type, tied), tiny_tokenizer()
    folder = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left over
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
        assert f.metadata() == {"format": "pt"}
    assert_transformers_matches(model, folder)

    loaded, loaded_tok = load_pretrained(folder)
    for (name, p), (name2, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(p, q)
    assert loaded.config.tie_word_embeddings == tied
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab() == tokenizer.get_vocab()
    if model_type == "llama":  # for a qwen config transformers 5 swaps this toy tokenizer for Qwen2Tokenizer
        assert loaded_tok("to be or not").input_ids == tokenizer("to be or not").input_ids == [1, 2, 3, 4]


def test_sharded_round_trip(tmp_path):
    model = tiny_model("qwen2", tied=False)
    folder = save_pretrained(model, tiny_tokenizer(), tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((folder / ckpt.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    for shard in shards:  # each shard within the limit unless it holds a single larger tensor
        tensors = load_file(folder / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert_transformers_matches(model, folder)
    loaded, _ = load_pretrained(folder)
    assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in model.state_dict().items())


def test_overwrite_replaces_whole_folder_and_interrupted_save_leaves_old_one(tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(tiny_model(seed=0), tiny_tokenizer(), target, max_shard_bytes=20_000)
    second = tiny_model(seed=1)
    save_pretrained(second, tiny_tokenizer(), target)  # single file now: stale shards must be gone
    assert not (target / ckpt.INDEX_NAME).exists() and not list(target.glob("model-*.safetensors"))
    assert_transformers_matches(second, target)

    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise KeyboardInterrupt  # interrupted half way through writing
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_model(seed=2), FailingTokenizer(), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------------- error cases


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_pretrained(tiny_model(tied=False), tiny_tokenizer(), tmp_path / "ckpt")


def rewrite_weights(folder: Path, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(tmp_path / 'nope'))} does not exist"):
        ckpt.read_config(tmp_path / "nope")
    with pytest.raises(AssetError, match="nope"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(saved / 'config.json'))} is missing"):
        ckpt.read_config(saved)
    with pytest.raises(AssetError, match="config.json"):
        load_pretrained(saved)


def test_invalid_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="config.json is not valid JSON"):
        load_pretrained(saved)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "model_type 'gpt2' .* is not supported; supported: llama \\(LlamaForCausalLM\\), qwen2 .*qwen3"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architecture 'LlamaForSequenceClassification'"),
    ({"use_sliding_window": True, "layer_types": ["sliding_attention"] * 2}, "sliding-window"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "RoPE type 'longrope' is not supported"),
])
def test_unsupported_architecture(saved, change, message):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(ValueError, match=f"{re.escape(str(saved / 'config.json'))}: .*{message}"):
        load_pretrained(saved)


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"missing from the checkpoint \(model.safetensors\): model.layers.1.mlp.up_proj.weight"):
        load_pretrained(saved)


def test_unexpected_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.layers.7.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected tensors .*model.layers.7.mlp.extra.weight "
                                                   r"\(in model.safetensors\)"):
        load_pretrained(saved)


def test_misshaped_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(ckpt.CheckpointError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' in .*"
                                                   r"model.safetensors has shape \(8, 32\), but config.json "
                                                   r"implies \(16, 32\)"):
        load_pretrained(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(path))} is not a readable safetensors file"):
        load_pretrained(saved)


def test_corrupt_safetensors_header(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header...."
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(path))} is not a readable safetensors file"):
        load_pretrained(saved)


def test_missing_shard(tmp_path):
    folder = save_pretrained(tiny_model(), tiny_tokenizer(), tmp_path / "ckpt", max_shard_bytes=20_000)
    shard = folder / "model-00002-of-{:05d}.safetensors".format(len(list(folder.glob("model-*"))))
    shard.unlink()
    with pytest.raises(ckpt.CheckpointError,
                       match=f"{re.escape(str(shard))} is missing: .*index.json lists it as a shard"):
        load_pretrained(folder)


def test_no_weights_at_all(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"no model.safetensors or model.safetensors.index.json in "
                                                   r".*found: .*pytorch_model.bin.*convert"):
        load_pretrained(saved)


def test_tied_head_stored_anyway_is_accepted(tmp_path):
    """Some tied checkpoints store lm_head.weight as well; transformers ignores it, so do we."""
    model = tiny_model(tied=True)
    folder = save_pretrained(model, tiny_tokenizer(), tmp_path / "ckpt")
    rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    loaded, _ = load_pretrained(folder)
    assert torch.equal(loaded.lm_head_weight, model.lm_head_weight)

