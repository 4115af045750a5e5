"""A real few-step TRL GRPOTrainer run on a tiny random Llama (SmolLM2's tokenizer, from the local
cache) with spell's log-prob head (spell_kernels.integrations.trl.SpellGRPOTrainer) against the
same run with TRL's own fused LM head: the logged losses, KL and entropies agree."""
import pytest

trl = pytest.importorskip("trl", reason="TRL is the optional extra spell-kernels[trl]")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from spell_kernels.integrations import trl as spell_trl  # noqa: E402


def _tokenizer():
    from spell_core.models.assets import resolve_model
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def _run(trainer_cls, tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path / "model"  # TRL builds the reference model from the policy's path
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = Dataset.from_dict({"prompt": ["The cat", "A dog ran", "Rivers flow", "Ten plus two"]})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, beta=0.04,
                          report_to="none", use_cpu=True, seed=0, save_strategy="no", bf16=False,
                          dataloader_num_workers=0)
    trainer = trainer_cls(model=str(folder), reward_funcs=lambda completions, **kw: [float(len(c) % 5) for c in completions],
                          args=args, train_dataset=data, processing_class=tokenizer)
    head = trainer.model.forward.__func__.__code__.co_qualname  # which fused head the trainer built
    trainer.train()
    return head, [h for h in trainer.state.log_history if "loss" in h]


def test_grpo_trainer_with_spell_logprob_head_matches_trls(tmp_path):
    tokenizer = _tokenizer()
    our_head, ours = _run(spell_trl.SpellGRPOTrainer, tokenizer, tmp_path / "spell")
    their_head, theirs = _run(trl.GRPOTrainer, tokenizer, tmp_path / "trl")
    assert our_head.startswith("add_logprob_head") and their_head.startswith("add_fused_lm_head")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        for key in ("loss", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    # the module-level patch is undone after the trainer is built
    from trl.trainer import grpo_trainer
    assert grpo_trainer.add_fused_lm_head is not spell_trl.add_logprob_head
