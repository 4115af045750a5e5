"""The sampler's GPU-only paths, in one command (for a session with a GPU):

    .venv/bin/python bench/gpu_sampler.py          # about 2 minutes on an H100

1. CUDA-graph decode vs eager decode (fp32, the Triton kernels): 8 samples of one prompt,
   sampled and greedy, must give the same tokens and log-probs within 1e-4.
2. Decode tokens/s at batch 64 (64 samples of one 2k-token prompt, bf16), eager and with
   CUDA graphs, beside the bandwidth limit: (weight bytes + KV bytes read per step) /
   measured device-to-device copy bandwidth.

Uses the default checkpoint when it is in the asset cache, otherwise random weights of its
architecture (GPU machines may have no network; timings do not depend on the weights).
DRY_RUN=1: a 2-layer random model, tiny sizes, on CPU, eager only (checks that the script runs).
"""
import os
import time

import torch

from spell_core.models.model import CausalLM, ModelConfig
from spell_core.sampling.sampler import generate

DRY = os.environ.get("DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
SMOLLM2_CONFIG = dict(  # config.json of SmolLM2-135M-Instruct
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})


def load_model(dtype):
    try:
        from spell_core.models.assets import cache_dir
        from spell_core.models.model import load_pretrained
        if DRY or not (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists():
            raise FileNotFoundError
        model, _ = load_pretrained("smollm2-135m-instruct", dtype=dtype, device=DEVICE)
        return model, "SmolLM2-135M-Instruct weights"
    except (FileNotFoundError, OSError):
        config = dict(SMOLLM2_CONFIG, num_hidden_layers=2) if DRY else SMOLLM2_CONFIG
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = CausalLM(ModelConfig.from_hf(config)).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        return model, "random weights, SmolLM2-135M architecture"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def graphs_match_eager():
    model, source = load_model(torch.float32)
    prompt = torch.randint(100, 40000, (300 if not DRY else 20,), generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(temperature=0.7, top_p=0.95, seed=3), dict(temperature=0.0)):
        common = dict(n=8, max_new_tokens=48 if not DRY else 4, ignore_eos=True, **kwargs)
        eager = generate(model, None, [prompt], **common)[0]
        graphs = generate(model, None, [prompt], cuda_graph=not DRY, **common)[0]
        same = all(a.token_ids == b.token_ids for a, b in zip(eager, graphs))
        err = max(abs(x - y) for a, b in zip(eager, graphs) for x, y in zip(a.logprobs, b.logprobs))
        print(f"[1] {source}, {kwargs}: graph tokens == eager tokens: {same}, max |logprob diff| {err:.2e}")
        assert same and err <= 1e-4


def copy_bandwidth():
    x = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write


def batch64_throughput():
    dtype = torch.float32 if DRY else torch.bfloat16
    model, source = load_model(dtype)
    prompt_len, samples, new_tokens = (2048, 64, 128) if not DRY else (32, 4, 4)
    prompt = torch.randint(100, 40000, (prompt_len,), generator=torch.Generator().manual_seed(1))
    bandwidth = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(dtype).bits // 8
    mean_own = new_tokens / 2
    step_bytes = weight_bytes + kv_token * (prompt_len + samples * mean_own)  # prompt KV read once per step
    limit = samples * bandwidth / step_bytes
    print(f"[2] {source}, {dtype}, {samples} samples of a {prompt_len}-token prompt, {new_tokens} new tokens; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bytes per step {step_bytes / 1e6:.0f} MB, "
          f"limit {limit:.0f} tok/s")
    for graphs in ([False, True] if not DRY else [False]):
        events = []
        generate(model, None, [prompt], n=samples, max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, seed=0,
                 ignore_eos=True, cuda_graph=graphs, progress=events.append)  # warm-up: Triton compiles
        events.clear()
        sync()
        generate(model, None, [prompt], n=samples, max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, seed=0,
                 ignore_eos=True, cuda_graph=graphs, progress=events.append)
        decode = [e for e in events if e.stage == "decode"]
        seconds = sum(e.seconds for e in decode)
        rate = sum(e.tokens for e in decode) / seconds
        prefill = sum(e.seconds for e in events if e.stage == "prefill")
        print(f"    cuda_graph={graphs}: prefill {prefill * 1e3:.0f} ms, decode {rate:.0f} tok/s "
              f"({rate / limit:.0%} of the bandwidth limit), {seconds / len(decode) * 1e3:.2f} ms/step")


if __name__ == "__main__":
    if DEVICE == "cuda":
        print(torch.cuda.get_device_name())
    graphs_match_eager()
    batch64_throughput()
